"""Dropping a client's TCP connection at once (the stalled-stream cut, gateway/routes_fn.py).

ASGI has no "abort": an app that returns with its response unfinished makes uvicorn close the connection
gracefully, which waits for uvicorn's write buffer to reach a client that may never read again, and the kernel then
keeps the socket's send queue (up to tcp_wmem's max) behind the FIN. Aborting with SO_LINGER 0 drops both: the
kernel sends a RST and frees the socket now, uvicorn's connection_lost frees the rest.

uvicorn's `send` (httptools and h11 alike) is a bound method of its per-request cycle, which holds the transport;
that is how the transport is reached, at cut time only, so the hot path pays nothing. `FastPath` passes the raw
`send` to `POST /fn` handlers; routes behind Starlette get a wrapped `send`, so `FastPath` leaves the raw one in
the scope under `RAW_SEND` for them. Under another ASGI server (or Starlette's TestClient) nothing is found and the
cut stays the graceful close it was.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

log = logging.getLogger("cocoon.gateway")

RAW_SEND = "cocoon.raw_send"  # scope key: the server's own `send`, for routes whose `send` a middleware wrapped
_LINGER_0 = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}: close() sends RST, drops the queue


def abort_connection(scope: Any, send: Any) -> bool:
    """Reset the request's TCP connection now, discarding what is queued for the client. False (and nothing done)
    when the server's transport cannot be found."""
    raw = scope.get(RAW_SEND, send)
    transport: Any = getattr(getattr(raw, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        log.debug("cannot reach the connection's transport under this ASGI server; closing gracefully")
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        except (OSError, AttributeError, TypeError):  # already closed, or a socket stand-in without options:
            pass  # the abort still frees uvicorn's buffer and the descriptor
    abort()
    return True
