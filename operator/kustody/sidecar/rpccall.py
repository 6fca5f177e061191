"""Serving one RPC: typed errors become statuses, every outcome is counted and timed."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kustody.api.errors import HsmError, Reason, from_domain
from kustody.api.rpcerror import Context, abort
from kustody.domain.errors import DomainError
from kustody.sidecar.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


async def observed(
    metrics: Metrics, op: str, context: Context, work: Callable[[], Awaitable[T]]
) -> T:
    """Run one RPC: typed errors become statuses; every outcome is counted and timed."""
    start = time.perf_counter()
    # "ok" only once the response exists: a cancelled call (client gone, deadline passed)
    # raises CancelledError, which none of the handlers below catches.
    outcome = "cancelled"
    try:
        result = await work()
        outcome = "ok"
        return result
    except HsmError as exc:
        outcome = str(exc.reason)
        log.info("%s failed: %s", op, exc)
        await abort(context, exc)
    except DomainError as exc:
        error = from_domain(exc)
        outcome = str(error.reason)
        log.info("%s failed: %s", op, error)
        await abort(context, error)
    except Exception:
        outcome = str(Reason.INTERNAL)
        log.exception("%s failed unexpectedly", op)
        await abort(context, HsmError(Reason.INTERNAL, f"{op} failed; see the sidecar log"))
    finally:
        metrics.observe(op, outcome, time.perf_counter() - start)
