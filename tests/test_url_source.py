"""tasks/url_source.py against real HTTP servers on loopback (no mocks): bytes, sizes, redirects,
limits, timeouts, and the SSRF refusals, with the servers counting what reached them."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import random
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest

from catalog.model import HcxError, TransientSourceError
from tasks.inspection import HashingReader
from tasks.url_source import ALLOW_SETTING, UrlPolicy, _check_redirect, open_url
from tests.conftest import write_answer, write_chunked

LOOPBACK = UrlPolicy(allow_networks=(ip_network("127.0.0.0/8"), ip_network("::1/128")))
NOTHING_ALLOWED = UrlPolicy(connect_timeout=1)


def payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


class _Handler(BaseHTTPRequestHandler):
    """/data/N, /chunked/N, /hops/CODE/K/N (K redirects, then /data/N), /to/QUOTED-URL (302 there),
    /short/N (promises N bytes, sends half), /gzip (says it is compressed), /stall-head, /stall-body,
    /status/CODE."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        route, *args = self.path.partition("?")[0].strip("/").split("/", 1)
        arg = args[0] if args else ""
        if route == "data":
            write_answer(self, 200, payload(int(arg)))
        elif route == "chunked":
            write_chunked(self, payload(int(arg)))
        elif route == "hops":
            code, left, size = (int(part) for part in arg.split("/"))
            if left:
                write_answer(self, code, b"", Location=f"/hops/{code}/{left - 1}/{size}")
            else:
                write_answer(self, 200, payload(size))
        elif route == "gzip":
            write_answer(self, 200, payload(10), **{"Content-Encoding": "gzip"})
        elif route == "to":
            write_answer(self, 302, b"", Location=unquote(arg))
        elif route == "short":
            self.send_response(200)
            self.send_header("Content-Length", arg)
            self.end_headers()
            self.wfile.write(payload(int(arg))[: int(arg) // 2])
            self.close_connection = True
        elif route == "stall-head":
            self.server.release.wait(5)
        elif route == "stall-body":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"12345")
            self.wfile.flush()
            self.server.release.wait(5)
            self.close_connection = True
        else:
            write_answer(self, int(arg) if route == "status" else 404, b"")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # the stalling handlers are released at teardown, never joined

    def __init__(self, host: str, tls: ssl.SSLContext | None = None):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.requests: list[str] = []
        self.connections = 0
        self.release = threading.Event()
        self.tls = tls is not None

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up early is no error
            super().handle_error(request, client_address)

    def get_request(self) -> tuple[socket.socket, object]:
        accepted = super().get_request()
        self.connections += 1
        return accepted

    def url(self, path: str, host: str | None = None) -> str:
        host = host or (f"[{self.server_address[0]}]" if ":" in self.server_address[0] else self.server_address[0])
        return f"{'https' if self.tls else 'http'}://{host}:{self.server_address[1]}{path}"

    def assert_untouched(self, connections_before: int) -> None:
        """No connection reached the server since `connections_before` was read: an allowed fetch
        now is accepted as the one next connection (the listen queue is first in, first out)."""
        with open_url(self.url("/data/1"), LOOPBACK) as stream:
            assert stream.read() == payload(1)
        assert self.connections == connections_before + 1


def _serve(host: str, tls: ssl.SSLContext | None = None):
    try:
        server = _Server(host, tls)
    except OSError as exc:
        pytest.skip(f"cannot listen on {host}: {exc}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server():
    yield from _serve("127.0.0.1")


@pytest.fixture(scope="module")
def other_server():
    """A second loopback server, the one a redirect must not reach."""
    yield from _serve("127.0.0.2")


@pytest.fixture(scope="module")
def server6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    yield from _serve("::1")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server whose certificate no public authority signed."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    folder: Path = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    yield from _serve("127.0.0.1", context)


def read_all(stream, chunk_size: int = 65536) -> bytes:
    parts = []
    while chunk := stream.read(chunk_size):
        assert len(chunk) <= chunk_size
        parts.append(chunk)
    return b"".join(parts)


# --- bytes, sizes, final URL


def test_the_bytes_read_are_the_bytes_served(server):
    url = server.url("/data/300001")
    with open_url(url, LOOPBACK) as stream:
        assert (stream.size, stream.final_url) == (300001, url)
        assert stream.read(0) == b""
        head = stream.read(10)
        assert head + read_all(stream, 70000) == payload(300001)
        assert stream.read() == b"" and stream.read(5) == b""


def test_a_chunked_body_has_no_size_and_reads_whole(server):
    with open_url(server.url("/chunked/200000"), LOOPBACK) as stream:
        assert stream.size is None
        assert stream.read() == payload(200000)


def test_the_stream_feeds_a_hashing_reader(server):
    with open_url(server.url("/chunked/100000"), LOOPBACK) as stream:
        reader = HashingReader(stream)
        while reader.read(8192):
            pass
    assert reader.size == 100000
    assert reader.sha256 == hashlib.sha256(payload(100000)).hexdigest()


def test_a_name_is_judged_by_its_address_not_refused_as_a_name(server):
    with open_url(server.url("/data/10", host="localhost"), LOOPBACK) as stream:
        assert stream.read() == payload(10)


def test_a_mapped_ipv4_address_is_judged_by_its_ipv4(server):
    try:
        socket.create_connection(("::ffff:127.0.0.1", server.server_address[1]), 1).close()
    except OSError as exc:
        pytest.skip(f"no IPv4-mapped IPv6 here: {exc}")
    allow_v4_only = UrlPolicy(allow_networks=(ip_network("127.0.0.0/8"),))
    with open_url(server.url("/data/10", host="[::ffff:127.0.0.1]"), allow_v4_only) as stream:
        assert stream.read() == payload(10)


# --- redirects


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_followed_to_the_final_url(server, code):
    before = len(server.requests)
    with open_url(server.url(f"/hops/{code}/3/5000"), LOOPBACK) as stream:
        assert stream.final_url == server.url(f"/hops/{code}/0/5000")
        assert stream.size == 5000
        assert stream.read() == payload(5000)
    assert len(server.requests) == before + 4


def test_max_redirects_are_followed(server):
    five = UrlPolicy(allow_networks=LOOPBACK.allow_networks, max_redirects=5)
    with open_url(server.url("/hops/302/5/10"), five) as stream:
        assert stream.read() == payload(10)


def test_one_redirect_too_many_is_refused(server):
    before = len(server.requests)
    with pytest.raises(HcxError, match=r"redirected more than 5 times .*/hops/302/0/10\): give the image's final URL"):
        with open_url(server.url("/hops/302/6/10"), LOOPBACK):
            pass
    assert len(server.requests) == before + 6  # the sixth redirect's target was never asked


def test_a_redirect_to_a_refused_address_never_reaches_it(server, other_server):
    only_first = UrlPolicy(allow_networks=(ip_network("127.0.0.1/32"),))
    before = other_server.connections
    target = other_server.url("/data/10")
    with pytest.raises(HcxError, match=r"Refused to connect to 127\.0\.0\.2, port \d+: it is a loopback address"):
        with open_url(server.url("/to/" + quote(target, safe="")), only_first):
            pass
    other_server.assert_untouched(before)


@pytest.mark.parametrize("target, words", [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, port 80: it is a link-local address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254, port 80: it is a private address"),
    ("ftp://example.com/image.qcow2", "redirected to a ftp URL"),
    ("http://alice:s3cr3t@example.com/image.qcow2", "carries a user name or password"),
])
def test_a_redirect_gets_the_checks_of_a_first_url(server, target, words):
    with pytest.raises(HcxError) as raised:
        with open_url(server.url("/to/" + quote(target, safe="")), LOOPBACK):
            pass
    assert words in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


def test_a_redirect_from_https_to_http_is_refused():
    # No https server here carries a certificate certifi trusts, so the rule is checked on its own.
    with pytest.raises(HcxError, match="redirected from https to plain http .*give an https URL"):
        _check_redirect(httpx.URL("http://example.com/a.img"), came_from=httpx.URL("https://example.com/a.img"))
    _check_redirect(httpx.URL("https://example.com/b.img"), came_from=httpx.URL("http://example.com/a.img"))


# --- refused destinations


@pytest.mark.parametrize("host, words", [
    ("127.0.0.1", "Refused to connect to 127.0.0.1, port {port}: it is a loopback address"),
    ("localhost", "Refused to connect to 127.0.0.1 (the address of localhost), port {port}: it is a loopback address"),
    ("127.1.2.3", "Refused to connect to 127.1.2.3, port {port}: it is a loopback address"),
    ("0.0.0.0", "Refused to connect to 0.0.0.0, port {port}: it is an unspecified address"),
    ("[::ffff:127.0.0.1]", "Refused to connect to ::ffff:127.0.0.1, port {port}: it is a loopback address (127.0.0.1) "
                           "written in IPv6 form"),
])
def test_loopback_is_refused_before_any_connection(server, host, words):
    before = server.connections
    with pytest.raises(HcxError) as raised:
        with open_url(server.url("/data/10", host=host), NOTHING_ALLOWED):
            pass
    message = str(raised.value)
    assert words.format(port=server.server_address[1]) in message
    assert 'an administrator can allow it by adding its network (e.g. "' in message
    assert f"to {ALLOW_SETTING} (a JSON list of CIDRs)" in message
    server.assert_untouched(before)


def test_ipv6_loopback_is_refused_before_any_connection(server6):
    before = server6.connections
    refusal = rf'Refused to connect to ::1, port \d+: it is a loopback address.*"::1/128"\) to {ALLOW_SETTING}'
    with pytest.raises(HcxError, match=refusal):
        with open_url(server6.url("/data/10"), NOTHING_ALLOWED):
            pass
    server6.assert_untouched(before)


@pytest.mark.parametrize("url, words", [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, port 80: it is a link-local address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254, port 80: it is a private address"),
    ("http://10.1.2.3:8080/a.img", "10.1.2.3, port 8080: it is a private address"),
    ("http://192.168.1.1/a.img", "192.168.1.1, port 80: it is a private address"),
    ("http://100.64.0.1/a.img", "100.64.0.1, port 80: it is a shared (carrier-grade NAT) address"),
    ("http://224.0.0.1/a.img", "224.0.0.1, port 80: it is a multicast address"),
    ("http://[::]/a.img", "::, port 80: it is an unspecified address"),
    ("http://[64:ff9b::a9fe:a9fe]/a.img", "64:ff9b::a9fe:a9fe, port 80: it is a link-local address (where cloud "
                                          "metadata services answer) (169.254.169.254) written in IPv6 form"),
])
def test_internal_addresses_are_refused_at_once(url, words):
    started = time.monotonic()
    with pytest.raises(HcxError) as raised:
        with open_url(url, NOTHING_ALLOWED):
            pass
    assert f"Refused to connect to {words}" in str(raised.value)
    assert ALLOW_SETTING in str(raised.value)
    assert time.monotonic() - started < 0.5  # judged before connecting, no timeout waited for


def test_the_connected_peer_is_checked_not_only_the_address_asked(server):
    # Linux delivers a connection to 0.0.0.0 to a loopback listener: with 0.0.0.0 allowed, the
    # address asked for passes the first check and only the peer check finds 127.0.0.1.
    zero_allowed = UrlPolicy(allow_networks=(ip_network("0.0.0.0/32"),))
    before = len(server.requests)
    with pytest.raises(HcxError, match=r"Refused to connect to 127\.0\.0\.1 \(the address of 0\.0\.0\.0\), port \d+: "
                                       r"it is a loopback address"):
        with open_url(server.url("/data/10", host="0.0.0.0"), zero_allowed):
            pass
    time.sleep(0.05)  # the server accepted the connection: give it the time to read a request
    assert len(server.requests) == before


def test_proxy_variables_cannot_route_around_the_checks(server, other_server, monkeypatch):
    # other_server plays the proxy: a hop sent through it would skip the checked connection layer.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, other_server.url("/"))
    before = other_server.connections
    with open_url(server.url("/data/10"), LOOPBACK) as stream:
        assert stream.read() == payload(10)
    other_server.assert_untouched(before)


# --- the URL itself


@pytest.mark.parametrize("url, words", [
    ("ftp://example.com/image.qcow2", "not ftp:// (ftp://example.com/image.qcow2)"),
    ("file:///etc/passwd", "not file://"),
    ("example.com/image.qcow2", "not no scheme (a relative URL)"),
    ("http:///image.qcow2", "has no host"),
])
def test_only_http_urls_with_a_host_are_fetched(url, words):
    with pytest.raises(HcxError, match="give") as raised:
        with open_url(url, LOOPBACK):
            pass
    assert words in str(raised.value)


def test_a_url_with_credentials_is_refused_without_echoing_them(server):
    before = server.connections
    url = server.url("/data/10", host="alice:s3cr3t@127.0.0.1")
    with pytest.raises(HcxError, match="carries a user name or password") as raised:
        with open_url(url, LOOPBACK):
            pass
    assert "s3cr3t" not in str(raised.value) and "alice" not in str(raised.value)
    assert server.url("/data/10") in str(raised.value)
    server.assert_untouched(before)


# --- answers and limits


@pytest.mark.parametrize("code, words", [
    (404, "answered HTTP 404 Not Found: check the URL"),
    (403, "answered HTTP 403 Forbidden: the server wants credentials"),
    (500, "answered HTTP 500 Internal Server Error: the server failed or is busy; try again later"),
    (304, "answered HTTP 304 Not Modified: give a URL that answers the image itself"),
])
def test_an_error_answer_names_the_status_and_the_url_but_not_its_query(server, code, words):
    url = server.url(f"/status/{code}?X-Amz-Signature=secret")
    with pytest.raises(HcxError) as raised:
        with open_url(url, LOOPBACK):
            pass
    assert f"{server.url(f'/status/{code}')}?… {words}" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_a_compressed_answer_is_refused(server):
    with pytest.raises(HcxError, match=r"/gzip sent the image compressed \(Content-Encoding: gzip\) although asked"):
        with open_url(server.url("/gzip"), LOOPBACK):
            pass


def test_a_declared_size_over_the_limit_is_refused_before_reading(server):
    policy = UrlPolicy(allow_networks=LOOPBACK.allow_networks, max_bytes=1000)
    with open_url(server.url("/data/1000"), policy) as stream:
        assert stream.read() == payload(1000)
    with pytest.raises(HcxError, match=r"/data/1001 is 1001 bytes, over the 1000-byte limit .*upload it another way"):
        with open_url(server.url("/data/1001"), policy):
            pytest.fail("the body was offered")


def test_an_undeclared_size_over_the_limit_fails_while_reading(server):
    policy = UrlPolicy(allow_networks=LOOPBACK.allow_networks, max_bytes=100000)
    with open_url(server.url("/chunked/100000"), policy) as stream:
        assert read_all(stream) == payload(100000)
    received = b""
    with pytest.raises(HcxError, match=r"/chunked/100001 is more than 100000 bytes, over the 100000-byte limit"):
        with open_url(server.url("/chunked/100001"), policy) as stream:
            while chunk := stream.read(4096):
                received += chunk
    assert received == payload(100001)[: len(received)] and len(received) <= 100000


def test_a_body_shorter_than_declared_fails(server):
    with pytest.raises(TransientSourceError, match=r"The connection to .*/short/100000 broke off .*try again"):
        with open_url(server.url("/short/100000"), LOOPBACK) as stream:
            read_all(stream)


@pytest.mark.parametrize("path", ["/stall-head", "/stall-body"])
def test_a_stalled_server_is_a_read_timeout(server, path):
    policy = UrlPolicy(allow_networks=LOOPBACK.allow_networks, read_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(HcxError, match=rf"{path} sent nothing for 0\.5 s \(read timeout\)"):
        with open_url(server.url(path), policy) as stream:
            assert stream.read(5) == b"12345"
            stream.read(5)
    assert time.monotonic() - started < 2


def test_a_closed_port_cannot_be_connected_to():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HcxError, match=rf"Cannot connect to http://127\.0\.0\.1:{port}/a\.img .*check the URL"):
        with open_url(f"http://127.0.0.1:{port}/a.img", LOOPBACK):
            pass


def test_a_certificate_no_authority_signed_is_refused(tls_server):
    before = len(tls_server.requests)
    refusal = r"Cannot connect to https://127\.0\.0\.1:\d+/data/10 .*CERTIFICATE_VERIFY_FAILED"
    with pytest.raises(HcxError, match=refusal):
        with open_url(tls_server.url("/data/10"), LOOPBACK):
            pass
    assert len(tls_server.requests) == before


# --- the policy from HCX_URL_ALLOW_NETWORKS


@pytest.mark.parametrize("text, networks", [
    (None, ()),
    ("  ", ()),
    ("[]", ()),
    ('["10.20.0.0/16", " fd12:3456::/48", "192.0.2.7"]',
     (ip_network("10.20.0.0/16"), ip_network("fd12:3456::/48"), ip_network("192.0.2.7/32"))),
])
def test_allowed_networks_are_read_from_json(text, networks):
    assert UrlPolicy.from_json(text).allow_networks == networks


def test_from_json_takes_the_limits_too():
    policy = UrlPolicy.from_json('["10.0.0.0/8"]', max_bytes=10, read_timeout=0.5)
    assert (policy.max_bytes, policy.read_timeout, policy.max_redirects) == (10, 0.5, 5)


@pytest.mark.parametrize("text, words", [
    ("10.0.0.0/8", "is not valid JSON"),
    ('"10.0.0.0/8"', "must be a JSON list of CIDRs, not a str"),
    ('{"networks": []}', "must be a JSON list of CIDRs, not a dict"),
    ("[10]", "10 is not a string"),
    ('["10.0.0.0/33"]', "'10.0.0.0/33' is not a network"),
    ('["10.0.0.1/8"]', "'10.0.0.1/8' is not a network (10.0.0.1/8 has host bits set)"),
    ('["intranet"]', "'intranet' is not a network"),
])
def test_a_bad_allow_list_says_what_is_wrong(text, words):
    with pytest.raises(HcxError) as raised:
        UrlPolicy.from_json(text)
    assert str(raised.value).startswith(f"{ALLOW_SETTING}")
    assert words in str(raised.value)
    assert "CIDR" in str(raised.value)
