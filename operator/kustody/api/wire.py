"""Framing between the sidecar's front end and its PKCS#11 worker process.

One frame = a 9-byte header (body length u32, request id u32, op or status u8, big-endian)
followed by the body: a ``marshal`` encoding of a tuple of primitives (bytes, str, int, bool,
None, tuples/lists of those). ``marshal`` is the interpreter's own C encoder for exactly those
types: no arbitrary objects are built on load (unlike pickle) and it is several times faster
than a Python-level struct loop over a 1000-item batch. Both ends are the same interpreter
(the worker is started with ``sys.executable``), so the marshal format always matches.

Requests name an :class:`Op`; the worker answers each with the same request id, in order.
Batch operations (GENERATE, REWRAP, DECRYPT) take a sequence of items and answer one result
per item, where an item's error is a ``(reason, message)`` pair of strings.
A response body is ``(result, health, snapshot)``: ``health`` and ``snapshot`` are None unless
they changed since the previous response, so the front end mirrors both without asking.

Bodies are at most :data:`MAX_BODY_BYTES`, enforced on both sides: :func:`frame` refuses to
build a larger one (``REQUEST_TOO_LARGE``, so a caller gets a typed error and nothing is sent);
a worker that reads a larger header answers that request with ``REQUEST_TOO_LARGE`` and exits
(its stream can no longer be trusted; the front end restarts it); the front end fails the
request a larger answer belongs to with ``REQUEST_TOO_LARGE`` and skips its body.

Nothing here is logged. Bodies carry wrapped keys, AAD bytes and, only where an API returns
it, plaintext.
"""

from __future__ import annotations

import enum
import marshal
import struct
from typing import Any

from kustody.api.errors import HsmError, Reason

HEADER = struct.Struct(">IIB")
HEADER_BYTES = HEADER.size
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 1000-item batch of 4 KiB KMS seeds is far below this

STATUS_OK = 0
STATUS_ERROR = 1


class Op(enum.IntEnum):
    CHECK = 1  # (force,) -> None; the response always carries health
    CREATE = 2  # (ring, version) -> info
    SET_STATE = 3  # (ring, version, state) -> info
    DESTROY = 4  # (ring, version) -> info
    DESCRIBE = 5  # (ring,) -> (primary | None, (info, ...))
    INFO = 6  # (ring, version | None) -> info
    GENERATE = 7  # ((ring, version | None, length, with_plaintext, binding), ...) -> items
    DECRYPT = 8  # ((ring, version, nonce, sealed, aad), ...) -> (plaintext | error, ...)
    REWRAP = 9  # ((ring, version, nonce, sealed, binding, to_version | None), ...) -> items
    # (ring, version | None, plaintext) -> (info, nonce, sealed), bound to the KMS key_id; or a
    # list of such triples (coalesced KMS Encrypts) -> one (info, nonce, sealed) or error each
    SEAL = 10
    RESCAN = 11  # () -> None: forget cached handles and rescan the token (as a restart would)
    EXPORT_ESCROW = 12  # (ring, version, agent fingerprint) -> (wrapped bytes, check value)
    AGENT = 13  # (agent fingerprint,) -> bool: the token holds it as a trusted wrapping key


# info on the wire: (ring, version, state, fingerprint)
WireInfo = tuple[str, int, str, str, bool]
# health on the wire: (serving, reason or "", message)
WireHealth = tuple[bool, str, str]


def too_large(size: int, what: str) -> HsmError:
    return HsmError(
        Reason.REQUEST_TOO_LARGE,
        f"{what} of {size} bytes between the sidecar and its PKCS#11 worker exceeds the "
        f"{MAX_BODY_BYTES}-byte frame limit",
    )


def frame(request_id: int, code: int, body: Any) -> bytes:
    """One frame; HsmError(REQUEST_TOO_LARGE) if the body exceeds :data:`MAX_BODY_BYTES`."""
    data = marshal.dumps(body)
    if len(data) > MAX_BODY_BYTES:
        raise too_large(len(data), "a message")
    return HEADER.pack(len(data), request_id, code) + data


def load(data: bytes | bytearray | memoryview) -> Any:
    # Only our own peer (parent or child over a private socketpair) writes these bytes.
    return marshal.loads(data)  # noqa: S302
