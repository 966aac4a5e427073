"""Request bodies as files: boto3 reads a sync file object in threads of its own (s3transfer's), the
body arrives on the event loop. `BodyReader.read` pulls the next chunk from the loop (anyio.from_thread,
with the loop's token, since s3transfer's threads are not anyio's), so bytes pass through with
bounded memory (what s3transfer holds per part) and never touch a local disk."""

from __future__ import annotations

from typing import AsyncIterator

import anyio.from_thread
import anyio.lowlevel
from fastapi import Request

from catalog.model import Refused


def declared_length(request: Request) -> int:
    """The body's size, which every upload must declare (parts are sized from it)."""
    text = request.headers.get("content-length")
    if text is None or not text.isdigit():
        raise Refused("An upload must declare its size: send a Content-Length header (no chunked encoding).")
    return int(text)


class BodyReader:
    """A read-only file over a request body, for any thread; made on the event loop."""

    def __init__(self, chunks: AsyncIterator[bytes], length: int):
        self._loop = anyio.lowlevel.current_token()
        self._chunks = chunks.__aiter__()
        self._pending = b""
        self._ended = False
        self.length = length
        self.received = 0

    async def _next(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""

    def read(self, size: int = -1) -> bytes:
        wanted = self.length - self.received + 1 if size is None or size < 0 else size
        pieces, held = [self._pending], len(self._pending)
        while held < wanted and not self._ended:  # s3transfer asks for whole parts: gather, do not re-copy
            chunk = anyio.from_thread.run(self._next, token=self._loop)
            if not chunk:
                self._ended = True
            pieces.append(chunk)
            held += len(chunk)
        data = b"".join(pieces)
        out, self._pending = data[:wanted], data[wanted:]
        self.received += len(out)
        if self.received > self.length:
            raise Refused(f"The body is longer than its Content-Length ({self.length} bytes): send the file again.")
        return out

    def check_complete(self) -> None:
        """A client that went away mid-body leaves a short object: refuse it."""
        if self.received != self.length:
            raise Refused(f"The upload ended after {self.received} of {self.length} bytes (the connection was cut): "
                          "send the file again.")
