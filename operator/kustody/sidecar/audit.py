"""One JSON line per audited KeyService call on the ``kustody.hsm.audit`` logger.

Fields: ``rpc``, ``peer`` (``unix`` or the client certificate identity), ``role``,
``key_ring``, ``version`` (0 when the call names none), ``items`` (batches), ``outcome``
(``ok``, ``cancelled`` or the stable reason), and for ExportEscrow ``agent`` (the escrow
agent's key fingerprint). Never key material, plaintext, envelopes or
bindings: none of them is ever passed in here.

Audited (see :func:`kustody.sidecar.servicer.audited`): every call of CreateKeyVersion,
SetVersionState, DestroyVersion and Decrypt, every call that asks for plaintext, every call
from a remote (TCP) peer except Health, and every refusal by policy (PERMISSION_DENIED,
PLAINTEXT_EXPORT_FORBIDDEN, KEY_NOT_TRUSTED, DESTRUCTION_NOT_DUE, VERSION_NOT_DISABLED).
"""

from __future__ import annotations

import json
import logging

AUDIT_LOGGER = "kustody.hsm.audit"  # the log stream name users filter on; kept across the move
_log = logging.getLogger(AUDIT_LOGGER)
_log.setLevel(logging.INFO)  # audit lines are written whatever --log-level says
_MAX_FIELD = 253
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def line(
    *,
    rpc: str,
    peer: str,
    role: str,
    key_ring: str,
    version: int,
    items: int,
    outcome: str,
    agent: str = "",
) -> str:
    record = {
        "event": "hsm",
        "rpc": rpc,
        "peer": peer[:_MAX_FIELD],
        "role": role,
        "key_ring": key_ring[:_MAX_FIELD],
        "version": version,
        "items": items,
        "outcome": outcome,
    }
    if agent:
        record["agent"] = agent[:_MAX_FIELD]
    text: str = _ENCODER.encode(record)
    return text


def emit(
    *,
    rpc: str,
    peer: str,
    role: str,
    key_ring: str,
    version: int,
    items: int,
    outcome: str,
    agent: str = "",
) -> None:
    _log.info(
        "%s",
        line(
            rpc=rpc,
            peer=peer,
            role=role,
            key_ring=key_ring,
            version=version,
            items=items,
            outcome=outcome,
            agent=agent,
        ),
    )
