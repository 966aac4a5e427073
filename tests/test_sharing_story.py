"""The seed's sharing story, end to end with the real CLI as three users against the image API:
private by default; `chmod 640` shares with the group; `chmod 604` with everyone; another user
clones a shared image into a private persistent copy; `list` shows each user exactly what they may
use. Also: the CLI's identity is its token, whatever the environment says."""

from __future__ import annotations

import json
import os
import re


def listed(cli, user: str, *args: str) -> set[int]:
    result = cli("list", "--json", *args, user=user)
    assert result.exit_code == 0, result.stderr
    return {image["id"] for image in json.loads(result.stdout)}


def test_private_then_group_then_everyone_then_a_private_clone(cli, catalog, tmp_path, unique_name):
    disk = tmp_path / "golden.raw"
    disk.write_bytes(os.urandom(2 * 1024 * 1024 + 11))
    created = cli("create", "--name", unique_name("golden"), "--type", "DATABLOCK", "--path", disk, "--wait")
    assert created.exit_code == 0, created.stderr
    image_id = int(re.search(r"ID: (\d+)", created.stdout).group(1))
    image = catalog.get(image_id)
    assert (image.owner, image.group, f"{image.permissions:03o}") == ("alice", "users", "600")

    # Private: only alice sees it; to carol and bob it does not exist.
    assert image_id in listed(cli, "alice")
    for user in ("carol", "bob"):
        assert image_id not in listed(cli, user)
        shown = cli("show", image_id, user=user)
        assert shown.exit_code == 1 and f"Image {image_id} does not exist" in shown.stderr

    # Shared with the group: carol (group users) sees it, bob (staff) still does not.
    assert cli("chmod", image_id, "640").exit_code == 0
    assert image_id in listed(cli, "carol") and image_id not in listed(cli, "bob")
    refused = cli("rename", image_id, "mine-now", user="carol")  # USE is not MANAGE
    assert refused.exit_code == 1 and f"no MANAGE right on image {image_id}" in refused.stderr

    # Shared with everyone: bob sees it and clones it into a private persistent copy.
    assert cli("chmod", image_id, "604").exit_code == 0
    assert image_id in listed(cli, "bob")
    cloned = cli("clone", image_id, "bobs-copy", "--persistent", "--wait", user="bob")
    assert cloned.exit_code == 0, cloned.stderr
    copy_id = int(re.search(r"ID: (\d+)", cloned.stdout).group(1))
    copy = catalog.get(copy_id)
    assert (copy.owner, copy.group, f"{copy.permissions:03o}", copy.persistent) == ("bob", "staff", "600", True)
    assert copy.sha256 == image.sha256

    # Each sees exactly what they may use.
    assert {image_id, copy_id} & listed(cli, "bob") == {image_id, copy_id}
    assert copy_id not in listed(cli, "alice") and copy_id not in listed(cli, "carol")
    assert listed(cli, "bob", "--mine") >= {copy_id} and image_id not in listed(cli, "bob", "--mine")

    # An export by bob of the shared image is verified against its sha256.
    exported = cli("export", image_id, tmp_path / "bob.raw", user="bob")
    assert exported.exit_code == 0, exported.stderr
    assert (tmp_path / "bob.raw").read_bytes() == disk.read_bytes()


def test_environment_names_no_one(cli, put_image, catalog):
    from catalog.model import ImageState

    image = put_image(ImageState.READY)  # alice's, 600
    impostor = {"HCX_USER": "alice", "HCX_GROUP": "oneadmin", "USER": "alice", "LOGNAME": "alice"}
    shown = cli("show", image.id, user="bob", env=impostor)
    assert shown.exit_code == 1 and f"Image {image.id} does not exist" in shown.stderr
    deleted = cli("delete", image.id, user="bob", env=impostor)
    assert deleted.exit_code == 1
    assert catalog.get(image.id).state is ImageState.READY


def test_names_are_printed_literally(cli, put_image):
    from catalog.model import ImageState

    image = put_image(ImageState.READY, name="[bold red]x[/] \x1b[31mred")  # made before names were bounded
    listed_ = cli("list")
    assert "[bold red]x[/]" in listed_.stdout and "\x1b" not in listed_.stdout and "\\x1b[31mred" in listed_.stdout
    renamed = cli("rename", image.id, "bad\x1bname")
    assert renamed.exit_code == 1 and "control" in renamed.stderr
