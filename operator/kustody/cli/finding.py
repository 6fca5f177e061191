"""What ``kustody doctor`` found, and what its checks are told."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OK, WARNING, ERROR, SKIPPED = "ok", "warning", "error", "skipped"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    message: str
    fix: str | None = None
    object: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "fix": self.fix,
            "object": self.object,
        }


@dataclass
class Options:
    namespace: str = "kustody-system"
    lease_name: str = "kustody-operator"
    service_account: str = "kustody"
    crds_dir: Path | None = None
    hsm: Any = None  # a kustody.api.client.HsmClient, made by doctor in its event loop
    hsm_where: str = ""
    unwrap_endpoint: str | None = None
    unwrap_cert: Path | None = None
    unwrap_names: Sequence[str] = ()
    cert_warn: dt.timedelta = dt.timedelta(days=30)
    destroy_window: dt.timedelta = dt.timedelta(days=7)
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
