"""One JSON line per unwrap on the ``kustody.audit`` logger: who, which DataKey, version,
outcome, latency. Never the token, never key material (neither is ever passed in here)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, TextIO

AUDIT_LOGGER = "kustody.audit"
_log = logging.getLogger(AUDIT_LOGGER)
_MAX_FIELD = 253


@dataclass(frozen=True)
class AuditRecord:
    namespace: str  # the caller's, from the verified token ("" when not authenticated)
    service_account: str
    pod: str
    request_namespace: str  # what the caller asked for (may differ: then refused)
    data_key: str
    key_ring: str
    version: int
    outcome: str  # "ok", "refused" or "cancelled" (the caller left: no answer was sent)
    reason: str  # "" when ok, else the reason sent to the caller (or CANCELLED /
    # DEADLINE_EXCEEDED)
    latency_ms: float
    peer: str


CANCELLED_REASONS = frozenset({"CANCELLED", "DEADLINE_EXCEEDED"})


def outcome_of(reason: str) -> str:
    """``ok``, ``cancelled`` or ``refused`` for an outcome that is "ok" or a reason."""
    if reason == "ok":
        return "ok"
    return "cancelled" if reason in CANCELLED_REASONS else "refused"


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_FIELDS = tuple(f.name for f in fields(AuditRecord))
_direct: logging.StreamHandler[TextIO] | None = None  # configure()'s handler
_clock: list[Any] = [-1, ""]  # (second, its timestamp text): one strftime per second


def _timestamp() -> str:
    now = int(time.time())
    if _clock[0] != now:
        _clock[:] = [now, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))]
    text: str = _clock[1]
    return text


def line(record: AuditRecord) -> str:
    """The JSON line (without newline) for ``record``; string fields capped at 253 characters."""
    out: dict[str, Any] = {"ts": _timestamp(), "event": "unwrap"}
    for name in _FIELDS:
        value = getattr(record, name)
        out[name] = value[:_MAX_FIELD] if isinstance(value, str) else value
    text: str = _ENCODER.encode(out)
    return text


def emit(record: AuditRecord) -> None:
    text = line(record)
    handler = _direct
    if (
        handler is not None
        and _log.handlers == [handler]
        and not (_log.filters or handler.filters)
        and handler.level <= logging.INFO
    ):
        # The usual case, configure()'s handler alone: write the line directly (one write),
        # not through a LogRecord (most of the cost of an audit line). Anything else that
        # was set up on the logger (other handlers, filters, a level) goes the logging way.
        if _log.disabled or not _log.isEnabledFor(logging.INFO):
            return
        with handler.lock or contextlib.nullcontext():
            handler.stream.write(text + "\n")
            handler.stream.flush()
        return
    _log.info(text)


def configure(stream: TextIO = sys.stderr) -> None:
    """Write audit records as bare JSON lines (no log prefix) and keep them out of the
    application log, so a log shipper can parse them as they are."""
    if any(getattr(h, "_kustody_audit", False) for h in _log.handlers):
        return
    global _direct
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._kustody_audit = True  # type: ignore[attr-defined]
    _log.addHandler(handler)
    _direct = handler
    _log.setLevel(logging.INFO)
    _log.propagate = False
