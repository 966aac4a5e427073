"""Creates sent again (after a timeout, a dropped connection, a killed client) with the same
idempotency key get the first one's answer: one image, never "NAME is already taken". The key
belongs to its user and names one request: another request under it is refused, changing nothing.
Through the image API over real HTTP, and the CLI, which derives a key from the name and the file."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from catalog.model import ImageState


def _wait_for_image(client, flow_run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (run := client.get(f"/runs/{flow_run_id}").json())["image"] is None or \
            run["image"]["state"] in ("LOCKED", "DELETE"):
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    return run["image"]


def _named(catalog, name: str) -> list:
    return [i for i in catalog.list() if i.name == name]


def test_the_cli_sends_a_create_again_and_gets_the_same_image(cli, catalog, unique_name, raw_file, default_store,
                                                              staging_leftovers):
    name = unique_name("again")
    first = cli("create", "--name", name, "--type", "DATABLOCK", "--path", raw_file, "--wait")
    assert first.exit_code == 0, first.stderr
    image_id = re.search(r"ID: (\d+)", first.stdout).group(1)
    again = cli("create", "--name", name, "--type", "DATABLOCK", "--path", raw_file, "--wait")
    assert again.exit_code == 0, again.stderr
    assert re.search(r"ID: (\d+)", again.stdout).group(1) == image_id
    assert re.search(r"FLOW RUN: (\S+)", again.stdout).group(1) == re.search(r"FLOW RUN: (\S+)", first.stdout).group(1)
    assert [i.id for i in _named(catalog, name)] == [int(image_id)]
    assert staging_leftovers(default_store) == []

    raw_file.write_bytes(raw_file.read_bytes()[::-1])  # another file (new mtime): another request, refused by name
    changed = cli("create", "--name", name, "--type", "DATABLOCK", "--path", raw_file)
    assert changed.exit_code == 1 and f"NAME is already taken by IMAGE {image_id}" in changed.stderr


def test_the_api_answers_a_repeated_upload_without_reading_it(api_as, catalog, unique_name, raw_file, default_store,
                                                              staging_leftovers):
    client = api_as("alice")
    name, key = unique_name("api-again"), uuid.uuid4().hex
    params = {"name": name, "type": "DATABLOCK", "driver": "raw"}
    data = raw_file.read_bytes()

    def send():
        return client.post("/images/upload", params=params, content=data,
                           headers={"Idempotency-Key": key, "Content-Type": "application/octet-stream"})

    first = send()
    assert first.status_code == 202 and first.json()["repeated"] is False, first.text
    image = _wait_for_image(client, first.json()["flow_run_id"])
    objects = {o["Key"] for o in default_store.list_keys(default_store.bucket, "")}
    second = send()
    assert second.status_code == 202 and second.json() == {**first.json(), "repeated": True}
    checked = client.post("/images/upload/check", params={**params, "size": len(data)},
                          headers={"Idempotency-Key": key})
    assert checked.status_code == 200 and checked.json()["flow_run_id"] == first.json()["flow_run_id"]
    assert [i.id for i in _named(catalog, name)] == [image["id"]]
    assert {o["Key"] for o in default_store.list_keys(default_store.bucket, "")} == objects  # nothing staged again
    assert staging_leftovers(default_store) == []


def test_another_request_under_the_same_key_is_refused_and_changes_nothing(api_as, catalog, unique_name):
    client = api_as("alice")
    key = uuid.uuid4().hex
    first = client.post("/images", json={"name": unique_name("k"), "size": "1M"}, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    _wait_for_image(client, first.json()["flow_run_id"])
    before = (catalog.list(), [catalog.history(i.id) for i in catalog.list()])
    other = client.post("/images", json={"name": unique_name("k"), "size": "2M"}, headers={"Idempotency-Key": key})
    assert other.status_code == 409, other.text
    assert f"Idempotency key '{key}' was used for another request" in other.json()["detail"]
    assert (catalog.list(), [catalog.history(i.id) for i in catalog.list()]) == before
    # keys are per user: bob's same key is his own
    bobs = api_as("bob").post("/images", json={"name": unique_name("k"), "size": "1M"}, headers={"Idempotency-Key": key})
    assert bobs.status_code == 202 and bobs.json()["flow_run_id"] != first.json()["flow_run_id"]
    _wait_for_image(api_as("bob"), bobs.json()["flow_run_id"])


def test_a_refused_request_leaves_its_key_free(api_as, put_image, unique_name):
    client = api_as("alice")
    key, taken = uuid.uuid4().hex, put_image(ImageState.READY).name
    refused = client.post("/images", json={"name": taken, "size": "1M"}, headers={"Idempotency-Key": key})
    assert refused.status_code == 409 and "NAME is already taken" in refused.json()["detail"]
    corrected = client.post("/images", json={"name": unique_name("fixed"), "size": "1M"},
                            headers={"Idempotency-Key": key})
    assert corrected.status_code == 202, corrected.text
    _wait_for_image(client, corrected.json()["flow_run_id"])


@pytest.mark.parametrize("round_", range(3))
def test_racing_sends_of_one_create_make_one_image(api_as, catalog, unique_name, round_):
    """Eight threads send the same create with the same key at once: every answer is the one flow
    run, or "still at work" (ask again); exactly one image is made."""
    client = api_as("alice")
    name, key = unique_name("race"), uuid.uuid4().hex

    def send(_):
        return client.post("/images", json={"name": name, "size": "1M"}, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, range(8)))
    started = {r.json()["flow_run_id"] for r in replies if r.status_code == 202}
    assert len(started) == 1, [r.text for r in replies]
    for reply in replies:
        assert reply.status_code == 202 or (reply.status_code == 409 and "still at work" in reply.json()["detail"]
                                            and reply.headers["Retry-After"] == "1"), reply.text
    _wait_for_image(client, started.pop())
    assert len(_named(catalog, name)) == 1


def test_the_cli_sends_a_keyed_create_again_until_it_gets_the_first_answer(image_api, tokens, api_as, catalog,
                                                                           unique_name):
    """The CLI's client, eight times at once with one key: a "still at work" answer (Retry-After) is
    asked again, so every caller gets the one flow run, and one image is made."""
    from cli.client import IDEMPOTENCY_HEADER, Api

    name, key = unique_name("race-cli"), uuid.uuid4().hex

    def send(_):
        return Api(image_api, tokens["alice"]).post("/images", {"name": name, "size": "1M"},
                                                    headers={IDEMPOTENCY_HEADER: key})["flow_run_id"]

    with ThreadPoolExecutor(8) as pool:
        started = set(pool.map(send, range(8)))
    assert len(started) == 1
    _wait_for_image(api_as("alice"), started.pop())
    assert len(_named(catalog, name)) == 1


def test_the_same_create_after_its_image_was_deleted_makes_it_anew(api_as, catalog, unique_name):
    client = api_as("alice")
    name, key = unique_name("reborn"), uuid.uuid4().hex
    first = client.post("/images", json={"name": name, "size": "1M"}, headers={"Idempotency-Key": key})
    image = _wait_for_image(client, first.json()["flow_run_id"])
    deleted = client.delete(f"/images/{image['id']}")
    assert deleted.status_code == 202
    deadline = time.monotonic() + 60
    while catalog.find(image["id"]) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    again = client.post("/images", json={"name": name, "size": "1M"}, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json()["flow_run_id"] != first.json()["flow_run_id"]
    assert _wait_for_image(client, again.json()["flow_run_id"])["id"] != image["id"]
