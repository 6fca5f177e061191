"""The audit line: one JSON object per unwrap, fields capped, written directly while the
sidecar's own handler is alone on the logger and through logging otherwise."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from kustody.sidecar.unwrap import audit

RECORD = audit.AuditRecord(
    namespace="shop",
    service_account="orders-api",
    pod="orders-api-7d9c-x",
    request_namespace="shop",
    data_key="x" * 300,
    key_ring="payments",
    version=2,
    outcome="ok",
    reason="",
    latency_ms=1.84,
    peer="ipv4:10.1.2.3:41234",
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    logger = logging.getLogger(audit.AUDIT_LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate, audit._direct)
    logger.handlers = []
    out = io.StringIO()
    audit.configure(out)
    try:
        yield out
    finally:
        logger.handlers, logger.level, logger.propagate, audit._direct = saved


def test_one_json_line_per_record_with_capped_fields(stream: io.StringIO) -> None:
    audit.emit(RECORD)
    audit.emit(RECORD)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    fields = json.loads(lines[0])
    assert fields["event"] == "unwrap"
    assert fields["ts"].endswith("Z")
    assert fields["data_key"] == "x" * 253
    assert fields["version"] == 2
    assert fields["latency_ms"] == 1.84
    assert list(fields)[2:] == list(audit._FIELDS)


def test_other_handlers_get_the_lines_through_logging(stream: io.StringIO) -> None:
    logger = logging.getLogger(audit.AUDIT_LOGGER)
    extra = io.StringIO()
    handler = logging.StreamHandler(extra)
    logger.addHandler(handler)
    try:
        audit.emit(RECORD)
    finally:
        logger.removeHandler(handler)
    assert json.loads(stream.getvalue()) == json.loads(extra.getvalue())


def test_a_raised_level_silences_the_direct_path(stream: io.StringIO) -> None:
    logging.getLogger(audit.AUDIT_LOGGER).setLevel(logging.WARNING)
    audit.emit(RECORD)
    assert stream.getvalue() == ""
