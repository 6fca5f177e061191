"""One JSON line per unwrap on the ``kustody.audit`` logger: who, which DataKey, version,
outcome, latency. Never the token, never key material (neither is ever passed in here)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

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
    outcome: str  # "ok" or "refused"
    reason: str  # "" when ok, else the reason sent to the caller
    latency_ms: float
    peer: str


def emit(record: AuditRecord) -> None:
    fields = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": "unwrap",
        **{k: v[:_MAX_FIELD] if isinstance(v, str) else v for k, v in asdict(record).items()},
    }
    _log.info(json.dumps(fields, separators=(",", ":"), ensure_ascii=True))


def configure(stream: TextIO = sys.stderr) -> None:
    """Write audit records as bare JSON lines (no log prefix) and keep them out of the
    application log, so a log shipper can parse them as they are."""
    if any(getattr(h, "_kustody_audit", False) for h in _log.handlers):
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._kustody_audit = True  # type: ignore[attr-defined]
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False
