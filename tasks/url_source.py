"""Fetching a disk image from an http(s) URL a tenant gave (import from URL, like Glance's
web-download): the one place the service opens such a URL, safe against SSRF.

Every hop (the URL and each redirect) goes through `_CheckedBackend`, the connection layer under
httpx: it resolves the host once, refuses it if any of its addresses is loopback, link-local
(cloud metadata), private, shared (CGNAT), unspecified, multicast or otherwise not global (an IPv6
address embedding an IPv4 one is judged by that IPv4), connects only to the addresses it checked,
and checks the connected socket's peer again. So the address judged is the address connected to
(a DNS answer that changes between check and connect, "rebinding", is never used), and a refused
address gets no packet at all: tenants cannot probe internal ports by comparing errors. Networks in
UrlPolicy.allow_networks (HCX_URL_ALLOW_NETWORKS) are let through.

Memory is bounded: `UrlStream.read(n)` holds at most n bytes plus one network read (64 KiB).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, TypedDict, Unpack

import httpcore
import httpx

from blocks.sealed_urls import unsealed_form
from catalog.model import HcxError, TransientSourceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_SETTING = "HCX_URL_ALLOW_NETWORKS"
SCHEMES = ("http", "https")

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address
_NAMED_RANGES: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("a private address",
     tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))),
    ("a shared (carrier-grade NAT) address", (ipaddress.IPv4Network("100.64.0.0/10"),)),
)


class Limits(TypedDict, total=False):
    """UrlPolicy's limits, as keywords of UrlPolicy.from_json."""

    max_bytes: int
    max_redirects: int
    connect_timeout: float
    read_timeout: float


@dataclass(frozen=True)
class UrlPolicy:
    allow_networks: tuple[IPNetwork, ...] = ()  # reachable although not global (HCX_URL_ALLOW_NETWORKS)
    max_bytes: int = 64 * 2**30
    max_redirects: int = 5
    connect_timeout: float = 10  # seconds, per address tried
    read_timeout: float = 60  # seconds between two bytes, not for the whole body

    @classmethod
    def from_json(cls, text: str | None, **limits: Unpack[Limits]) -> UrlPolicy:
        """The policy allowing the networks of `text`, a JSON list of CIDRs (HCX_URL_ALLOW_NETWORKS;
        None or blank allows none), with the given limits."""
        return cls(allow_networks=_parse_networks(text), **limits)


def _parse_networks(text: str | None) -> tuple[IPNetwork, ...]:
    if text is None or not text.strip():
        return ()
    example = '["10.20.0.0/16", "fd12:3456::/48"]'
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HcxError(f"{ALLOW_SETTING} is not valid JSON ({exc.msg}): write a JSON list of CIDRs, "
                       f"e.g. {example}.") from None
    if not isinstance(items, list):
        raise HcxError(f"{ALLOW_SETTING} must be a JSON list of CIDRs, not a {type(items).__name__}: "
                       f"e.g. {example}.")
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise HcxError(f"{ALLOW_SETTING}: {item!r} is not a string: write each network as a CIDR string, "
                           f"e.g. {example}.")
        try:
            networks.append(ipaddress.ip_network(item.strip()))
        except ValueError as exc:
            raise HcxError(f"{ALLOW_SETTING}: {item!r} is not a network ({exc}): write a CIDR such as "
                           f"10.20.0.0/16, with no bits set after the prefix.") from None
    return tuple(networks)


class UrlStream:
    """The body of a fetched URL as a read-only file (for upload_fileobj, HashingReader, ...):
    `read(n)` gives at most n bytes, b"" at the end, and raises HcxError past the policy's max_bytes."""

    def __init__(self, response: httpx.Response, policy: UrlPolicy):
        self.final_url = _shown(response.url)
        self.size = _content_length(response)
        self._policy = policy
        self._chunks = response.iter_raw()
        self._buffer = bytearray()
        self._received = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        while not self._ended and (n is None or n < 0 or len(self._buffer) < n):
            with _errors_as_hcx(self.final_url, self._policy):
                chunk = next(self._chunks, None)
            if chunk is None:
                self._ended = True
                break
            self._received += len(chunk)
            if self._received > self._policy.max_bytes:
                raise _too_big(self.final_url, f"more than {self._policy.max_bytes}", self._policy)
            self._buffer += chunk
        count = len(self._buffer) if n is None or n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data


@contextmanager
def open_url(url: str, policy: UrlPolicy) -> Iterator[UrlStream]:
    """The body of `url` (http or https) once its redirects are followed, through the checks of
    this module; every problem is an HcxError saying what was wrong and what to do."""
    target = _checked_url(url)
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    # No proxy from the environment may carry a hop past the checks: httpx reads none when given a
    # transport, and trust_env=False says so outright.
    with httpx.Client(transport=_CheckedTransport(policy), timeout=timeout, trust_env=False,
                      follow_redirects=False, headers={"Accept-Encoding": "identity"}) as client:
        response = _final_response(client, target, policy)
        try:
            yield UrlStream(response, policy)
        finally:
            response.close()


def _final_response(client: httpx.Client, target: httpx.URL, policy: UrlPolicy) -> httpx.Response:
    """The response to `target` after at most max_redirects checked redirects: 2xx, fitting max_bytes."""
    request = client.build_request("GET", target)
    redirects = 0
    while True:
        with _errors_as_hcx(_shown(request.url), policy):
            response = client.send(request, stream=True)
        if response.next_request is None:
            break
        response.close()
        if redirects == policy.max_redirects:
            raise HcxError(f"{_shown(target)} redirected more than {policy.max_redirects} times (last to "
                           f"{_shown(response.next_request.url)}): give the image's final URL.")
        _check_redirect(response.next_request.url, came_from=request.url)
        request = response.next_request
        redirects += 1
    problem = _unusable(response, policy)
    if problem is not None:
        response.close()
        raise problem
    return response


def _unusable(response: httpx.Response, policy: UrlPolicy) -> HcxError | None:
    """Why the last answer cannot be read as the image, or None if it can."""
    url = _shown(response.url)
    if not response.is_success:
        failed = TransientSourceError if response.status_code >= 500 or response.status_code == 429 else HcxError
        return failed(f"{url} answered HTTP {response.status_code} {response.reason_phrase}: "
                      f"{_advice(response.status_code)}")
    encoding = response.headers.get("Content-Encoding", "identity")
    if encoding.lower() != "identity":
        # Not decoded: one compressed read could inflate a thousandfold, past the memory bound.
        return HcxError(f"{url} sent the image compressed (Content-Encoding: {encoding}) although asked not "
                        f"to: give a URL that serves the file as it is.")
    size = _content_length(response)
    if size is not None and size > policy.max_bytes:
        return _too_big(url, f"{size}", policy)
    return None


def _advice(status: int) -> str:
    if status in (401, 403):
        return "the server wants credentials or refuses access; give a URL that needs none (a pre-signed URL, say)."
    if status == 404:
        return "check the URL: the server has no such file."
    if status >= 500 or status == 429:
        return "the server failed or is busy; try again later or ask its owner."
    return "give a URL that answers the image itself (HTTP 200)."


def _too_big(url: str, size: str, policy: UrlPolicy) -> HcxError:
    return HcxError(f"{url} is {size} bytes, over the {policy.max_bytes}-byte limit for images imported "
                    f"from a URL: make the image smaller or upload it another way.")


def _content_length(response: httpx.Response) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _shown(url: httpx.URL) -> str:
    """`url` for messages and logs: never with its user name or password, nor its query (a
    pre-signed URL's signature is a credential): `?…` says there was one."""
    return unsealed_form(str(url.copy_with(userinfo=b"")))


def _checked_url(text: str) -> httpx.URL:
    """The tenant's URL, if it is one we fetch."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise HcxError(f"The image URL is not a valid URL ({exc}): give an http:// or https:// URL.") from None
    _check_url(url)
    return url


def _check_url(url: httpx.URL) -> None:
    if url.scheme not in SCHEMES:
        got = f"{url.scheme}://" if url.scheme else "no scheme"
        raise HcxError(f"Images are imported from http:// or https:// URLs only, not {got} "
                       f"({_shown(url) if url.scheme else 'a relative URL'}): give an http(s) URL.")
    if url.userinfo:
        raise HcxError(f"The image URL {_shown(url)} carries a user name or password (user:pass@...): "
                       f"they would end up in logs. Give a URL that needs none (a pre-signed URL, say).")
    if not url.host:
        raise HcxError(f"The image URL {_shown(url)} has no host: give a full URL such as https://host/image.qcow2.")


def _check_redirect(url: httpx.URL, *, came_from: httpx.URL) -> None:
    """The rules of a first URL, and no step down from https to plain http."""
    if url.scheme not in SCHEMES:
        raise HcxError(f"{_shown(came_from)} redirected to a {url.scheme or 'scheme-less'} URL; images are "
                       f"imported over http(s) only: give the image's final http(s) URL.")
    if came_from.scheme == "https" and url.scheme == "http":
        raise HcxError(f"{_shown(came_from)} redirected from https to plain http ({_shown(url)}), where the image "
                       f"could be altered on its way: give an https URL that stays https.")
    _check_url(url)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped ::ffff:a.b.c.d, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


def _refused_kind(ip: IPAddress) -> str | None:
    """What makes `ip` unfit for tenant URLs ("a loopback address", ...), or None if it is fine."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        kind = _refused_kind(embedded)
        return None if kind is None else f"{kind} ({embedded}) written in IPv6 form"
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local  # fec0::/10, deprecated
    for label, refused in (("an unspecified address", ip.is_unspecified), ("a loopback address", ip.is_loopback),
                           ("a link-local address (where cloud metadata services answer)", ip.is_link_local),
                           ("a multicast address", ip.is_multicast), ("a site-local address", site_local)):
        if refused:
            return label
    for label, networks in _NAMED_RANGES:
        if any(ip in network for network in networks):
            return label
    if ip.is_reserved or ip.is_private or not ip.is_global:
        return "a special-purpose address (not globally routable)"
    return None


class _CheckedBackend(httpcore.SyncBackend):
    """httpcore's sockets, opened only to addresses a tenant URL may reach (see the module's doc)."""

    def __init__(self, allow_networks: tuple[IPNetwork, ...]):
        self._allow = allow_networks

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        failure: Exception | None = None
        for ip in self._resolve(host, port):
            try:
                stream = super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:  # try the next address
                failure = exc
                continue
            try:
                self._check(ipaddress.ip_address(stream.get_extra_info("server_addr")[0]), host, port)
            except BaseException:
                stream.close()
                raise
            return stream
        assert failure is not None  # _resolve gives at least one address
        raise failure

    def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address of `host`, each checked: one refused address refuses the host."""
        try:
            answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise HcxError(f"Cannot find the address of {host} ({exc.strerror}): check the URL's host name.") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(answer[4][0]) for answer in answers))
        for ip in addresses:
            self._check(ip, host, port)
        return addresses

    def _check(self, ip: IPAddress, host: str, port: int) -> None:
        kind = _refused_kind(ip)
        judged = _embedded_ipv4(ip) or ip
        if kind is None or any(address in network for address in (ip, judged) for network in self._allow):
            return
        shown = host if _is_literal(host, ip) else f"{ip} (the address of {host})"
        example = f"{str(judged).partition('%')[0]}/{judged.max_prefixlen}"  # no IPv6 zone (fe80::1%eth0)
        raise HcxError(f"Refused to connect to {shown}, port {port}: it is {kind}, which images "
                       f"imported from a URL may not come from. If the image really is there, an administrator can "
                       f"allow it by adding its network (e.g. \"{example}\") to {ALLOW_SETTING} "
                       f"(a JSON list of CIDRs).")


def _is_literal(host: str, ip: IPAddress) -> bool:
    """Whether `host` is `ip` written out (::ffff:127.0.0.1 is ::ffff:7f00:1)."""
    try:
        return ipaddress.ip_address(host) == ip
    except ValueError:
        return False


class _CheckedTransport(httpx.BaseTransport):
    """httpx over an httpcore.ConnectionPool that connects through _CheckedBackend, for every hop.

    httpx 0.28's HTTPTransport builds its pool inside __init__ and takes no network backend; rather
    than replace its private `_pool` (if that name changed, the checks would silently go), this is
    the same bridge over public httpx and httpcore API. httpcore's errors pass through unmapped and
    are translated once, into HcxError, by _errors_as_hcx.
    """

    def __init__(self, policy: UrlPolicy):
        # trust_env=False: no SSL_CERT_FILE/SSL_CERT_DIR; certifi's authorities, verified.
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(trust_env=False),
                                             network_backend=_CheckedBackend(policy.allow_networks))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        response = self._pool.handle_request(httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions))
        assert isinstance(response.stream, typing.Iterable)
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Body(response.stream), extensions=response.extensions)

    def close(self) -> None:
        self._pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: typing.Iterable[bytes]):
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


@contextmanager
def _errors_as_hcx(url: str, policy: UrlPolicy) -> Iterator[None]:
    """httpcore's and httpx's errors while fetching `url`, as HcxError (ours pass unchanged)."""
    try:
        yield
    except httpcore.ConnectTimeout as exc:
        raise TransientSourceError(f"Connecting to {url} timed out after {policy.connect_timeout} s (connect "
                                   f"timeout): check the host and port, or try again later.") from exc
    except httpcore.ReadTimeout as exc:
        raise TransientSourceError(f"{url} sent nothing for {policy.read_timeout} s (read timeout): the server "
                                   f"stalled; try again later.") from exc
    except httpcore.WriteTimeout as exc:
        raise TransientSourceError(f"{url} took none of our request for {policy.read_timeout} s (write timeout): "
                                   f"the server stalled; try again later.") from exc
    except httpcore.PoolTimeout as exc:
        raise TransientSourceError(f"No connection for {url} became free in time: try again later.") from exc
    except httpcore.ConnectError as exc:  # a refused port, a name that does not resolve, a bad certificate
        raise HcxError(f"Cannot connect to {url} ({exc}): check the URL, and that the server is up "
                       f"and its certificate valid.") from exc
    except (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError) as exc:  # dropped mid-way
        raise TransientSourceError(f"The connection to {url} broke off ({str(exc) or type(exc).__name__}): "
                                   f"try again later.") from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, httpx.HTTPError) as exc:
        raise HcxError(f"Fetching {url} failed ({str(exc) or type(exc).__name__}): try again; if it fails again, "
                       f"check the URL with its owner.") from exc
