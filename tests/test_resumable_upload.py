"""Resumable uploads: a file sent part by part into a session the service makes. A connection cut
mid-upload resumes by itself and sends only what the service lacks; a client killed mid-upload
finishes with `upload-resume`; parts sent out of order, or sent again with other bytes, still give
the sha256 of what was stored; a published checksum that does not match leaves nothing behind;
someone else's session looks like none. Real HTTP to the image API, real SeaweedFS, real flows."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest

from catalog.model import ImageState, utcnow
from catalog.staging import open_staging, staging_records, upload_sessions
from tests.conftest import CuttableProxy

MiB = 1024 * 1024
PART = 16 * MiB
HCX_IMAGE = str(Path(sys.executable).parent / "hcx-image")  # the installed CLI, as a process of its own


@pytest.fixture
def api_proxy(image_api):
    """A TCP proxy in front of the image API that can cut the link (after N bytes) or hold requests."""
    proxy = CuttableProxy(urlparse(image_api).port)
    yield proxy
    proxy.close()


def _file(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))
        out.write(os.urandom(size % MiB))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _sessions() -> list:
    with open_staging().engine.connect() as conn:
        return list(conn.execute(upload_sessions.select()))


def _nothing_left(catalog, store, name: str, staging_leftovers) -> None:
    assert [i for i in catalog.list() if i.name == name] == []
    assert staging_leftovers(store) == []
    assert [s for s in _sessions() if s.parameters.get("name") == name] == []


def _wait_ready(client, flow_run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (run := client.get(f"/runs/{flow_run_id}").json())["image"] is None or \
            run["image"]["state"] == "LOCKED":
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    return run["image"]


def test_a_connection_cut_mid_upload_resumes_by_itself_and_sends_only_the_rest(
        cli, api_proxy, catalog, default_store, unique_name, tmp_path, staging_leftovers):
    source = _file(tmp_path / "disk.raw", 7 * PART + 12345)
    name = unique_name("cut")
    api_proxy.cut_after(4 * PART, seconds=1.0)
    result = cli("create", "--name", name, "--type", "DATABLOCK", "--path", source, "--wait",
                 env={"HCX_API_URL": api_proxy.endpoint})
    assert result.exit_code == 0, result.stderr
    [image] = [i for i in catalog.list() if i.name == name]
    assert image.state is ImageState.READY and image.sha256 == _sha256(source)
    assert image.size == source.stat().st_size
    assert api_proxy._cut_at is None, "the link was never cut"
    # Resumed, not restarted: at most the parts in flight at the cut were sent twice.
    assert api_proxy.forwarded < source.stat().st_size + 4 * PART + MiB
    assert staging_leftovers(default_store) == []
    assert [s for s in _sessions() if s.parameters["name"] == name] == []


def test_a_killed_client_finishes_with_upload_resume(image_api, tokens, api_proxy, catalog, default_store,
                                                     unique_name, tmp_path, staging_leftovers, api_as):
    source = _file(tmp_path / "disk.raw", 6 * PART)
    name = unique_name("killed")
    home = tmp_path / "client-home"
    env = {**os.environ, "HCX_API_URL": api_proxy.endpoint, "HCX_TOKEN": tokens["alice"], "HCX_HOME": str(home)}
    api_proxy.hold(rb"\APUT [^ ]*/parts/5 ")  # part 5 never gets through: the client is killed meanwhile
    client = subprocess.Popen([HCX_IMAGE, "create", "--name", name, "--type", "DATABLOCK",
                               "--path", str(source)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while api_proxy.holding == 0:
            assert client.poll() is None and time.monotonic() < deadline, client.communicate()
            time.sleep(0.05)
        [note] = list((home / "uploads").glob("*.json"))
        upload_id = note.stem
        alice = api_as("alice")
        while len(alice.get(f"/uploads/{upload_id}").json()["received"]) < 5:  # the others got through
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
        api_proxy.hold(None)
    assert alice.get(f"/uploads/{upload_id}").json()["received"] == [1, 2, 3, 4, 6]
    assert [i for i in catalog.list() if i.name == name] == []  # nothing registered yet

    sent_before = api_proxy.forwarded
    resumed = subprocess.run([HCX_IMAGE, "upload-resume", upload_id, "--wait"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    [image] = [i for i in catalog.list() if i.name == name]
    assert image.state is ImageState.READY and image.sha256 == _sha256(source)
    assert api_proxy.forwarded - sent_before < PART + MiB  # only part 5 was sent again
    assert not note.exists()
    assert staging_leftovers(default_store) == []


def test_parts_out_of_order_and_sent_again_with_other_bytes_hash_as_stored(api_as, catalog, unique_name,
                                                                         default_store, staging_leftovers):
    alice = api_as("alice")
    parts = [os.urandom(PART), os.urandom(PART), os.urandom(PART), os.urandom(5000)]
    size = sum(map(len, parts))
    opened = alice.post("/uploads", json={"name": unique_name("order"), "type": "DATABLOCK", "size": size})
    assert opened.status_code == 201, opened.text
    upload_id = opened.json()["upload_id"]
    assert opened.json()["parts"] == 4 and opened.json()["part_size"] == PART
    for number in (4, 2, 3, 1):
        reply = alice.put(f"/uploads/{upload_id}/parts/{number}", content=parts[number - 1])
        assert reply.status_code == 200, reply.text
    parts[1] = os.urandom(PART)  # part 2 again, other bytes, after it was inspected: the newer counts
    assert alice.put(f"/uploads/{upload_id}/parts/2", content=parts[1]).status_code == 200
    assert alice.get(f"/uploads/{upload_id}").json()["received"] == [1, 2, 3, 4]
    done = alice.post(f"/uploads/{upload_id}/complete")
    assert done.status_code == 202, done.text
    image = _wait_ready(alice, done.json()["flow_run_id"])
    assert image["state"] == "READY"
    assert image["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    again = alice.post(f"/uploads/{upload_id}/complete")
    assert again.status_code in (202, 404)  # completed: the same run, or gone once its bytes were adopted
    assert staging_leftovers(default_store) == []


def test_a_wrong_published_checksum_leaves_nothing_on_any_upload_path(cli, api_as, catalog, unique_name, tmp_path,
                                                                      default_store, staging_leftovers):
    source = _file(tmp_path / "disk.raw", 2 * PART + 1)
    wrong = hashlib.sha256(b"another file").hexdigest()
    name = unique_name("wrongsum")
    result = cli("create", "--name", name, "--type", "DATABLOCK", "--path", source, "--sha256", wrong)
    assert result.exit_code == 1
    assert f"but {wrong} was given" in result.stderr and "Nothing was kept" in result.stderr
    _nothing_left(catalog, default_store, name, staging_leftovers)

    alice = api_as("alice")  # the single-request upload, with a wrong md5
    data = source.read_bytes()
    reply = alice.post("/images/upload", params={"name": name, "type": "DATABLOCK", "md5": "0" * 32}, content=data)
    assert reply.status_code == 422 and "has md5 " in reply.json()["detail"], reply.text
    _nothing_left(catalog, default_store, name, staging_leftovers)

    right = hashlib.sha1(data).hexdigest()  # and a right one is taken
    result = cli("create", "--name", name, "--type", "DATABLOCK", "--path", source, "--sha1", right, "--wait")
    assert result.exit_code == 0, result.stderr
    assert [i.sha256 for i in catalog.list() if i.name == name] == [hashlib.sha256(data).hexdigest()]


def test_session_refusals_change_nothing_and_another_users_session_looks_like_none(api_as, unique_name):
    alice, bob = api_as("alice"), api_as("bob")
    size = PART + 10
    opened = alice.post("/uploads", json={"name": unique_name("refusals"), "type": "DATABLOCK", "size": size})
    upload_id = opened.json()["upload_id"]

    short = alice.put(f"/uploads/{upload_id}/parts/1", content=b"x" * 100)
    assert short.status_code == 409 and "has 16777216 bytes" in short.json()["detail"]
    beyond = alice.put(f"/uploads/{upload_id}/parts/3", content=b"x" * 10)
    assert beyond.status_code == 409 and "there is no part 3" in beyond.json()["detail"]
    early = alice.post(f"/uploads/{upload_id}/complete")
    assert early.status_code == 409 and "lacks 2 of its 2 parts (1, 2)" in early.json()["detail"]
    assert alice.get(f"/uploads/{upload_id}").json()["received"] == []

    nobodys = uuid.uuid4().hex
    missing = alice.get(f"/uploads/{nobodys}").json()["detail"].replace(nobodys, upload_id)
    for theirs in (bob.get(f"/uploads/{upload_id}"), bob.put(f"/uploads/{upload_id}/parts/2", content=b"x" * 10),
                   bob.post(f"/uploads/{upload_id}/complete"), bob.delete(f"/uploads/{upload_id}")):
        assert (theirs.status_code, theirs.json()["detail"]) == (404, missing)
    assert alice.get(f"/uploads/{upload_id}").status_code == 200  # bob's tries changed nothing

    sent_again = alice.post("/uploads", json={"name": "x", "type": "DATABLOCK", "size": 0})
    assert sent_again.status_code == 422
    assert alice.delete(f"/uploads/{upload_id}").status_code == 204
    assert alice.get(f"/uploads/{upload_id}").status_code == 404


def test_the_same_key_opens_the_same_session_and_another_request_under_it_is_refused(api_as, unique_name):
    alice = api_as("alice")
    key = uuid.uuid4().hex
    body = {"name": unique_name("samekey"), "type": "DATABLOCK", "size": 3 * PART}
    first = alice.post("/uploads", json=body, headers={"Idempotency-Key": key})
    again = alice.post("/uploads", json=body, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["upload_id"] == first.json()["upload_id"]
    other = alice.post("/uploads", json={**body, "size": 2 * PART}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and "was used for another upload" in other.json()["detail"]
    assert alice.delete(f"/uploads/{first.json()['upload_id']}").status_code == 204


def test_an_expired_session_is_refused_and_reconcile_aborts_its_parts(api_as, unique_name, new_datastore):
    from blocks.datastore import load_datastore
    from catalog.requests import RequestedBy
    from flows.reconcile import reconcile

    alice = api_as("alice")
    datastore = new_datastore()
    store = load_datastore(datastore)
    opened = alice.post("/uploads", json={"name": unique_name("expired"), "type": "DATABLOCK", "size": PART + 1,
                                          "datastore": datastore})
    upload_id = opened.json()["upload_id"]
    assert alice.put(f"/uploads/{upload_id}/parts/1", content=os.urandom(PART)).status_code == 200
    ref = store.staging_ref(upload_id)
    assert [u["Key"] for u in store.list_multipart_uploads(ref.bucket, ref.key)] == [ref.key]
    with open_staging().engine.begin() as conn:  # its last part came a day and more ago
        conn.execute(staging_records.update().where(staging_records.c.upload_id == upload_id)
                     .values(recorded_at=utcnow() - timedelta(hours=25)))
    expired = alice.put(f"/uploads/{upload_id}/parts/2", content=b"x")
    assert expired.status_code == 404 and "has expired" in expired.json()["detail"]

    # (the parts' own times say they are young: the administrator's TTL of 0 sweeps them anyway)
    state = reconcile(scope="objects", staging_ttl_hours=0, datastores=[datastore],
                      requested_by=RequestedBy(owner="root"), return_state=True)
    assert state.is_completed(), state.message
    assert store.list_multipart_uploads(ref.bucket, ref.key) == []
    assert open_staging().find(upload_id) is None
    assert [s for s in _sessions() if s.upload_id == upload_id] == []


def test_the_same_key_after_its_session_expired_opens_a_new_one_and_drops_the_old(api_as, unique_name,
                                                                                  default_store):
    alice = api_as("alice")
    key, body = uuid.uuid4().hex, {"name": unique_name("reopen"), "type": "DATABLOCK", "size": PART + 1}
    first = alice.post("/uploads", json=body, headers={"Idempotency-Key": key}).json()["upload_id"]
    assert alice.put(f"/uploads/{first}/parts/1", content=os.urandom(PART)).status_code == 200
    with open_staging().engine.begin() as conn:
        conn.execute(staging_records.update().where(staging_records.c.upload_id == first)
                     .values(recorded_at=utcnow() - timedelta(hours=25)))
    again = alice.post("/uploads", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 201, again.text
    assert again.json()["upload_id"] != first and again.json()["received"] == []
    old = default_store.staging_ref(first)
    assert default_store.list_multipart_uploads(old.bucket, old.key) == []
    assert open_staging().find(first) is None
    assert alice.delete(f"/uploads/{again.json()['upload_id']}").status_code == 204


def test_a_part_cut_off_mid_body_is_not_kept_and_is_no_server_error(image_api, api_as, unique_name, catalog):
    """A client that dies halfway through a part (the body shorter than its Content-Length, then the
    connection closed): the service keeps nothing of that part, logs no server error, and the part
    sent again completes the upload with the sha256 of the bytes."""
    import socket

    alice = api_as("alice")
    parts = [os.urandom(PART), os.urandom(3000)]
    opened = alice.post("/uploads", json={"name": unique_name("cut"), "type": "DATABLOCK",
                                          "size": sum(map(len, parts))})
    assert opened.status_code == 201, opened.text
    upload_id = opened.json()["upload_id"]
    log = Path(os.environ["HCX_HOME"]) / "logs" / "api.log"
    logged_before = log.stat().st_size

    url = urlparse(image_api)
    with socket.create_connection((url.hostname, url.port)) as raw:
        raw.sendall((f"PUT /api/v1/uploads/{upload_id}/parts/1 HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     f"Authorization: {alice.headers['Authorization']}\r\nContent-Length: {PART}\r\n\r\n").encode()
                    + parts[0][:PART // 2])
    assert alice.get(f"/uploads/{upload_id}").json()["received"] == []

    for number, body in enumerate(parts, start=1):
        assert alice.put(f"/uploads/{upload_id}/parts/{number}", content=body).status_code == 200
    done = alice.post(f"/uploads/{upload_id}/complete")
    assert done.status_code == 202, done.text
    image = _wait_ready(alice, done.json()["flow_run_id"])
    assert image["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    logged = log.read_text(errors="replace")[logged_before:]  # the cut part was handled long before
    assert "Traceback" not in logged and "Exception in ASGI" not in logged, logged[-3000:]


def test_a_part_too_far_ahead_waits_unread_while_the_next_one_comes_so_nothing_is_read_back(
        image_api, api_as, unique_name):
    """Part 1 trickles in; parts 2-5 fill the service's budget of held parts (64 MiB); part 6 then
    waits, its bytes unread, while part 1 is on its way, instead of being stored uninspected (which
    made completion read it back: 0.7 s per 100 MiB when a resumed client sent parts out of order).
    Once part 1 is in, every part is checked before completion, and the sha256 is the file's."""
    import socket
    import threading

    alice = api_as("alice")
    parts = [os.urandom(PART) for _ in range(6)] + [os.urandom(777)]
    opened = alice.post("/uploads", json={"name": unique_name("turns"), "type": "DATABLOCK",
                                          "size": sum(map(len, parts))})
    assert opened.status_code == 201, opened.text
    upload_id = opened.json()["upload_id"]

    url = urlparse(image_api)
    with socket.create_connection((url.hostname, url.port)) as first:
        first.sendall((f"PUT /api/v1/uploads/{upload_id}/parts/1 HTTP/1.1\r\nHost: {url.netloc}\r\n"
                       f"Authorization: {alice.headers['Authorization']}\r\nContent-Length: {PART}\r\n\r\n").encode()
                      + parts[0][:MiB])
        time.sleep(0.5)  # part 1 is on its way
        for number in (2, 3, 4, 5):
            assert alice.put(f"/uploads/{upload_id}/parts/{number}", content=parts[number - 1]).status_code == 200
        assert alice.get(f"/uploads/{upload_id}").json()["checked"] == 0

        sixth: list = []
        sender = threading.Thread(target=lambda: sixth.append(
            api_as("alice").put(f"/uploads/{upload_id}/parts/6", content=parts[5])))
        sender.start()
        sender.join(timeout=2)
        assert sixth == [] and sender.is_alive()  # waiting for its turn
        assert 6 not in alice.get(f"/uploads/{upload_id}").json()["received"]

        first.sendall(parts[0][MiB:])
        assert first.recv(4096).startswith(b"HTTP/1.1 200")
    sender.join(timeout=60)
    assert sixth[0].status_code == 200, sixth[0].text
    assert alice.put(f"/uploads/{upload_id}/parts/7", content=parts[6]).status_code == 200
    state = alice.get(f"/uploads/{upload_id}").json()
    assert state["received"] == [1, 2, 3, 4, 5, 6, 7] and state["checked"] == 7
    done = alice.post(f"/uploads/{upload_id}/complete")
    assert done.status_code == 202, done.text
    image = _wait_ready(alice, done.json()["flow_run_id"])
    assert image["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_a_part_whose_turn_nobody_brings_goes_in_unchecked_and_completion_reads_it_back(api_as, unique_name):
    """Parts 2-5 fill the budget of held parts and part 1 is not on its way: part 6 does not wait for
    it (it is answered within seconds, not after the 60 s a sender in flight gets), is stored
    without being inspected, and completion reads it back: the sha256 is still the file's."""
    alice = api_as("alice")
    parts = [os.urandom(PART) for _ in range(6)] + [os.urandom(99)]
    opened = alice.post("/uploads", json={"name": unique_name("noturn"), "type": "DATABLOCK",
                                          "size": sum(map(len, parts))})
    assert opened.status_code == 201, opened.text
    upload_id = opened.json()["upload_id"]
    for number in (2, 3, 4, 5):
        assert alice.put(f"/uploads/{upload_id}/parts/{number}", content=parts[number - 1]).status_code == 200
    started = time.monotonic()
    assert alice.put(f"/uploads/{upload_id}/parts/6", content=parts[5]).status_code == 200
    assert time.monotonic() - started < 10
    for number in (1, 7):
        assert alice.put(f"/uploads/{upload_id}/parts/{number}", content=parts[number - 1]).status_code == 200
    state = alice.get(f"/uploads/{upload_id}").json()
    assert state["received"] == [1, 2, 3, 4, 5, 6, 7] and state["checked"] == 5  # part 6 was not held
    done = alice.post(f"/uploads/{upload_id}/complete")
    assert done.status_code == 202, done.text
    image = _wait_ready(alice, done.json()["flow_run_id"])
    assert image["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
