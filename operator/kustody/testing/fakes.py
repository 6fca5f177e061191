"""In-memory fakes of everything a Kustody reconciler talks to, for tests that run in
milliseconds (like httpx's ``MockTransport``): no API server, no sidecar, no token.

- :class:`FakeKube` — the Kubernetes API (:class:`kustody.kube.protocol.KubeApi`): objects
  with resourceVersion and generation bookkeeping, merge and JSON patches, the status
  subresource, optimistic concurrency (``Conflict``), label selectors, metadata-only lists,
  finalizers and owner-reference garbage collection, injected failures and a log of calls.
- :class:`FakeKeyService` — the sidecar's KeyService (:class:`kustody.controller.ports.
  KeyService`): KEK versions with their states, fingerprints and the token's own waiting
  period before a destruction; data keys sealed with AES-256-GCM in the real envelope format
  (:mod:`kustody.domain.envelope`) and bound to their place (:mod:`kustody.domain.aad`), so a
  wrong binding fails exactly as in the sidecar; the same :class:`~kustody.api.errors.Reason`
  codes; injected failures.
- :class:`RecordingEvents` — Events, recorded instead of posted.
- :class:`ManualClock` — the time reconcilers see, and the work queue's monotonic clock;
  moved only by the test.
- :class:`FakeOperator` — a :class:`~kustody.controller.runtime.Runtime` wired to the fakes,
  plus what the operator process does around the reconcilers: watch events into the stores
  (through :mod:`kustody.controller.events`, the operator's own handlers) and workers
  taking due keys off the queue.

A test::

    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("payments", ["shop"]))
    op.kube.add(DATAKEYS, datakey("db", "shop", "payments"))
    await op.run_until_idle()
    assert op.hsm.state("payments", 1) is VersionState.ENABLED
    assert condition(op.kube.object(DATAKEYS, "db", "shop"), "Ready")["reason"] == "KeyAvailable"
    assert "Created" in op.events.reasons("payments")
    op.hsm.set_unavailable()                       # faults: hsm.fail_next, kube.fail_next
    await op.advance(hours=24)                     # time moves only when the test says so

Importing this module loads neither ``kubernetes``, ``kopf`` nor ``pkcs11``, and neither do
the reconcilers and event handlers :class:`FakeOperator` imports when it first needs them
(import-linter holds the controller's reconcilers to that).
"""

from __future__ import annotations

import base64
import builtins
import datetime as dt
import hashlib
import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kustody.api.client import (
    Binding,
    DataKey,
    EscrowPackageReply,
    GenerateItem,
    Health,
    HsmError,
    KeyDescription,
    Reason,
    ReWrapped,
    VersionInfo,
    VersionState,
)
from kustody.api.errors import from_domain
from kustody.controller.metrics import OperatorMetrics
from kustody.controller.runtime import (
    DATAKEY,
    ESCROW_AGENT,
    KEYRING,
    POLICY,
    QueueKey,
    Runtime,
)
from kustody.controller.workqueue import WorkQueue
from kustody.domain.aad import associated_data
from kustody.domain.envelope import (
    MAX_DEK_BYTES,
    MIN_DEK_BYTES,
    NONCE_BYTES,
    Envelope,
    header_for,
)
from kustody.domain.errors import DomainError
from kustody.domain.escrow import MECHANISM as ESCROW_MECHANISM
from kustody.domain.keyversion import (
    DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    KeyVersionRef,
    primary_version,
    settable,
    validate_key_ring,
)
from kustody.domain.secret import MANAGED_BY, MANAGER
from kustody.domain.timestamps import format_time
from kustody.kube.errors import Conflict, KubeError, NotFound, Unavailable
from kustody.kube.protocol import JSON_PATCH, MERGE_PATCH
from kustody.kube.resources import (
    DATAKEYS,
    ESCROW_AGENTS,
    KEYRINGS,
    NAMESPACES,
    ROTATION_POLICIES,
    SECRETS,
    Resource,
)

__all__ = [
    "Call",
    "FakeKeyService",
    "FakeKube",
    "FakeOperator",
    "HsmCall",
    "ManualClock",
    "Outcome",
    "RecordedEvent",
    "RecordingEvents",
    "api_error",
    "condition",
    "datakey",
    "keyring",
    "reconcilers",
    "rotation_policy",
    "secret_entries",
    "selector_matches",
]


_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


# -- time ----------------------------------------------------------------------------------


class ManualClock:
    """A clock that moves only when told: ``clock()`` is the aware UTC datetime reconcilers
    decide with (:data:`kustody.controller.ports.Clock`), ``clock.monotonic()`` the seconds
    the work queue schedules with. Both move together, and only forward."""

    def __init__(self, start: dt.datetime = _EPOCH) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime (UTC)")
        self._now = start.astimezone(dt.UTC)
        self._monotonic = 1000.0

    def __call__(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float = 0.0, **delta: float) -> dt.datetime:
        """Move forward by ``seconds`` plus any ``timedelta`` keywords (hours=1, days=30)."""
        step = dt.timedelta(seconds=seconds, **delta)
        if step < dt.timedelta(0):
            raise ValueError("a ManualClock only moves forward")
        self._now += step
        self._monotonic += step.total_seconds()
        return self._now

    def set(self, when: dt.datetime) -> dt.datetime:
        """Jump to ``when`` (not before the current time)."""
        return self.advance((when - self._now).total_seconds())


# -- Events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedEvent:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str
    kind: str
    namespace: str | None
    name: str
    uid: str


class RecordingEvents:
    """:class:`kustody.controller.ports.Events` that records every call (no deduplication:
    the real recorder drops repeats within five minutes, so this is the stricter view)."""

    def __init__(self) -> None:
        self.recorded: list[RecordedEvent] = []

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        self._record(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        self._record(obj, "Warning", reason, message)

    def _record(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        self.recorded.append(
            RecordedEvent(
                type_,
                reason,
                message,
                str(obj.get("kind") or ""),
                meta.get("namespace"),
                str(meta.get("name") or ""),
                str(meta.get("uid") or ""),
            )
        )

    def about(self, name: str | None = None, namespace: str | None = None) -> list[RecordedEvent]:
        """Events about objects named ``name`` (in ``namespace``, when given)."""
        return [
            e
            for e in self.recorded
            if (name is None or e.name == name) and (namespace is None or e.namespace == namespace)
        ]

    def reasons(self, name: str | None = None, namespace: str | None = None) -> list[str]:
        return [e.reason for e in self.about(name, namespace)]

    def clear(self) -> None:
        self.recorded.clear()


# -- Kubernetes ----------------------------------------------------------------------------


def api_error(status: int, reason: str = "", message: str = "") -> KubeError:
    """The error :class:`kustody.kube.api.Kube` raises for an HTTP ``status``: NotFound (404),
    Conflict (409), Unavailable (0, 429, 5xx) or KubeError. (A 429 with Retry-After is
    ``kustody.kube.api.TooManyRequests``; pass one to :meth:`FakeKube.fail_next` yourself.)"""
    if status == 404:
        return NotFound(status, reason or "NotFound", message)
    if status == 409:
        return Conflict(status, reason or "Conflict", message)
    if status in (0, 429) or status >= 500:
        return Unavailable(status, reason or "ServiceUnavailable", message)
    return KubeError(status, reason, message)


@dataclass(frozen=True)
class Call:
    """One request to :class:`FakeKube`. ``verb``: get, list, list_metadata, create, patch,
    patch_status (also a ``patch`` of the status subresource) or delete."""

    verb: str
    kind: str
    namespace: str | None
    name: str | None
    body: Any = None


@dataclass
class _Fault:
    verb: str
    kind: str | None
    name: str | None
    namespace: str | None
    error: Exception
    times: int


ObjKey = tuple[str, str, str]  # (kind, namespace or "", name)
_T = TypeVar("_T")


def _copy(value: _T) -> _T:
    """A deep copy that is also a check: the API server only stores JSON."""
    return cast(_T, json.loads(json.dumps(value)))


def _has_status_subresource(res: Resource) -> bool:
    return res.group != ""  # the custom resources and the workloads; not Secrets, Namespaces


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return _copy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} does not start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def _json_patch(doc: Any, ops: Sequence[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test); all or nothing."""
    doc = _copy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(str(op.get("path", "")))
        try:
            if kind == "test":
                if _resolve(doc, parts) != op.get("value"):
                    raise _PatchFailed(f"testing value {op.get('path')} failed")
                continue
            if kind in ("move", "copy"):
                source = _pointer(str(op["from"]))
                value = _copy(_resolve(doc, source))
                if kind == "move":
                    doc = _remove(doc, source)
                doc = _add(doc, parts, value)
            elif kind == "add":
                doc = _add(doc, parts, _copy(op.get("value")))
            elif kind == "remove":
                doc = _remove(doc, parts)
            elif kind == "replace":
                _resolve(doc, parts)  # must exist
                doc = _add(_remove(doc, parts), parts, _copy(op.get("value")))
            else:
                raise _PatchFailed(f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise _PatchFailed(f"{kind} {op.get('path')}: {exc!r}") from None
    return doc


class _PatchFailed(Exception):
    pass


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise KeyError("/")
    parent = _resolve(doc, parts[:-1])
    if isinstance(parent, list):
        del parent[int(parts[-1])]
    elif isinstance(parent, dict):
        del parent[parts[-1]]
    else:
        raise KeyError(parts[-1])
    return doc


_REQUIREMENT = re.compile(r"^\s*(!)?\s*([^=!\s]+)\s*(?:(==|=|!=)\s*([^\s]*))?\s*$")


def selector_matches(selector: str | None, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` match a label selector: comma-separated ``k=v``, ``k==v``,
    ``k!=v``, ``k`` (exists) and ``!k`` (does not exist)."""
    if not selector:
        return True
    for requirement in selector.split(","):
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"unsupported label selector {requirement!r}")
        negated, key, op, value = match.groups()
        if negated and op:
            raise ValueError(f"unsupported label selector {requirement!r}")
        if negated:
            ok = key not in labels
        elif op is None:
            ok = key in labels
        elif op == "!=":
            ok = labels.get(key) != value
        else:
            ok = labels.get(key) == value
        if not ok:
            return False
    return True


class FakeKube:
    """The Kubernetes API in memory (:class:`kustody.kube.protocol.KubeApi`).

    What it does as the API server does:

    * ``metadata.resourceVersion`` (one counter for everything) changes on every write;
      ``metadata.generation`` (custom resources and workloads) starts at 1 and changes only
      when something other than metadata and status does;
    * custom resources and workloads have a status subresource: writes to the object ignore
      ``status``, writes to ``/status`` change nothing else; :meth:`create` drops ``status``;
    * a merge patch carrying ``metadata.resourceVersion``, and :meth:`patch_status` with
      ``resource_version``, fail with :class:`~kustody.kube.errors.Conflict` when stale; a
      JSON patch whose ``test`` fails is refused (422);
    * deleting an object with finalizers only sets ``deletionTimestamp``; it goes when the
      last finalizer is removed; then objects it owns (``ownerReferences`` by uid) go too;
      no finalizer may be added to an object being deleted;
    * :meth:`list_metadata` returns PartialObjectMetadata (never a Secret's ``data``);
    * Secret ``stringData`` is folded into ``data``, whose values must be base64.

    For tests: :meth:`add`, :meth:`edit` and :meth:`remove` change objects as a user would
    (not logged, no injected failures); :meth:`object` and :meth:`objects` read without a
    request; :attr:`calls` logs every request; :meth:`fail_next` makes requests fail.
    """

    def __init__(self, clock: Callable[[], dt.datetime] | None = None) -> None:
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._objects: dict[ObjKey, dict[str, Any]] = {}
        self._resources: dict[str, Resource] = {}
        self._rv = 100
        self._uids = 0
        self._faults: list[_Fault] = []
        self._changes: list[tuple[str, Resource, dict[str, Any]]] = []
        self.calls: list[Call] = []
        self._mutators: dict[str, Callable[[dict[str, Any]], None]] = {}

    # -- for tests ---------------------------------------------------------------------------

    def fail_next(
        self,
        verb: str,
        res: Resource | str | None,
        error: Exception,
        *,
        name: str | None = None,
        namespace: str | None = None,
        times: int = 1,
    ) -> None:
        """The next ``times`` matching requests raise ``error`` (e.g. ``api_error(500)``,
        ``api_error(409)``) before anything is changed. ``res``: a Resource or a kind
        ("Secret"), None for any; ``verb`` as in :class:`Call`, "*" for any."""
        kind = res.kind if isinstance(res, Resource) else res
        self._faults.append(_Fault(verb, kind, name, namespace, error, times))

    def clear_faults(self) -> None:
        """Forget every failure :meth:`fail_next` still holds."""
        self._faults.clear()

    def mutate(self, res: Resource, change: Callable[[dict[str, Any]], None] | None) -> None:
        """Like a mutating admission webhook: ``change`` edits every object of ``res`` that a
        request creates or patches, before it is stored (None: no more)."""
        if change is None:
            self._mutators.pop(res.kind, None)
        else:
            self._mutators[res.kind] = change

    def requests(
        self,
        verb: str | None = None,
        res: Resource | str | None = None,
        *,
        name: str | None = None,
        namespace: str | None = None,
    ) -> list[Call]:
        """Logged requests matching the filters."""
        kind = res.kind if isinstance(res, Resource) else res
        return [
            c
            for c in self.calls
            if (verb is None or c.verb == verb)
            and (kind is None or c.kind == kind)
            and (name is None or c.name == name)
            and (namespace is None or c.namespace == namespace)
        ]

    def writes(self) -> list[Call]:
        """Logged requests that change something (create, patch, patch_status, delete)."""
        return [c for c in self.calls if c.verb not in ("get", "list", "list_metadata")]

    def add(self, res: Resource, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj`` as it is, ``status`` included (seeding a test)."""
        return self._create(res, obj, keep_status=True)

    def edit(
        self,
        res: Resource,
        name: str,
        patch: Mapping[str, Any],
        namespace: str | None = None,
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        """Merge-patch an object as a user would (``status``: its status subresource)."""
        return self._patch(res, name, patch, namespace, "status" if status else "", MERGE_PATCH)

    def remove(self, res: Resource, name: str, namespace: str | None = None) -> None:
        """Delete as a user would (``kubectl delete --wait=false``)."""
        self._delete(res, name, namespace)

    def object(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """The stored object (a copy), without a request."""
        obj = self._objects.get(self._key(res, name, namespace))
        return _copy(obj) if obj is not None else None

    def objects(self, res: Resource, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            _copy(o)
            for (kind, ns, _), o in sorted(self._objects.items())
            if kind == res.kind and (namespace is None or ns == namespace)
        ]

    def changes_since(self, cursor: int) -> tuple[list[tuple[str, Resource, dict[str, Any]]], int]:
        """Watch events (ADDED, MODIFIED, DELETED; full objects) after ``cursor``, and the
        cursor to pass next time (start with 0)."""
        return [(t, r, _copy(o)) for t, r, o in self._changes[cursor:]], len(self._changes)

    # -- KubeApi ---------------------------------------------------------------------------

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any]:
        self._request("get", res, namespace, name)
        obj = self._objects.get(self._key(res, name, namespace))
        if obj is None:
            raise NotFound(404, "NotFound", f'{res.plural} "{name}" not found')
        return _copy(obj)

    async def get_or_none(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return await self.get(res, name, namespace)
        except NotFound:
            return None

    async def list(
        self, res: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        self._request("list", res, namespace, None, label_selector)
        return self._select(res, namespace, label_selector)

    async def list_metadata(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        page_size: int = 500,
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        self._request("list_metadata", res, namespace, None, label_selector)
        items = [
            {
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": o["metadata"],
            }
            for o in self._select(res, namespace, label_selector)
        ]
        return items, str(self._rv)

    async def create(
        self, res: Resource, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        self._request("create", res, namespace, (body.get("metadata") or {}).get("name"), body)
        obj = dict(body)
        if namespace is not None and res.namespaced:
            obj["metadata"] = {**(body.get("metadata") or {}), "namespace": namespace}
        return self._create(res, obj, keep_status=not _has_status_subresource(res))

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str = "",
        content_type: str = MERGE_PATCH,
    ) -> dict[str, Any]:
        verb = "patch_status" if subresource == "status" else "patch"
        self._request(verb, res, namespace, name, patch)
        return self._patch(res, name, patch, namespace, subresource, content_type)

    async def patch_status(
        self,
        res: Resource,
        name: str,
        status: Mapping[str, Any],
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        patch: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        self._request("patch_status", res, namespace, name, patch)
        return self._patch(res, name, patch, namespace, "status", MERGE_PATCH)

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        self._request("delete", res, namespace, name)
        self._delete(res, name, namespace)

    # -- internals -------------------------------------------------------------------------

    def _key(self, res: Resource, name: str, namespace: str | None) -> ObjKey:
        self._resources[res.kind] = res
        return (res.kind, (namespace or "") if res.namespaced else "", name)

    def _request(
        self, verb: str, res: Resource, namespace: str | None, name: str | None, body: Any = None
    ) -> None:
        self.calls.append(Call(verb, res.kind, namespace, name, _copy(body)))
        for fault in self._faults:
            if (
                fault.verb in (verb, "*")
                and fault.kind in (None, res.kind)
                and fault.name in (None, name)
                and fault.namespace in (None, namespace)
            ):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                raise fault.error

    def _select(
        self, res: Resource, namespace: str | None, selector: str | None
    ) -> builtins.list[dict[str, Any]]:
        return [
            o
            for o in self.objects(res, namespace if res.namespaced else None)
            if selector_matches(selector, (o.get("metadata") or {}).get("labels") or {})
        ]

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _create(
        self, res: Resource, body: Mapping[str, Any], *, keep_status: bool
    ) -> dict[str, Any]:
        obj: dict[str, Any] = _copy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            self._uids += 1
            meta["name"] = f"{meta['generateName']}{self._uids:05x}"
        name = str(meta.get("name") or "")
        if not name:
            raise KubeError(422, "Invalid", "metadata.name: Required value")
        if res.namespaced and not meta.get("namespace"):
            raise KubeError(422, "Invalid", "metadata.namespace: Required value")
        if not res.namespaced:
            meta.pop("namespace", None)
        key = self._key(res, name, meta.get("namespace"))
        if key in self._objects:
            raise Conflict(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        if not keep_status:
            obj.pop("status", None)
        self._uids += 1
        meta.setdefault("uid", str(uuid.UUID(int=self._uids)))
        meta.setdefault("creationTimestamp", format_time(self._clock()))
        meta.pop("deletionTimestamp", None)
        if _has_status_subresource(res):
            meta["generation"] = 1
        _fold_secret(res, obj)
        if (change := self._mutators.get(res.kind)) is not None:
            change(obj)
        meta["resourceVersion"] = self._next_rv()
        self._objects[key] = obj
        self._changes.append(("ADDED", res, obj))
        return _copy(obj)

    def _patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None,
        subresource: str,
        content_type: str,
    ) -> dict[str, Any]:
        key = self._key(res, name, namespace)
        old = self._objects.get(key)
        if old is None:
            raise NotFound(404, "NotFound", f'{res.plural} "{name}" not found')
        if content_type == JSON_PATCH:
            try:
                new = _json_patch(old, patch)
            except _PatchFailed as exc:
                raise KubeError(422, "Invalid", str(exc)) from None
            wanted_rv = None  # a JSON patch's precondition is its own "test" op
        else:
            wanted_rv = ((patch or {}).get("metadata") or {}).get("resourceVersion")
            new = _merge(old, patch)
        if wanted_rv is not None and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            raise Conflict(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        return self._replace(res, key, old, new, subresource)

    def _replace(
        self,
        res: Resource,
        key: ObjKey,
        old: dict[str, Any],
        new: dict[str, Any],
        subresource: str,
    ) -> dict[str, Any]:
        new = _copy(new)
        if _has_status_subresource(res):
            if subresource == "status":
                new = {**_copy(old), "status": new.get("status")}
                if new["status"] is None:
                    new.pop("status")
            elif "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if old_meta.get("deletionTimestamp") and set(meta.get("finalizers") or ()) - set(
            old_meta.get("finalizers") or ()
        ):
            raise KubeError(
                422, "Invalid", "metadata.finalizers: Forbidden: no new finalizers can be added "
                "if the object is being deleted",
            )  # fmt: skip
        _fold_secret(res, new)
        if (change := self._mutators.get(res.kind)) is not None:
            change(new)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if "generation" in old_meta:
            meta["generation"] = old_meta["generation"]
            if _content(new) != _content(old):
                meta["generation"] = int(old_meta["generation"]) + 1
        if new == old:
            return _copy(old)  # a no-op write: the API server keeps the resourceVersion
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._gone(res, key, new)
        else:
            self._objects[key] = new
            self._changes.append(("MODIFIED", res, new))
        return _copy(new)

    def _delete(self, res: Resource, name: str, namespace: str | None) -> None:
        key = self._key(res, name, namespace)
        obj = self._objects.get(key)
        if obj is None:
            return  # Kube.delete ignores NotFound
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = _copy(obj)
                new["metadata"]["deletionTimestamp"] = format_time(self._clock())
                new["metadata"]["resourceVersion"] = self._next_rv()
                self._objects[key] = new
                self._changes.append(("MODIFIED", res, new))
            return
        self._gone(res, key, obj)

    def _gone(self, res: Resource, key: ObjKey, obj: dict[str, Any]) -> None:
        self._objects.pop(key, None)
        self._changes.append(("DELETED", res, obj))
        uid = obj["metadata"].get("uid")
        for (kind, ns, name), other in list(self._objects.items()):
            owners = (other.get("metadata") or {}).get("ownerReferences") or ()
            if any(o.get("uid") == uid for o in owners):
                self._delete(self._resources[kind], name, ns or None)


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _fold_secret(res: Resource, obj: dict[str, Any]) -> None:
    if res.kind != "Secret":
        return
    data = dict(obj.get("data") or {})
    for k, v in (obj.pop("stringData", None) or {}).items():
        data[k] = base64.b64encode(str(v).encode()).decode("ascii")
    for k, v in data.items():
        try:
            base64.b64decode(str(v), validate=True)
        except ValueError:
            raise KubeError(400, "BadRequest", f"data[{k}]: illegal base64 data") from None
    if data or "data" in obj:
        obj["data"] = data


# -- the HSM sidecar -----------------------------------------------------------------------


@dataclass(frozen=True)
class HsmCall:
    """One call to :class:`FakeKeyService`: the method name and its KeyRing/version (when it
    names one) or the number of items (batch calls)."""

    op: str
    key_ring: str | None = None
    version: int | None = None
    items: int = 0


@dataclass
class _Kek:
    key: bytes | None
    state: VersionState
    fingerprint: str
    escrowable: bool = False
    scheduled_at: dt.datetime | None = None
    untrusted: str | None = None


@dataclass
class _HsmFault:
    op: str
    error: HsmError
    times: int


def _kcv(key: bytes) -> str:
    """The key check value, as the token reports it: AES-ECB(K, 0^128), first 3 bytes."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - a KCV
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3].hex()


_AGENT = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_BATCH = 1000  # the sidecar's MAX_BATCH_ITEMS


class FakeKeyService:
    """The sidecar's KeyService in memory (:class:`kustody.controller.ports.KeyService`),
    answering as the sidecar and its token do:

    * KEK versions per KeyRing, ENABLED → DISABLED → DESTROY_SCHEDULED → DESTROYED, each
      with its key check value as fingerprint; :meth:`create_key_version` is idempotent (an
      existing version keeps its state and what it was created as; a destroyed one gives
      VERSION_DESTROYED); DestroyVersion only after ``min_destroy_delay`` seconds in
      DESTROY_SCHEDULED (the token's own record; DESTRUCTION_NOT_DUE before), only from a
      disabled state (VERSION_NOT_DISABLED);
    * data keys are sealed with AES-256-GCM under the version's key, with the envelope header
      and the binding as associated data, in the real text format: a wrong binding or an
      edited envelope gives AAD_MISMATCH, a disabled or scheduled version VERSION_DISABLED,
      a destroyed one VERSION_DESTROYED, a missing one VERSION_NOT_FOUND, a ring without an
      enabled version NO_PRIMARY_VERSION; plaintext only with ``allow_plaintext_export``
      (PLAINTEXT_EXPORT_FORBIDDEN);
    * a version marked untrusted (:meth:`plant_untrusted`) gives KEY_NOT_TRUSTED wherever the
      sidecar would refuse it (DescribeKey, every use);
    * :meth:`set_unavailable`: every call fails (TOKEN_UNAVAILABLE by default) and
      :meth:`health` says not serving; :meth:`fail_next` fails the next call(s) of one method.

    ``clock`` times scheduled destructions (share the test's :class:`ManualClock`).
    """

    def __init__(
        self,
        clock: Callable[[], dt.datetime] | None = None,
        *,
        min_destroy_delay: float = DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    ) -> None:
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.min_destroy_delay = min_destroy_delay
        self._rings: dict[str, dict[int, _Kek]] = {}
        self._faults: list[_HsmFault] = []
        self._down: HsmError | None = None
        self.admitted_agents: set[str] = set()
        self.calls: list[HsmCall] = []
        self.closed = False

    # -- for tests ---------------------------------------------------------------------------

    def fail_next(
        self, op: str, reason: Reason, message: str = "injected failure", *, times: int = 1
    ) -> None:
        """The next ``times`` calls of method ``op`` ("create_key_version", "describe_key",
        "batch_generate_data_keys", ..., "*" for any) raise HsmError(``reason``)."""
        self._faults.append(_HsmFault(op, HsmError(reason, message), times))

    def clear_faults(self) -> None:
        """Forget every failure :meth:`fail_next` still holds."""
        self._faults.clear()

    def set_unavailable(
        self, reason: Reason = Reason.TOKEN_UNAVAILABLE, message: str = "the token is gone"
    ) -> None:
        self._down = HsmError(reason, message)

    def set_available(self) -> None:
        self._down = None

    def add_version(
        self,
        key_ring: str,
        version: int,
        state: VersionState = VersionState.ENABLED,
        *,
        escrowable: bool = False,
    ) -> VersionInfo:
        """Put a version in the token directly (one left by an earlier KeyRing, say)."""
        key = os.urandom(32)
        kek = _Kek(key, state, _kcv(key), escrowable)
        if state is VersionState.DESTROY_SCHEDULED:
            kek.scheduled_at = self._clock()
        if state is VersionState.DESTROYED:
            kek.key = None
        self._rings.setdefault(key_ring, {})[version] = kek
        return self._info(key_ring, version, kek)

    def set_state(self, key_ring: str, version: int, state: VersionState) -> None:
        """Change a version's state behind the operator's back (an admin, a restore)."""
        kek = self._rings[key_ring][version]
        kek.state = state
        kek.scheduled_at = self._clock() if state is VersionState.DESTROY_SCHEDULED else None
        if state is VersionState.DESTROYED:
            kek.key = None

    def drop_version(self, key_ring: str, version: int) -> None:
        """The token lost the version entirely (a token replaced by an empty one)."""
        del self._rings[key_ring][version]

    def replace_key(self, key_ring: str, version: int) -> None:
        """Another key object under the version's label (a different fingerprint)."""
        key = os.urandom(32)
        kek = self._rings[key_ring][version]
        kek.key, kek.fingerprint = key, _kcv(key)

    def plant_untrusted(self, key_ring: str, version: int, why: str = "it is extractable") -> None:
        """A key object Kustody did not make under the version's label (KEY_NOT_TRUSTED)."""
        if version not in self._rings.get(key_ring, {}):
            self.add_version(key_ring, version)
        self._rings[key_ring][version].untrusted = why

    def state(self, key_ring: str, version: int) -> VersionState | None:
        kek = self._rings.get(key_ring, {}).get(version)
        return kek.state if kek is not None else None

    def states(self, key_ring: str) -> dict[int, VersionState]:
        return {v: k.state for v, k in sorted(self._rings.get(key_ring, {}).items())}

    def fingerprint(self, key_ring: str, version: int) -> str:
        return self._rings[key_ring][version].fingerprint

    def unseal(self, wrapped: str, binding: Binding) -> bytes:
        """The DEK in ``wrapped`` (whatever the version's state): for assertions only."""
        envelope = Envelope.from_text(wrapped)
        kek = self._rings[envelope.key.key_ring][envelope.key.version]
        assert kek.key is not None, "the version was destroyed"
        return AESGCM(kek.key).decrypt(
            envelope.nonce, envelope.ciphertext, associated_data(envelope.header, binding)
        )

    def ops(self, op: str | None = None) -> list[HsmCall]:
        return [c for c in self.calls if op is None or c.op == op]

    # -- KeyService --------------------------------------------------------------------------

    async def create_key_version(
        self, key_ring: str, version: int, *, escrow: bool = False
    ) -> VersionInfo:
        self._enter("create_key_version", key_ring, version)
        ref = self._ref(key_ring, version)
        kek = self._rings.get(key_ring, {}).get(version)
        if kek is not None:
            if kek.state is VersionState.DESTROYED:
                raise HsmError(
                    Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed; use a new version"
                )
            self._trusted(ref, kek)
            return self._info(key_ring, version, kek)
        return self.add_version(key_ring, version, escrowable=escrow)

    async def set_version_state(
        self, key_ring: str, version: int, state: VersionState
    ) -> VersionInfo:
        self._enter("set_version_state", key_ring, version)
        ref = self._ref(key_ring, version)
        try:
            settable(state)
        except DomainError as exc:
            raise from_domain(exc) from None
        kek = self._trusted(ref, self._record(ref))
        if kek.key is None:
            raise HsmError(Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed")
        if state is VersionState.DESTROY_SCHEDULED:
            kek.scheduled_at = kek.scheduled_at or self._clock()  # scheduling again keeps it
        else:
            kek.scheduled_at = None
        kek.state = state
        return self._info(key_ring, version, kek)

    async def destroy_version(self, key_ring: str, version: int) -> VersionInfo:
        self._enter("destroy_version", key_ring, version)
        ref = self._ref(key_ring, version)
        kek = self._record(ref)
        if kek.state is VersionState.DESTROYED:
            return self._info(key_ring, version, kek)
        self._trusted(ref, kek)
        if kek.state is VersionState.ENABLED:
            raise HsmError(
                Reason.VERSION_NOT_DISABLED,
                f"KEK version {ref} is ENABLED; schedule its destruction first",
            )
        if kek.scheduled_at is None:
            raise HsmError(
                Reason.DESTRUCTION_NOT_DUE,
                f"KEK version {ref} is not scheduled for destruction: set it DESTROY_SCHEDULED "
                "and destroy it after the waiting period",
            )
        due = kek.scheduled_at + dt.timedelta(seconds=self.min_destroy_delay)
        if self._clock() < due:
            raise HsmError(
                Reason.DESTRUCTION_NOT_DUE,
                f"KEK version {ref} was scheduled for destruction at "
                f"{format_time(kek.scheduled_at)}; it may be destroyed from {format_time(due)}",
            )
        kek.key, kek.state, kek.scheduled_at, kek.escrowable = (
            None,
            VersionState.DESTROYED,
            None,
            False,
        )
        return self._info(key_ring, version, kek)

    async def describe_key(self, key_ring: str) -> KeyDescription:
        self._enter("describe_key", key_ring)
        try:
            validate_key_ring(key_ring)
        except DomainError as exc:
            raise HsmError(Reason.INVALID_ARGUMENT, str(exc)) from None
        ring = self._rings.get(key_ring, {})
        for version in sorted(ring):
            self._trusted(KeyVersionRef(key_ring, version), ring[version])
        return KeyDescription(
            key_ring,
            primary_version({v: k.state for v, k in ring.items()}),
            tuple(self._info(key_ring, v, ring[v]) for v in sorted(ring)),
        )

    async def health(self) -> Health:
        self.calls.append(HsmCall("health"))
        if self._down is not None:
            return Health(False, self._down.reason, self._down.message)
        return Health(True, None, "")

    async def batch_generate_data_keys(
        self, items: Sequence[GenerateItem]
    ) -> list[DataKey | HsmError]:
        self._enter("batch_generate_data_keys", items=len(items))
        self._check_batch(len(items))
        results: list[DataKey | HsmError] = []
        for item in items:
            try:
                results.append(self._generate(item))
            except HsmError as exc:
                results.append(exc)
        return results

    async def batch_rewrap(
        self, items: Sequence[tuple[str, Binding]], *, to_version: int | None = None
    ) -> list[ReWrapped | HsmError]:
        self._enter("batch_rewrap", items=len(items))
        self._check_batch(len(items))
        results: list[ReWrapped | HsmError] = []
        for wrapped, binding in items:
            try:
                results.append(self._rewrap(wrapped, binding, to_version))
            except HsmError as exc:
                results.append(exc)
        return results

    async def decrypt(
        self, wrapped: str, binding: Binding, *, allow_plaintext_export: bool
    ) -> bytes:
        self._enter("decrypt")
        envelope = self._envelope(wrapped)
        if not allow_plaintext_export:
            raise HsmError(
                Reason.PLAINTEXT_EXPORT_FORBIDDEN,
                f"KeyRing {envelope.key.key_ring} does not allow plaintext export",
            )
        return self._open(envelope, binding)

    async def export_escrow(
        self, key_ring: str, version: int, agent_fingerprint: str
    ) -> EscrowPackageReply:
        self._enter("export_escrow", key_ring, version)
        ref = self._ref(key_ring, version)
        self._check_agent(agent_fingerprint)
        kek = self._trusted(ref, self._record(ref))
        if kek.key is None:
            raise HsmError(Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed")
        if not kek.escrowable:
            raise HsmError(
                Reason.VERSION_NOT_ESCROWABLE, f"KEK version {ref} was not created for escrow"
            )
        if agent_fingerprint not in self.admitted_agents:
            raise HsmError(
                Reason.ESCROW_AGENT_NOT_ADMITTED,
                f"the token holds no trusted wrapping key {agent_fingerprint}",
            )
        wrapped = hashlib.sha256(kek.key + agent_fingerprint.encode()).digest() + os.urandom(8)
        return EscrowPackageReply(
            key_ring,
            version,
            agent_fingerprint,
            ref.label,
            ref.object_id,
            kek.fingerprint,
            ESCROW_MECHANISM,
            wrapped,
        )

    async def escrow_agent_admitted(self, agent_fingerprint: str) -> bool:
        self._enter("escrow_agent_admitted")
        self._check_agent(agent_fingerprint)
        return agent_fingerprint in self.admitted_agents

    async def close(self) -> None:
        self.closed = True

    # -- internals -------------------------------------------------------------------------

    def _enter(
        self, op: str, key_ring: str | None = None, version: int | None = None, items: int = 0
    ) -> None:
        self.calls.append(HsmCall(op, key_ring, version, items))
        if self._down is not None:
            raise HsmError(self._down.reason, self._down.message)
        for fault in self._faults:
            if fault.op in (op, "*"):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                raise HsmError(fault.error.reason, fault.error.message)

    @staticmethod
    def _ref(key_ring: str, version: int) -> KeyVersionRef:
        try:
            return KeyVersionRef(key_ring, version)
        except DomainError as exc:
            raise HsmError(Reason.INVALID_ARGUMENT, str(exc)) from None

    def _record(self, ref: KeyVersionRef) -> _Kek:
        kek = self._rings.get(ref.key_ring, {}).get(ref.version)
        if kek is None:
            raise HsmError(Reason.VERSION_NOT_FOUND, f"KEK version {ref} does not exist")
        return kek

    @staticmethod
    def _trusted(ref: KeyVersionRef, kek: _Kek) -> _Kek:
        if kek.untrusted is not None:
            raise HsmError(
                Reason.KEY_NOT_TRUSTED,
                f"the token object for {ref} is not a key Kustody generated ({kek.untrusted}); "
                "it is not used",
            )
        return kek

    def _usable(self, ref: KeyVersionRef) -> bytes:
        kek = self._trusted(ref, self._record(ref))
        if kek.state is VersionState.DESTROYED or kek.key is None:
            raise HsmError(Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed")
        if kek.state is VersionState.DISABLED:
            raise HsmError(Reason.VERSION_DISABLED, f"KEK version {ref} is disabled")
        if kek.state is VersionState.DESTROY_SCHEDULED:
            raise HsmError(
                Reason.VERSION_DISABLED,
                f"KEK version {ref} is disabled (its destruction is scheduled)",
            )
        return kek.key

    def _resolve(self, key_ring: str, version: int | None) -> KeyVersionRef:
        if version:
            return self._ref(key_ring, version)
        ring = self._rings.get(key_ring, {})
        primary = primary_version({v: k.state for v, k in ring.items()})
        if primary is None:
            raise HsmError(Reason.NO_PRIMARY_VERSION, f"KeyRing {key_ring} has no ENABLED version")
        return self._ref(key_ring, primary)

    def _info(self, key_ring: str, version: int, kek: _Kek) -> VersionInfo:
        return VersionInfo(
            KeyVersionRef(key_ring, version), kek.state, kek.fingerprint, kek.escrowable
        )

    @staticmethod
    def _check_batch(count: int) -> None:
        if count > _MAX_BATCH:
            raise HsmError(
                Reason.REQUEST_TOO_LARGE, f"{count} items in one batch; the limit is {_MAX_BATCH}"
            )

    @staticmethod
    def _check_agent(fingerprint: str) -> None:
        if not _AGENT.fullmatch(fingerprint):
            raise HsmError(
                Reason.INVALID_ARGUMENT,
                "an escrow agent fingerprint is 'sha256:' and 64 hex digits",
            )

    @staticmethod
    def _envelope(wrapped: str) -> Envelope:
        try:
            return Envelope.from_text(wrapped)
        except DomainError as exc:
            raise HsmError(Reason.MALFORMED_ENVELOPE, str(exc)) from None

    def _seal(self, ref: KeyVersionRef, plaintext: bytes, binding: Binding) -> str:
        key = self._usable(ref)
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext, associated_data(header_for(ref), binding))
        return Envelope(ref, nonce, sealed).to_text()

    def _open(self, envelope: Envelope, binding: Binding) -> bytes:
        key = self._usable(envelope.key)
        try:
            return AESGCM(key).decrypt(
                envelope.nonce, envelope.ciphertext, associated_data(envelope.header, binding)
            )
        except InvalidTag:
            raise HsmError(
                Reason.AAD_MISMATCH,
                f"the wrapped key does not authenticate under {envelope.key} for this binding "
                "(wrong namespace, name or encryptionContext, or altered ciphertext)",
            ) from None

    def _generate(self, item: GenerateItem) -> DataKey:
        if not MIN_DEK_BYTES <= item.length <= MAX_DEK_BYTES:
            raise HsmError(
                Reason.INVALID_ARGUMENT,
                f"data key length {item.length} is outside {MIN_DEK_BYTES}..{MAX_DEK_BYTES} bytes",
            )
        if item.return_plaintext and not item.allow_plaintext_export:
            raise HsmError(
                Reason.PLAINTEXT_EXPORT_FORBIDDEN,
                f"KeyRing {item.key_ring} does not allow plaintext export",
            )
        ref = self._resolve(item.key_ring, item.version)
        dek = os.urandom(item.length)
        wrapped = self._seal(ref, dek, item.binding)
        return DataKey(wrapped, ref.version, dek if item.return_plaintext else None)

    def _rewrap(self, wrapped: str, binding: Binding, to_version: int | None) -> ReWrapped:
        envelope = self._envelope(wrapped)
        plaintext = self._open(envelope, binding)
        ref = self._resolve(envelope.key.key_ring, to_version)
        return ReWrapped(self._seal(ref, plaintext, binding), envelope.key.version, ref.version)


# -- the operator around the reconcilers ---------------------------------------------------

Reconciler = Callable[[Runtime, str, str], Awaitable[float | None]]
WatchHandler = Callable[[Runtime, Mapping[str, Any]], None]


# The reconcilers and the event handlers are imported when first used, not with this module;
# FakeKube and FakeKeyService need neither.


def reconcilers() -> dict[str, Reconciler]:
    """The reconciler entry point per queue kind, as the operator's workers call them."""
    from kustody.controller.datakey import reconciler as datakey
    from kustody.controller.escrow import reconciler as escrow
    from kustody.controller.keyring import reconciler as keyring
    from kustody.controller.policy import reconciler as policy

    return {
        KEYRING: lambda rt, _ns, name: keyring.reconcile(rt, name),
        DATAKEY: datakey.reconcile,
        POLICY: lambda rt, _ns, name: policy.reconcile(rt, name),
        ESCROW_AGENT: lambda rt, _ns, name: escrow.reconcile_agent(rt, name),
    }


def _watch_handlers() -> tuple[dict[str, WatchHandler], Callable[[Runtime, str, Any], None]]:
    from kustody.controller import events

    handlers: dict[str, WatchHandler] = {
        KEYRINGS.kind: events.keyring_event,
        DATAKEYS.kind: events.datakey_event,
        ROTATION_POLICIES.kind: events.policy_event,
        NAMESPACES.kind: events.namespace_event,
        ESCROW_AGENTS.kind: events.escrow_agent_event,
    }
    return handlers, events.secret_event


_SECRET_SELECTOR = f"{MANAGED_BY}={MANAGER}"  # the operator's Secret informer's selector


@dataclass
class Outcome:
    """One worker pass: the key, what the reconciler returned, or the error it raised."""

    key: QueueKey
    requeue_after: float | None = None
    error: Exception | None = None


@dataclass
class FakeOperator:
    """A :class:`~kustody.controller.runtime.Runtime` on fakes, with the operator process's
    loop around the reconcilers, driven by the test:

    * :meth:`deliver` hands what changed in :attr:`kube` to :mod:`kustody.controller.events`'s
      handlers, as the watches would (Secrets as metadata only, and only those carrying
      ``app.kubernetes.io/managed-by=kustody``, as the operator's informer selects): the
      stores and the queue are filled by the real code;
    * :meth:`step` runs the reconciler of one due key as a worker does (requeue after the
      returned delay; Conflict: again in 0.5 s; other API or HSM errors: backoff);
    * :meth:`run_until_idle` delivers and steps until nothing is due, moving :attr:`clock`
      ahead to keys due within ``horizon`` seconds (the short requeues), not to the resync;
      when the clock has passed ``resync_seconds`` since the last resync, every object is
      queued once (:meth:`resync`, as the operator does every five minutes).

    Calling a reconciler directly (``await keyring.reconcile(op.rt, "name")``) after
    :meth:`deliver` works too.
    """

    clock: ManualClock = field(default_factory=ManualClock)
    kube: FakeKube = field(init=False)
    hsm: FakeKeyService = field(init=False)
    events: RecordingEvents = field(default_factory=RecordingEvents)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    namespace: str = "kustody-system"
    min_destroy_delay: float = DEFAULT_MIN_DESTROY_DELAY_SECONDS
    rt: Runtime = field(init=False)
    outcomes: list[Outcome] = field(default_factory=list)
    _cursor: int = 0
    _secrets_seen: set[tuple[str, str]] = field(default_factory=set)
    _reconcilers: dict[str, Reconciler] = field(default_factory=reconcilers)
    resync_seconds: float = 300.0
    _next_resync: float = 0.0

    def __post_init__(self) -> None:
        self.kube = FakeKube(self.clock)
        self.hsm = FakeKeyService(self.clock, min_destroy_delay=self.min_destroy_delay)
        self.rt = Runtime(
            kube=self.kube,
            hsm=self.hsm,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
            namespace=self.namespace,
            queue=WorkQueue(clock=self.clock.monotonic),
        )

    def deliver(self) -> int:
        """Watch events for every change since the last delivery; returns how many."""
        handlers, secret_event = _watch_handlers()
        changes, self._cursor = self.kube.changes_since(self._cursor)
        for type_, res, obj in changes:
            if res.kind == SECRETS.kind:
                self._secret_event(secret_event, type_, obj)
            elif (handler := handlers.get(res.kind)) is not None:
                handler(self.rt, {"type": type_, "object": obj})
        return len(changes)

    def skip_events(self) -> int:
        """Lose what changed since the last delivery (a watch that broke): the stores keep
        their old view until a relist (``kustody.controller.events.prune``)."""
        changes, self._cursor = self.kube.changes_since(self._cursor)
        return len(changes)

    def _secret_event(
        self, secret_event: Callable[[Runtime, str, Any], None], type_: str, obj: dict[str, Any]
    ) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        selected = selector_matches(_SECRET_SELECTOR, meta.get("labels") or {})
        if type_ != "DELETED" and selected:
            self._secrets_seen.add(key)
        elif key in self._secrets_seen:
            type_ = "DELETED"  # it left the informer's selection (or is gone)
            self._secrets_seen.discard(key)
        else:
            return
        partial = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata"}
        secret_event(self.rt, type_, {**partial, "metadata": meta})

    async def step(self) -> Outcome | None:
        """Reconcile one due key (None if nothing is due now)."""
        key = self.rt.queue.pop()
        if key is None:
            return None
        kind, namespace, name = key
        outcome = Outcome(key)
        try:
            outcome.requeue_after = await self._reconcilers[kind](self.rt, namespace, name)
            self.rt.queue.forget(key)
            if outcome.requeue_after is not None:
                self.rt.queue.add(key, outcome.requeue_after)
        except Conflict as exc:
            outcome.error = exc
            self.rt.queue.add(key, 0.5)
        except NotFound as exc:
            outcome.error = exc
        except (HsmError, KubeError) as exc:
            outcome.error = exc
            self.rt.queue.retry(key)
        finally:
            self.rt.queue.done(key)
        self.outcomes.append(outcome)
        return outcome

    async def run_until_idle(self, *, horizon: float = 5.0, max_steps: int = 500) -> int:
        """Deliver and reconcile until nothing is due within ``horizon`` seconds, moving the
        clock to each short requeue. Returns the number of reconciler passes. An exception
        other than an API or HSM error (a bug) propagates."""
        steps = 0
        while True:
            self.deliver()
            self._resync_if_due()
            if await self.step() is not None:
                steps += 1
                if steps >= max_steps:
                    raise AssertionError(f"not idle after {max_steps} reconciler passes")
                continue
            wait = self.rt.queue.due_in()
            if wait is None or wait > horizon:
                return steps
            self.clock.advance(wait)

    def resync(self) -> None:
        """Queue every object, as the operator's periodic resync does."""
        for kind, store in (
            (POLICY, self.rt.policies),
            (KEYRING, self.rt.keyrings),
            (DATAKEY, self.rt.datakeys),
            (ESCROW_AGENT, self.rt.escrow_agents),
        ):
            for namespace, name in store:
                self.rt.enqueue(kind, namespace, name)

    def _resync_if_due(self) -> None:
        now = self.clock.monotonic()
        if not self._next_resync:
            self._next_resync = now + self.resync_seconds
        elif now >= self._next_resync:
            self.resync()  # once, however many periods a jump of the clock skipped
            self._next_resync = now + self.resync_seconds

    async def advance(self, seconds: float = 0.0, **delta: float) -> int:
        """Move the clock (resyncs and delays that fall due run) and run until idle."""
        self.clock.advance(seconds, **delta)
        return await self.run_until_idle()

    def errors(self) -> list[Exception]:
        return [o.error for o in self.outcomes if o.error is not None]

    def metric(self, name: str, **labels: str) -> float:
        """A sample of :attr:`metrics` (0.0 when it has none yet), e.g.
        ``metric("kustody_rotations_total", outcome="success")``."""
        value = self.metrics.registry.get_sample_value(name, labels)
        return float(value) if value is not None else 0.0


# -- objects ---------------------------------------------------------------------------------


def keyring(
    name: str, namespaces: Sequence[str] = (), policy: str | None = None, **spec: Any
) -> dict[str, Any]:
    """A KeyRing allowing ``namespaces`` (and ``spec`` fields given as keywords)."""
    body: dict[str, Any] = {
        "apiVersion": KEYRINGS.api_version,
        "kind": KEYRINGS.kind,
        "metadata": {"name": name},
        "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": list(namespaces)}},
    }
    if policy:
        body["spec"]["rotationPolicyRef"] = {"name": policy}
    body["spec"].update(spec)
    return body


def datakey(name: str, namespace: str, key_ring: str, **spec: Any) -> dict[str, Any]:
    """A DataKey under ``key_ring`` publishing Secret ``<name>-dek``."""
    return {
        "apiVersion": DATAKEYS.api_version,
        "kind": DATAKEYS.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"keyRingRef": {"name": key_ring}, "secretName": f"{name}-dek", **spec},
    }


def rotation_policy(name: str, **spec: Any) -> dict[str, Any]:
    """A RotationPolicy (rotationPeriod 2160h unless given)."""
    return {
        "apiVersion": ROTATION_POLICIES.api_version,
        "kind": ROTATION_POLICIES.kind,
        "metadata": {"name": name},
        "spec": {"rotationPeriod": "2160h", **spec},
    }


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    """The status condition ``type_`` of ``obj`` ({} when it has none)."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c.get("type") == type_:
            return dict(c)
    return {}


def secret_entries(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data``, decoded (for assertions; bytes that are not UTF-8, such as a
    plaintext key, come back backslash-escaped)."""
    return {
        k: base64.b64decode(v).decode("utf-8", "backslashreplace")
        for k, v in (secret.get("data") or {}).items()
    }
