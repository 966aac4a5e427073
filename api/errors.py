"""How refusals and failures become HTTP answers: always `{"detail": "<what was wrong and what to do>"}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from catalog.model import ChecksumMismatch, ConcurrentChange, HcxError, TransientStorageError, NotFound, PermissionDenied, Refused, StorageError

log = logging.getLogger("hcx.api")

# Most specific first: NotFound and PermissionDenied are Refused too.
STATUS_OF = (
    (ChecksumMismatch, 422),  # the bytes sent are not the ones the request named
    (NotFound, 404),
    (PermissionDenied, 403),
    (Refused, 409),
    (ConcurrentChange, 409),
    (TransientStorageError, 503),  # the datastore is away for a moment: send the same request again
    (StorageError, 502),
    (HcxError, 400),
)


def status_of(exc: HcxError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(exc, kind))


# Answers worth asking again in a moment (a race lost, the same request still at work, a datastore
# away): they say so in Retry-After, which a client that may send its request again follows.
ASK_AGAIN = (ConcurrentChange, TransientStorageError)
ASK_AGAIN_AFTER = "1"  # seconds


def _field(location: tuple) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request body"


def describe_validation(exc: RequestValidationError | ValidationError) -> str:
    """One sentence per problem: which field, what is wrong with it."""
    problems = []
    for error in exc.errors():
        message = error.get("msg", "is not valid")
        message = message.removeprefix("Value error, ")
        problems.append(f"{_field(tuple(error.get('loc', ())))}: {message}")
    return "Malformed request: " + "; ".join(problems) + ". See /docs for the request's shape."


def install(app: FastAPI) -> None:
    @app.exception_handler(HcxError)
    async def refused(request: Request, exc: HcxError) -> JSONResponse:
        again = {"Retry-After": ASK_AGAIN_AFTER} if isinstance(exc, ASK_AGAIN) else None
        return JSONResponse({"detail": str(exc), **getattr(exc, "extra", {})}, status_code=status_of(exc),
                            headers=again)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)

    @app.exception_handler(ValidationError)
    async def invalid(request: Request, exc: ValidationError) -> JSONResponse:
        # A request model built from a body the edge let through (its rules are the catalog's):
        # still the caller's input, so a 422 that names the field, never a 500.
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the service's log only: it may name internals a tenant should not see.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "The image service failed on this request; its log (api.log) says why. "
                                       "Try again; report it if it persists."}, status_code=500)
