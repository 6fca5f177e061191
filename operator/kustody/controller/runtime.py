"""Everything a reconciler needs, in one place: stores, queue, API and HSM clients, metrics."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kustody.api.client import Binding, DataKey, GenerateItem, HsmError, ReWrapped
from kustody.controller.batcher import Batcher
from kustody.controller.metrics import OperatorMetrics
from kustody.controller.ports import Clock, Events, KeyService, KubeApi
from kustody.controller.store import Obj, Store
from kustody.controller.workqueue import WorkQueue
from kustody.domain import keyset
from kustody.domain.secret import LABEL_KEYRING, MANAGED_BY, MANAGER
from kustody.domain.specs import REWRAP_ANNOTATION, NamespaceSelector
from kustody.kube.resources import GROUP

T = TypeVar("T")
QueueKey = tuple[str, str, str]  # (kind, namespace or "", name)

KEYRING, DATAKEY, POLICY = "KeyRing", "DataKey", "RotationPolicy"
ESCROW_AGENT = "EscrowAgent"


def datakey_keyring(obj: Obj) -> str | None:
    """The KeyRing a DataKey names."""
    ref = (obj.get("spec") or {}).get("keyRingRef") or {}
    name = ref.get("name")
    return str(name) if name else None


def _secret_keyring(obj: Obj) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if labels.get(MANAGED_BY) != MANAGER:
        return None
    name = labels.get(LABEL_KEYRING)
    return str(name) if name else None


def controller_ref(obj: Obj) -> tuple[str, str] | None:
    """(name, uid) of the DataKey that controls ``obj`` (a Secret), if one does."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if (
            ref.get("controller")
            and ref.get("kind") == "DataKey"
            and str(ref.get("apiVersion") or "").startswith(f"{GROUP}/")
            and ref.get("name")
            and ref.get("uid")
        ):
            return str(ref["name"]), str(ref["uid"])
    return None


def status_secret_name(datakey: Obj) -> str | None:
    """The Secret a DataKey's status says it publishes (written before the Secret is)."""
    name = ((datakey.get("status") or {}).get("secretRef") or {}).get("name")
    return str(name) if name else None


def is_datakey_secret(secret: Obj, datakey: Obj | None) -> bool:
    """Whether ``secret`` is the one ``datakey`` publishes: controlled by that DataKey (uid)
    and named by its status. Labels alone prove nothing: anyone who may create Secrets can
    set them."""
    if datakey is None:
        return False
    meta, dk_meta = secret.get("metadata") or {}, datakey.get("metadata") or {}
    return (
        meta.get("namespace") == dk_meta.get("namespace")
        and (controller_ref(secret) or ("", ""))[1] == dk_meta.get("uid")
        and status_secret_name(datakey) == meta.get("name")
    )


_SECRET_META = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations")
MAX_CACHED_SECRET_DATA = 64 * 1024


def trim_secret(secret: Obj) -> dict[str, Any]:
    """What the store keeps of a Secret: identifying metadata, and ``data`` only when it came
    with the object and is small (a Secret the operator wrote). Metadata-only entries make
    the reconciler GET the Secret when it needs the data."""
    meta = secret.get("metadata") or {}
    kept: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {k: meta[k] for k in _SECRET_META if k in meta},
    }
    if meta.get("ownerReferences"):
        kept["metadata"]["ownerReferences"] = [dict(r) for r in meta["ownerReferences"]]
    data = secret.get("data")
    if isinstance(data, Mapping):
        size = sum(len(k) + len(str(v)) for k, v in data.items())
        if size <= MAX_CACHED_SECRET_DATA:
            kept["data"] = dict(data)
    return kept


def keyring_policy(obj: Obj) -> str | None:
    """The RotationPolicy a KeyRing names."""
    ref = (obj.get("spec") or {}).get("rotationPolicyRef") or {}
    name = ref.get("name")
    return str(name) if name else None


def matters_to_datakeys(old: Obj | None, new: Obj | None) -> bool:
    """Whether a KeyRing change can change what its DataKeys should do."""

    def view(o: Obj | None) -> tuple[Any, ...]:
        if o is None:
            return ()
        meta, status = o.get("metadata") or {}, o.get("status") or {}
        return (
            meta.get("generation"),
            meta.get("deletionTimestamp"),
            status.get("primaryVersion"),
            status.get("lastRotationReason"),
            (meta.get("annotations") or {}).get(REWRAP_ANNOTATION),
        )

    return view(old) != view(new)


@dataclass
class HsmHealth:
    serving: bool | None = None  # None until the first check
    reason: str = ""
    message: str = ""


@dataclass
class Runtime:
    kube: KubeApi
    hsm: KeyService
    events: Events
    metrics: OperatorMetrics
    clock: Clock = lambda: dt.datetime.now(dt.UTC)
    keyrings: Store = field(default_factory=lambda: Store(keyring_policy))
    datakeys: Store = field(default_factory=lambda: Store(datakey_keyring))
    policies: Store = field(default_factory=Store)
    secrets: Store = field(default_factory=lambda: Store(_secret_keyring))
    namespaces: Store = field(default_factory=Store)
    escrow_agents: Store = field(default_factory=Store)
    # The operator's own namespace (its Lease, and the Secrets holding escrow packages).
    namespace: str = "kustody-system"
    queue: WorkQueue[QueueKey] = field(default_factory=WorkQueue)
    health: HsmHealth = field(default_factory=HsmHealth)
    max_batch: int = 100
    # uid -> (resourceVersion, the KEK versions its generations are wrapped under): a KeyRing
    # pass looks at every DataKey of the ring, up to once a second while they change.
    _in_use: dict[str, tuple[str, frozenset[int]]] = field(default_factory=dict)
    _generate: Batcher[GenerateItem, DataKey] | None = None
    _rewrap: dict[int, Batcher[tuple[str, Binding], ReWrapped]] = field(default_factory=dict)

    # -- queueing ------------------------------------------------------------------------

    def enqueue(self, kind: str, namespace: str | None, name: str, delay: float = 0.0) -> None:
        self.queue.add((kind, namespace or "", name), delay)

    def namespace_allowed(self, allowed: NamespaceSelector, namespace: str) -> bool:
        """Whether a KeyRing's ``allowedNamespaces`` lets ``namespace`` in (cached labels)."""
        ns_obj = self.namespaces.get(None, namespace)
        labels = ((ns_obj or {}).get("metadata") or {}).get("labels") or {}
        return allowed.allows(namespace, labels if ns_obj is not None else None)

    def admit_secret(self, secret: Obj) -> bool:
        """Keep ``secret`` (trimmed) if it is a DataKey's own; returns whether the store changed.
        Anything else that carries Kustody's labels is ignored: it is neither cached nor
        counted, so no tenant can make the operator hold its Secrets or steer a KeyRing."""
        meta = secret.get("metadata") or {}
        namespace, name = meta.get("namespace"), str(meta.get("name") or "")
        ref = controller_ref(secret)
        owner = self.datakeys.get(namespace, ref[0]) if ref is not None else None
        if owner is None or not is_datakey_secret(secret, owner):
            if self.secrets.get(namespace, name) is not None:
                self.secrets.delete(namespace, name)
                return True
            return False
        return self.secrets.put(trim_secret(secret))

    def wrapping_versions(self, datakey: Obj) -> frozenset[int]:
        """The KEK versions ``datakey``'s generations are wrapped under (from its status),
        parsed once per resourceVersion."""
        meta = datakey.get("metadata") or {}
        uid, version = str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")
        held = self._in_use.get(uid)
        if held is not None and held[0] == version and version:
            return held[1]
        generations = keyset.from_status(datakey.get("status") or {}, uid)
        versions = frozenset(keyset.versions_in_use(generations))
        if len(self._in_use) > 2 * len(self.datakeys) + 1000:  # forget deleted DataKeys
            self._in_use.clear()
        self._in_use[uid] = (version, versions)
        return versions

    def keyring_delay(self, keyring: str) -> float:
        """How soon a KeyRing looks again after one of its DataKeys or their Secrets changed:
        a pass looks at all of them, so while thousands change it looks every few seconds
        (1 s up to 2,000 DataKeys, 5 s at 10,000, at most 10 s)."""
        return min(10.0, max(1.0, self.datakeys.count(keyring) / 2000))

    def enqueue_datakeys_of(self, keyring: str, delay: float = 0.0) -> None:
        for dk in self.datakeys.by_index(keyring):
            meta = dk["metadata"]
            self.enqueue(DATAKEY, meta.get("namespace"), meta["name"], delay)

    # -- HSM calls, measured ----------------------------------------------------------------

    async def call_hsm(self, op: str, call: Awaitable[T]) -> T:
        try:
            result = await call
        except HsmError as exc:
            self.metrics.hsm_requests.labels(op, str(exc.reason)).inc()
            raise
        self.metrics.hsm_requests.labels(op, "ok").inc()
        return result

    async def generate(self, item: GenerateItem) -> DataKey:
        if self._generate is None:
            self._generate = Batcher(self._send_generate, max_batch=self.max_batch)
        return await self._generate.submit(item)

    async def rewrap(self, wrapped: str, binding: Binding, to_version: int) -> ReWrapped:
        batcher = self._rewrap.get(to_version)
        if batcher is None:

            async def send(items: Sequence[tuple[str, Binding]]) -> list[ReWrapped | HsmError]:
                return await self._measured_batch(
                    "BatchReWrap", self.hsm.batch_rewrap(items, to_version=to_version)
                )

            batcher = self._rewrap[to_version] = Batcher(send, max_batch=self.max_batch)
        return await batcher.submit((wrapped, binding))

    async def _send_generate(self, items: Sequence[GenerateItem]) -> list[DataKey | HsmError]:
        return await self._measured_batch(
            "BatchGenerateDataKey", self.hsm.batch_generate_data_keys(items)
        )

    async def _measured_batch(self, op: str, call: Awaitable[list[Any]]) -> list[Any]:
        results = await self.call_hsm(op, call)
        failed = sum(1 for r in results if isinstance(r, HsmError))
        if failed:
            self.metrics.hsm_requests.labels(f"{op}Item", "error").inc(failed)
        return results

    def hsm_checked(self, serving: bool, reason: str, message: str) -> bool:
        """Record a health result; returns True when the sidecar just came back."""
        came_back = serving and self.health.serving is False
        self.health = HsmHealth(serving, reason, message)
        self.metrics.hsm_up.labels("serving" if serving else "not_serving").inc()
        return came_back
