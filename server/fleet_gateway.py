"""The only door banks get: a TLS listener that forwards the Fleet API and nothing else.

Flower 1.41 serves the Fleet, Control and Runtime APIs of a SuperLink on ONE HTTP(S) port, and its
open-source edition authenticates neither the Control API (submit, stop, list runs; register
nodes) nor the Runtime task hand-out in subprocess isolation. Anyone who can reach that port and
holds the CA certificate, which every bank has, could start runs or register nodes. So the
SuperLink listens on 127.0.0.1 only, and this gateway, listening where banks can reach it,
forwards `POST /v1/fleet/*` (SuperNode traffic, authenticated by the SuperNode keys) and
`GET/HEAD /health` to it. Everything else gets 404 without touching the SuperLink.

Requests and responses are streamed, never buffered whole: model updates may be hundreds of MB.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import uvicorn

FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
# Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection and are not forwarded;
# content-length is recomputed for the streamed body.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
CONNECT_TIMEOUT_S = 10.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_forwarded(method: str, path: str) -> bool:
    """The allow-list: SuperNode calls and the health probe."""
    if path.startswith(FLEET_PREFIX) and ".." not in path:
        return method == "POST"
    return path == HEALTH_PATH and method in ("GET", "HEAD")


class FleetGateway:
    """An ASGI app that forwards allowed requests to the loopback SuperLink."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool) -> None:
        self.upstream = upstream
        self.verify = verify
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(
                    base_url=self.upstream,
                    verify=self.verify,
                    timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if not is_forwarded(method, path) or self.client is None:
            await _respond(send, 404, b"not found\n")
            return

        async def body() -> AsyncIterator[bytes]:
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    return
                yield event.get("body", b"")
                if not event.get("more_body", False):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        # Forward exactly the path that was checked, without a query string (Flower sends none).
        request = self.client.build_request(method, path, headers=headers, content=body() if method == "POST" else None)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError:
            await _respond(send, 502, b"SuperLink unavailable\n")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _respond(send: Send, status: int, text: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": text})


def upstream_verify(ca_cert: str | None) -> ssl.SSLContext | bool:
    """Verify the loopback SuperLink against the consortium CA (False only in --insecure mode)."""
    if ca_cert is None:
        return False
    return ssl.create_default_context(cafile=ca_cert)


def main(argv: list[str] | None = None) -> None:
    """Run the gateway in the foreground (started and stopped by `fingpt-server`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="address banks dial, e.g. 0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True, help="the SuperLink's loopback port")
    parser.add_argument("--ca", help="CA certificate (omit with --insecure)")
    parser.add_argument("--cert", help="server certificate presented to banks")
    parser.add_argument("--key", help="server private key")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    args = parser.parse_args(argv)
    if not args.insecure and not (args.ca and args.cert and args.key):
        parser.error("--ca, --cert and --key are required unless --insecure")
    scheme = "http" if args.insecure else "https"
    gateway = FleetGateway(
        f"{scheme}://127.0.0.1:{args.upstream_port}", upstream_verify(None if args.insecure else args.ca)
    )
    uvicorn.run(
        gateway,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        ssl_certfile=None if args.insecure else args.cert,
        ssl_keyfile=None if args.insecure else args.key,
    )


if __name__ == "__main__":
    main()
