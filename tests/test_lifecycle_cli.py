"""The lifecycle verbs through the real CLI (typer, in-process): what they print, refusals on
stderr with exit 1 and nothing changed, usage errors with exit 2, and a clone to the end."""

from __future__ import annotations

import re

import pytest

from catalog.model import ImageState, ImageType

S = ImageState


def test_attribute_verbs(cli, catalog, put_image):
    image = put_image(S.READY, attributes={"OLD": "x"})
    steps = [
        (["disable", image.id], "is DISABLED", lambda i: i.state is S.DISABLED),
        (["enable", image.id], "is READY", lambda i: i.state is S.READY),
        (["persistent", image.id], "(persistent) is READY", lambda i: i.persistent),
        (["nonpersistent", image.id], "(non-persistent) is READY", lambda i: not i.persistent),
        (["rename", image.id, "golden-2"], "(golden-2) is READY", lambda i: i.name == "golden-2"),
        (["update", image.id, "--description", "base OS", "--set", "OS=debian 12", "--set", "K=a=b", "--unset", "OLD"],
         "is READY", lambda i: (i.description, i.attributes) == ("base OS", {"OS": "debian 12", "K": "a=b"})),
        (["chtype", image.id, "cdrom"], "(CDROM) is READY", lambda i: i.type is ImageType.CDROM),
    ]
    for args, said, check in steps:
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr)
        assert said in result.stdout, (args, result.stdout)
        assert check(catalog.get(image.id)), args
    assert len(catalog.history(image.id)) == len(steps)  # one transition each (the row had none)


@pytest.mark.parametrize("state, args, message", [
    (S.READY, ["enable"], "only DISABLED or ERROR images can be enabled (it is READY)"),
    (S.LOCKED, ["disable"], "only READY or ERROR images can be disabled (it is LOCKED)"),
    (S.USED, ["persistent"], "There are 1 VMs using it"),
    (S.CLONE, ["nonpersistent"], "There are 1 active clone operations"),
    (S.DELETE, ["rename", "x"], "it is in state DELETE"),
    (S.DELETE, ["update", "--description", "x"], "it is in state DELETE"),
    (S.USED, ["chtype", "OS"], "Cannot change the type of image"),
    (S.READY, ["retry"], "only an image in ERROR can be retried"),
    (S.ERROR, ["retry"], "records no failed operation to retry"),
    (S.READY, ["clone", "copy", "--skip-capacity-check"], "Only an administrator may skip"),
    (S.DISABLED, ["clone", "copy"], "it is in state DISABLED"),
])
def test_refusals_exit_1_and_change_nothing(cli, catalog, put_image, state, args, message):
    image = put_image(state, running_vms=1 if state is S.USED else 0, cloning_ops=1 if state is S.CLONE else 0,
                      persistent=state is S.CLONE, source="s3://hcx-images/images/x", source_etag='"e"')
    before = (catalog.list(), catalog.history(image.id))
    verb, *rest = args
    result = cli(verb, image.id, *rest)
    assert result.exit_code == 1, result.stdout
    assert message in result.stderr
    assert (catalog.list(), catalog.history(image.id)) == before


def test_missing_image_and_missing_right(cli, put_image):
    assert "Image 999999 does not exist" in cli("enable", 999999).stderr
    theirs = put_image(S.READY, owner="bob", group="staff", permissions=0o604)
    result = cli("disable", theirs.id)
    assert result.exit_code == 1 and "User alice has no MANAGE right" in result.stderr


@pytest.mark.parametrize("args", [
    ["update", "1"],
    ["update", "1", "--set", "novalue"],
    ["chtype", "1", "FLOPPY"],
    ["clone", "1"],
    ["enable", "one"],
])
def test_usage_errors_exit_2(cli, args):
    assert cli(*args).exit_code == 2


def test_cli_clone_wait(cli, catalog, shared_source):
    result = cli("clone", shared_source.id, "cli-copy", "--wait")
    assert result.exit_code == 0, result.stderr
    copy = catalog.get(int(re.search(r"ID: (\d+)", result.stdout).group(1)))
    assert f"image {copy.id} is READY" in result.stdout
    assert (copy.name, copy.sha256, copy.format) == ("cli-copy", shared_source.sha256, shared_source.format)
    assert catalog.get(shared_source.id).state is S.READY
