"""What `fingpt-infer serve` checks before the app reads a request: the API key, the body's size and its time to arrive.

`Guard` is ASGI middleware: with an API key set, every path but /health needs
`Authorization: Bearer KEY` (or `X-API-Key: KEY`), compared in constant time, else 401; a body
larger than `max_body_bytes` is refused with 413, from its Content-Length before anything is
read or, without one (chunked), as soon as the bytes received pass the limit; a body still
incomplete after `body_timeout_s` gets 408. Only then is the request handed to the app, with
the body read into memory (at most `max_body_bytes`). Every refusal names the limit or the
header, never what was sent.
"""

from __future__ import annotations

import asyncio
import hmac
import stat
from collections.abc import Sequence
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fingpt_federated.infer.problems import problem_response

OPEN_PATHS = ("/health",)
MIN_KEY_CHARS = 16


def read_api_key(path: Path) -> bytes:
    """The key in `path` (surrounding whitespace ignored): a file only its owner can read, 16+ printable characters."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the API key file ({error.__class__.__name__})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: the API key file is readable by others; run chmod 600 {path}")
    if len(text) < MIN_KEY_CHARS or not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError(f"{path}: an API key is one line of at least {MIN_KEY_CHARS} printable ASCII characters")
    return text.encode("ascii")


class _TooLarge(Exception):
    pass


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        api_key: bytes | None = None,
        open_paths: Sequence[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.api_key = api_key
        self.open_paths = tuple(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            try:
                body = await asyncio.wait_for(self._read(receive), self.body_timeout_s)
            except _TooLarge:
                refusal = self._too_large()
            except TimeoutError:
                refusal = problem_response(
                    408, [{"loc": ["body"], "msg": f"the body did not arrive within {self.body_timeout_s} s"}]
                )
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in self.open_paths and not self._authorised(headers):
            return problem_response(
                401,
                [{"loc": ["header", "authorization"], "msg": "missing or wrong API key (Authorization: Bearer KEY)"}],
                {"WWW-Authenticate": "Bearer"},
            )
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return problem_response(400, [{"loc": ["header", "content-length"], "msg": "not a number of bytes"}])
        if int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        authorization = headers.get(b"authorization", b"")
        scheme, _, token = authorization.partition(b" ")
        offered = token.strip() if scheme.lower() == b"bearer" else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(offered, self.api_key)

    def _too_large(self) -> JSONResponse:
        problem = {
            "loc": ["body"],
            "msg": f"body over the limit of {self.max_body_bytes} bytes (--max-body-bytes)",
            "limit": {"max_body_bytes": self.max_body_bytes},
        }
        return problem_response(413, [problem])

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away; the app sees an empty body
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read in one message, then whatever the connection says next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
