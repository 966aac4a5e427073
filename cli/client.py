"""The image API as the CLI sees it: where it is (HCX_API_URL, default the local stack's), who
the CLI is (HCX_TOKEN, default the token file `hcx-image up` writes under HCX_HOME), and its
answers as Python values or clear errors. The CLI holds no database URL and no S3 key."""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from catalog import DEFAULT_HOME
from catalog.model import HcxError

TOKEN_FILE = "token"  # under HCX_HOME, mode 600, written by `hcx-image up`
IDEMPOTENCY_HEADER = "Idempotency-Key"  # a request carrying one gets the first answer when sent again
ATTEMPTS = 3  # a request that may be sent again, which timed out (60 s) or was told to ask again, in all
LONGEST_RETRY_AFTER = 10.0  # seconds


class ApiError(HcxError):
    """The API refused or failed: its message (what was wrong, what to do), its status and body."""

    def __init__(self, message: str, status: int = 0, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


def setting(name: str) -> str | None:
    """`HCX_<NAME>` from the environment, else from `./.env`, as the service's settings read it.
    (The CLI reads its three settings itself: pydantic-settings would cost every command ~90 ms of
    imports, a third of its start-up.)"""
    variable = f"HCX_{name.upper()}"
    value = os.environ.get(variable)
    if value is None and Path(".env").is_file():
        from dotenv import dotenv_values

        value = dotenv_values(".env").get(variable)
    return value or None


def home() -> Path:
    """$HCX_HOME: the local stack's state, the token `up` writes, the notes of unfinished uploads."""
    return Path(setting("home") or DEFAULT_HOME).expanduser()


def api_url() -> str:
    configured = setting("api_url")
    if configured:
        return configured.rstrip("/")
    from cli.stack import load_state

    url = load_state(home()).api_url
    if not url:
        raise HcxError("No image API is configured and none runs here: `hcx-image up` starts one, or set "
                       "HCX_API_URL to the service's address.")
    return url


def token() -> str:
    configured = setting("token")
    if configured is not None:
        return configured
    path = home() / TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError:
        raise HcxError(f"No API token: set HCX_TOKEN, or run `hcx-image up` (it writes {path} for the user who "
                       "runs it); an administrator prints one with `hcx-image user token NAME`.") from None


def tls_for(url: str) -> ssl.SSLContext | bool:
    """Verified TLS for an https API. A plain-http API gets a context with no CA loaded, which no
    certificate can pass: loading the CA bundle costs every command 16 ms for a handshake that
    never happens, and nothing is trusted should one be attempted."""
    return True if url.lower().startswith("https:") else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


_remote: bool | None = None  # --remote/--local for this invocation


def use_remote(remote: bool | None) -> None:
    global _remote
    _remote = remote


def remote_requested() -> bool:
    """Whether this invocation sends operations to a worker (--remote): the CLI then answers with
    the flow run at once instead of waiting for the worker to pick it up."""
    return bool(_remote)


def remote_param() -> dict[str, Any]:
    return {} if _remote is None else {"remote": str(_remote).lower()}


def raise_for_answer(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    try:
        body = response.json()
        message = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        body, message = {}, None
    if not isinstance(message, str):
        message = f"the image API answered {response.status_code}: {response.text[:500]}"
    raise ApiError(message, response.status_code, body if isinstance(body, dict) else {})


class Api:
    """One HTTP client per command, with the caller's token."""

    def __init__(self, base_url: str | None = None, bearer: str | None = None):
        self.base_url = base_url or api_url()
        self.http = httpx.Client(base_url=f"{self.base_url}/api/v1", timeout=httpx.Timeout(60, connect=10),
                                 verify=tls_for(self.base_url),
                                 headers={"Authorization": f"Bearer {bearer or token()}"})

    def call(self, method: str, path: str, **kwargs) -> Any:
        # A request that changes nothing when sent again (a read, or one carrying an idempotency key)
        # is sent again when it timed out or the service said to ask again (Retry-After): the
        # service waits on Prefect, whose SQLite stalls up to 60 s under load.
        again_safe = method == "GET" or IDEMPOTENCY_HEADER in (kwargs.get("headers") or {})
        attempts = ATTEMPTS if again_safe else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                if attempt == attempts:
                    raise self._unanswered(exc) from None
                continue
            except httpx.TransportError as exc:
                raise self._unanswered(exc) from None
            wait = response.headers.get("Retry-After")
            if response.is_success or wait is None or attempt == attempts:
                break
            time.sleep(min(float(wait) if wait.isdigit() else 1.0, LONGEST_RETRY_AFTER))
        raise_for_answer(response)
        return response.json() if response.content else None

    def _unanswered(self, exc: Exception) -> HcxError:
        return HcxError(f"The image API at {self.base_url} does not answer ({exc.__class__.__name__}): "
                        "`hcx-image status` says what runs; `hcx-image up` starts it.")

    def get(self, path: str, **params) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None, *, headers: dict[str, str] | None = None, **params) -> Any:
        return self.call("POST", path, json=body, headers=headers,
                         params={k: v for k, v in params.items() if v is not None})

    def put(self, path: str, body: dict) -> Any:
        return self.call("PUT", path, json=body)

    def delete(self, path: str, **params) -> Any:
        return self.call("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    def send_file(self, path: str, file: Path, *, params: dict, progress: Callable[[int], None],
                  headers: dict[str, str] | None = None, chunk: int = 1024 * 1024) -> Any:
        """POST the file as the body, streamed in chunks (never read whole), advancing `progress`."""
        size = file.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(file, "rb") as source:
                while data := source.read(chunk):
                    progress(len(data))
                    yield data

        headers = {**(headers or {}), "Content-Length": str(size), "Content-Type": "application/octet-stream"}
        return self.call("POST", path, content=chunks(), headers=headers,
                         params={k: v for k, v in params.items() if v is not None},
                         timeout=httpx.Timeout(None, connect=10))

    def stream(self, path: str):
        """A streaming GET (use as a context manager; `raise_for_answer` already checked it)."""
        return _Stream(self, path)


class _Stream:
    def __init__(self, api: Api, path: str):
        self.api, self.path = api, path

    def __enter__(self) -> httpx.Response:
        self._context = self.api.http.stream("GET", self.path, timeout=httpx.Timeout(None, connect=10))
        response = self._context.__enter__()
        try:
            raise_for_answer(response)
        except BaseException:
            self._context.__exit__(None, None, None)
            raise
        return response

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
