"""The DataKey reconciler against the fakes (kustody.testing.fakes): the branches the cluster
tests cover, in milliseconds, through the entry point and what can be observed (the DataKey,
its Secret, Events, the keys in the fake HSM, metrics)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from kustody.api.client import Binding, HsmError, Reason
from kustody.controller.datakey import reconciler as datakey_reconciler
from kustody.domain.envelope import Envelope
from kustody.domain.keyset import KEEP_ANNOTATION, REGENERATE_ANNOTATION
from kustody.domain.specs import ROTATE_ANNOTATION
from kustody.domain.timestamps import format_time
from kustody.kube.errors import Unavailable
from kustody.kube.resources import DATAKEYS, KEYRINGS, NAMESPACES, SECRETS, WORKLOADS
from kustody.kube.workloads import OPT_IN_ANNOTATION
from kustody.testing.fakes import (
    FakeOperator,
    api_error,
    condition,
    datakey,
    keyring,
    secret_entries,
)

NS = "shop"
DEPLOYMENTS = WORKLOADS["Deployment"]


def scenario(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body in a fresh event loop."""

    def test() -> None:
        asyncio.run(body())

    test.__doc__ = body.__doc__
    return test


def dk(op: FakeOperator, name: str = "db", ns: str = NS) -> dict[str, Any]:
    obj = op.kube.object(DATAKEYS, name, ns)
    assert obj is not None
    return obj


def secret(op: FakeOperator, name: str = "db-dek", ns: str = NS) -> dict[str, Any] | None:
    return op.kube.object(SECRETS, name, ns)


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return condition(obj, "Ready")


def dek(op: FakeOperator, wrapped: str, name: str = "db", **context: str) -> bytes:
    return op.hsm.unseal(wrapped, Binding(NS, name, context))


async def setup(
    op: FakeOperator, name: str = "db", ring: str = "ring", *, ring_spec: Any = None, **spec: Any
) -> None:
    """A KeyRing allowing NS (``ring_spec``: more of its spec) and a DataKey under it."""
    if op.kube.object(KEYRINGS, ring) is None:
        op.kube.add(KEYRINGS, keyring(ring, [NS], **(ring_spec or {})))
    op.kube.add(DATAKEYS, datakey(name, NS, ring, **spec))
    await op.run_until_idle()


async def rotate(op: FakeOperator, ring: str = "ring") -> None:
    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, ring, {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    await op.run_until_idle()


# -- a new key ------------------------------------------------------------------------------


@scenario
async def test_a_datakey_gets_a_wrapped_key_in_an_owned_secret_then_ready() -> None:
    op = FakeOperator()
    await setup(op, encryptionContext={"app": "orders"})
    obj = dk(op)
    status = obj["status"]
    assert ready(obj)["reason"] == "KeyAvailable"
    assert (status["keyRingVersion"], status["dekGeneration"]) == (1, 1)
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    envelope = Envelope.from_text(status["wrappedKey"])
    assert (envelope.key.key_ring, envelope.key.version) == ("ring", 1)

    live = secret(op)
    assert live is not None
    assert live["type"] == "kustody.io/wrapped-key"
    (owner,) = live["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "DataKey", "db", obj["metadata"]["uid"], True,
    )  # fmt: skip
    assert live["metadata"]["labels"]["kustody.io/keyring-version"] == "1"
    data = secret_entries(live)
    assert set(data) == {"wrapped-key", "key-ring", "key-version", "encryption-context", "keyset"}
    assert data["wrapped-key"] == status["wrappedKey"]
    assert json.loads(data["encryption-context"]) == {
        "keyRing": "ring", "namespace": NS, "dataKey": "db", "encryptionContext": {"app": "orders"},
    }  # fmt: skip
    (only,) = json.loads(data["keyset"])["keys"]
    assert only["wrappedKey"] == status["wrappedKey"]
    assert len(dek(op, status["wrappedKey"], app="orders")) == 32
    assert "Created" in op.events.reasons("db", NS)
    assert op.metric("kustody_dek_generations_total") == 1

    # The order of writes: key material in the status, then the Secret, only then Ready.
    writes = [(c.verb, c.kind) for c in op.kube.writes() if c.kind in ("DataKey", "Secret")]
    assert writes == [
        ("patch_status", "DataKey"),
        ("create", "Secret"),
        ("patch_status", "DataKey"),
    ]
    first, _, last = (c for c in op.kube.writes() if c.kind in ("DataKey", "Secret"))
    assert first.body["status"]["wrappedKey"] == status["wrappedKey"]
    assert all(c["reason"] != "KeyAvailable" for c in first.body["status"].get("conditions", ()))
    assert ready(last.body)["reason"] == "KeyAvailable"


@scenario
async def test_a_refused_secret_write_is_not_ready_and_the_same_key_is_published_later() -> None:
    op = FakeOperator()
    op.kube.fail_next("create", SECRETS, api_error(403, "Forbidden", "Secrets are frozen here"))
    op.kube.add(KEYRINGS, keyring("ring", [NS]))
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle(horizon=0)  # not on to the retry yet
    obj = dk(op)
    assert ready(obj)["reason"] == "SecretWriteFailed"
    assert "Secrets are frozen here" in ready(obj)["message"]
    assert obj["status"]["wrappedKey"].startswith("kustody:v1:")  # recorded before the write
    assert secret(op) is None
    assert "SecretWriteFailed" in op.events.reasons("db", NS)
    assert op.metric("kustody_secret_write_failures_total") == 1
    wrapped = obj["status"]["wrappedKey"]

    await op.advance(1)  # the retry (backoff) finds the write allowed now
    assert ready(dk(op))["reason"] == "KeyAvailable"
    assert dk(op)["status"]["wrappedKey"] == wrapped
    assert secret_entries(secret(op) or {})["wrapped-key"] == wrapped
    assert len(op.hsm.ops("batch_generate_data_keys")) == 1  # never generated twice


@pytest.mark.parametrize("status", [409, 500])
def test_a_conflict_or_an_unavailable_api_is_retried_not_reported(status: int) -> None:
    async def body() -> None:
        op = FakeOperator()
        op.kube.fail_next("create", SECRETS, api_error(status))
        await setup(op)
        assert ready(dk(op))["reason"] == "KeyAvailable"
        assert "SecretWriteFailed" not in op.events.reasons("db", NS)
        assert op.metric("kustody_secret_write_failures_total") == 0
        # The retry publishes the key the status recorded before the failed write.
        assert len(op.hsm.ops("batch_generate_data_keys")) == 1
        assert secret_entries(secret(op) or {})["wrapped-key"] == dk(op)["status"]["wrappedKey"]

    asyncio.run(body())


@scenario
async def test_a_deleted_or_edited_secret_is_restored_with_the_same_key() -> None:
    op = FakeOperator()
    await setup(op)
    original = secret_entries(secret(op) or {})
    op.kube.remove(SECRETS, "db-dek", NS)
    await op.run_until_idle()
    assert secret_entries(secret(op) or {}) == original

    garbage = base64.b64encode(b"garbage").decode()
    op.kube.edit(SECRETS, "db-dek", {"data": {"wrapped-key": garbage, "extra": "eA=="}}, NS)
    await op.run_until_idle()
    assert secret_entries(secret(op) or {}) == original
    assert "SecretRestored" in op.events.reasons("db", NS)
    assert len(op.hsm.ops("batch_generate_data_keys")) == 1


@scenario
async def test_an_existing_foreign_secret_is_never_overwritten() -> None:
    op = FakeOperator()
    op.kube.add(SECRETS, {"metadata": {"name": "db-dek", "namespace": NS}, "data": {"m": "MQ=="}})
    await setup(op)
    assert ready(dk(op))["reason"] == "SecretConflict"
    live = secret(op) or {}
    assert live["data"] == {"m": "MQ=="}
    assert "ownerReferences" not in live["metadata"]
    assert op.hsm.ops("batch_generate_data_keys") == []


# -- rotation, regeneration, retention -----------------------------------------------------


@scenario
async def test_a_rotation_rewraps_the_same_key_without_restarting_workloads() -> None:
    op = FakeOperator()
    op.kube.add(DEPLOYMENTS, deployment("api", opted_in="db"))
    await setup(op, rolloutRestartTargets=[{"kind": "Deployment", "name": "api"}])
    before = dek(op, dk(op)["status"]["wrappedKey"])
    await rotate(op)
    status = dk(op)["status"]
    assert (status["keyRingVersion"], status["dekGeneration"]) == (2, 1)
    assert "lastRewrapAt" in status
    assert dek(op, status["wrappedKey"]) == before
    assert secret_entries(secret(op) or {})["key-version"] == "2"
    assert "Rewrapped" in op.events.reasons("db", NS)
    assert op.metric("kustody_rewraps_total") == 1
    workload = op.kube.object(DEPLOYMENTS, "api", NS) or {}
    assert workload["metadata"]["generation"] == 1
    assert condition(op.kube.object(KEYRINGS, "ring"), "Rotating")["reason"] == "UpToDate"


@scenario
async def test_manual_rewrap_waits_for_the_request() -> None:
    from kustody.domain.specs import REWRAP_ANNOTATION
    from kustody.kube.resources import ROTATION_POLICIES
    from kustody.testing.fakes import rotation_policy

    op = FakeOperator()
    op.kube.add(ROTATION_POLICIES, rotation_policy("manual", rewrap="Manual"))
    await setup(op, ring_spec={"rotationPolicyRef": {"name": "manual"}})
    await rotate(op)
    assert dk(op)["status"]["keyRingVersion"] == 1
    op.clock.advance(1)
    asked = format_time(op.clock())
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {REWRAP_ANNOTATION: asked}}})
    await op.run_until_idle()
    assert dk(op)["status"]["keyRingVersion"] == 2


@scenario
async def test_regeneration_keeps_old_generations_and_restarts_opted_in_targets_once() -> None:
    op = FakeOperator()
    op.kube.add(DEPLOYMENTS, deployment("worker", opted_in="other, db"))
    op.kube.add(DEPLOYMENTS, deployment("bystander"))
    targets = [{"kind": "Deployment", "name": n} for n in ("worker", "bystander", "missing")]
    await setup(op, regenerateAfter="24h", rolloutRestartTargets=targets)
    first = dek(op, dk(op)["status"]["wrappedKey"])
    assert op.kube.requests("patch", DEPLOYMENTS) == []  # generation 1 restarts nothing

    await op.advance(hours=24)
    status = dk(op)["status"]
    assert status["dekGeneration"] == 2
    assert [g["state"] for g in status["generations"]] == ["DecryptOnly", "Primary"]
    assert dek(op, status["wrappedKey"]) != first
    assert dek(op, status["generations"][0]["wrappedKey"]) == first
    keys = json.loads(secret_entries(secret(op) or {})["keyset"])["keys"]
    assert [k["generation"] for k in keys] == [1, 2]
    reasons = op.events.reasons("db", NS)
    assert "Regenerated" in reasons
    assert "RolloutRestartTriggered" in reasons
    assert "RolloutTargetNotOptedIn" in reasons
    assert "RolloutTargetNotFound" in reasons
    worker = op.kube.object(DEPLOYMENTS, "worker", NS) or {}
    assert worker["spec"]["template"]["metadata"]["annotations"]["dk.kustody.io/db"] == "2"
    assert worker["metadata"]["generation"] == 2
    assert (op.kube.object(DEPLOYMENTS, "bystander", NS) or {})["metadata"]["generation"] == 1

    # Further passes (a resync, a label) do not restart it again for the same generation.
    op.kube.edit(DATAKEYS, "db", {"metadata": {"labels": {"poke": "1"}}}, NS)
    await op.advance(hours=1)
    assert (op.kube.object(DEPLOYMENTS, "worker", NS) or {})["metadata"]["generation"] == 2
    assert op.events.reasons("db", NS).count("RolloutRestartTriggered") == 1


@scenario
async def test_a_regeneration_request_makes_new_key_material_once() -> None:
    op = FakeOperator()
    await setup(op)
    value = format_time(op.clock())
    op.kube.edit(DATAKEYS, "db", {"metadata": {"annotations": {REGENERATE_ANNOTATION: value}}}, NS)
    await op.run_until_idle()
    assert dk(op)["status"]["dekGeneration"] == 2
    assert dk(op)["status"]["lastRegenerateRequest"] == value
    await op.advance(hours=1)
    assert dk(op)["status"]["dekGeneration"] == 2


@scenario
async def test_a_regeneration_interrupted_before_the_secret_write_is_finished_not_repeated() -> (
    None
):
    """As after a crash between the status write and the Secret write."""
    op = FakeOperator()
    await setup(op)
    op.kube.fail_next("patch", SECRETS, api_error(500))
    value = format_time(op.clock())
    op.kube.edit(DATAKEYS, "db", {"metadata": {"annotations": {REGENERATE_ANNOTATION: value}}}, NS)
    await op.run_until_idle()
    assert [type(e) for e in op.errors()] == [Unavailable]  # the refused Secret write
    status = dk(op)["status"]
    assert status["dekGeneration"] == 2
    assert len(op.hsm.ops("batch_generate_data_keys")) == 2  # generation 1 and 2, once each
    live = secret(op) or {}
    assert live["metadata"]["annotations"]["kustody.io/dek-generation"] == "2"
    assert secret_entries(live)["wrapped-key"] == status["wrappedKey"]
    assert ready(dk(op))["reason"] == "KeyAvailable"


@scenario
async def test_staged_removal_is_visible_cancellable_and_happens_on_time() -> None:
    op = FakeOperator()
    await setup(op)
    for _ in range(2):
        op.clock.advance(60)
        value = format_time(op.clock())
        annotations = {REGENERATE_ANNOTATION: value}
        op.kube.edit(DATAKEYS, "db", {"metadata": {"annotations": annotations}}, NS)
        await op.run_until_idle()
    generations = dk(op)["status"]["generations"]
    assert len(generations) == 3
    assert all(g["state"] != "RemovalScheduled" for g in generations)  # no retention: kept

    retention = {"keepGenerations": 2, "removalDelay": "1h"}
    op.kube.edit(DATAKEYS, "db", {"spec": {"retention": retention}}, NS)
    await op.run_until_idle()
    generations = dk(op)["status"]["generations"]
    assert [g["state"] for g in generations] == ["RemovalScheduled", "DecryptOnly", "Primary"]
    assert "removeAt" in generations[0]
    assert "GenerationRemovalScheduled" in op.events.reasons("db", NS)

    op.kube.edit(DATAKEYS, "db", {"metadata": {"annotations": {KEEP_ANNOTATION: "1"}}}, NS)
    await op.run_until_idle()
    assert dk(op)["status"]["generations"][0]["state"] == "DecryptOnly"
    assert "GenerationRemovalCancelled" in op.events.reasons("db", NS)

    op.kube.edit(DATAKEYS, "db", {"metadata": {"annotations": {KEEP_ANNOTATION: None}}}, NS)
    await op.run_until_idle()
    assert dk(op)["status"]["generations"][0]["state"] == "RemovalScheduled"
    await op.advance(hours=1)
    assert [g["generation"] for g in dk(op)["status"]["generations"]] == [2, 3]
    keys = json.loads(secret_entries(secret(op) or {})["keyset"])["keys"]
    assert [k["generation"] for k in keys] == [2, 3]
    assert "GenerationRemoved" in op.events.reasons("db", NS)
    assert op.metric("kustody_dek_generations_removed_total") == 1
    assert ready(dk(op))["status"] == "True"


@scenario
async def test_an_old_format_status_is_taken_as_generation_1_with_the_same_key() -> None:
    op = FakeOperator()
    await setup(op)
    wrapped = dk(op)["status"]["wrappedKey"]
    op.kube.edit(DATAKEYS, "db", {"status": {"generations": None}}, NS, status=True)
    await op.run_until_idle()
    (g,) = dk(op)["status"]["generations"]
    assert (g["generation"], g["state"], g["wrappedKey"]) == (1, "Primary", wrapped)
    assert len(op.hsm.ops("batch_generate_data_keys")) == 1


# -- adoption --------------------------------------------------------------------------------


async def orphaned_secret(op: FakeOperator) -> tuple[dict[str, Any], bytes]:
    """A DataKey's Secret as a backup restore leaves it: no owner, same keys."""
    await setup(op)
    live = secret(op) or {}
    key = dek(op, dk(op)["status"]["wrappedKey"])
    op.kube.remove(DATAKEYS, "db", NS)  # its Secret goes with it (garbage collection)
    await op.run_until_idle()
    assert secret(op) is None
    restored = {
        "metadata": {
            "name": "db-dek",
            "namespace": NS,
            "labels": live["metadata"]["labels"],
            "annotations": {"kustody.io/restored-from": "backup"},
        },
        "data": live["data"],
    }
    return restored, key


@scenario
async def test_a_recreated_datakey_adopts_its_old_secret_with_the_same_key() -> None:
    op = FakeOperator()
    restored, key = await orphaned_secret(op)
    op.kube.add(SECRETS, restored)
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle()
    obj = dk(op)
    assert ready(obj)["reason"] == "KeyAvailable"
    assert "adoptedAt" in obj["status"]
    assert dek(op, obj["status"]["wrappedKey"]) == key
    live = secret(op) or {}
    assert live["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert "Adopted" in op.events.reasons("db", NS)
    assert op.metric("kustody_datakey_adoptions_total", outcome="adopted") == 1
    assert len(op.hsm.ops("batch_generate_data_keys")) == 1  # the first DataKey's only


@scenario
async def test_a_secret_that_does_not_open_under_this_binding_is_refused() -> None:
    op = FakeOperator()
    restored, _ = await orphaned_secret(op)
    op.kube.add(SECRETS, restored)
    op.kube.add(DATAKEYS, datakey("db", NS, "ring", encryptionContext={"other": "context"}))
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "AdoptionRefused"
    assert "AAD_MISMATCH" in ready(dk(op))["message"]
    assert op.metric("kustody_datakey_adoptions_total", outcome="refused") == 1
    assert len(op.hsm.ops("batch_generate_data_keys")) == 1  # no new key meanwhile
    assert "ownerReferences" not in (secret(op) or {})["metadata"]


@scenario
async def test_an_envelope_of_another_keyring_is_neither_decrypted_nor_rewrapped() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("closed", [NS]))
    await setup(op, ring="open", ring_spec={"allowPlaintextExport": True}, exposePlaintext=True)
    await setup(op, name="victim", ring="closed")
    foreign = dk(op, "victim")["status"]["wrappedKey"]
    # Same name, now under the open KeyRing, with the closed KeyRing's envelope in its status.
    op.kube.remove(DATAKEYS, "victim", NS)
    op.kube.add(DATAKEYS, datakey("victim", NS, "open", exposePlaintext=True))
    op.kube.edit(
        DATAKEYS, "victim", {"status": {"wrappedKey": foreign, "keyRingVersion": 1}}, NS,
        status=True,
    )  # fmt: skip
    op.hsm.calls.clear()
    await op.run_until_idle()
    assert ready(dk(op, "victim"))["reason"] == "EnvelopeMismatch"
    assert "neither decrypted nor re-wrapped" in ready(dk(op, "victim"))["message"]
    assert "EnvelopeMismatch" in op.events.reasons("victim", NS)
    assert op.hsm.ops("decrypt") == []
    assert op.hsm.ops("batch_rewrap") == []
    assert secret(op, "victim-dek") is None


# -- the KeyRing's rules ---------------------------------------------------------------------


@scenario
async def test_a_namespace_the_keyring_does_not_allow_gets_no_key() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("ring", ["elsewhere"]))
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "NamespaceNotAllowed"
    assert "wrappedKey" not in dk(op)["status"]
    assert secret(op) is None
    assert "NamespaceNotAllowed" in op.events.reasons("db", NS)
    assert op.hsm.ops("batch_generate_data_keys") == []


@scenario
async def test_a_namespace_selector_allows_a_namespace_once_it_is_labelled() -> None:
    op = FakeOperator()
    op.kube.add(NAMESPACES, {"metadata": {"name": NS}})
    selector = {"selector": {"matchLabels": {"team": "shop"}}}
    op.kube.add(KEYRINGS, keyring("ring", [], allowedNamespaces=selector))
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "NamespaceNotAllowed"
    op.kube.edit(NAMESPACES, NS, {"metadata": {"labels": {"team": "shop"}}})
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "KeyAvailable"


@scenario
async def test_a_missing_keyring_is_waited_for() -> None:
    op = FakeOperator()
    op.kube.add(DATAKEYS, datakey("db", NS, "late"))
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "KeyRingNotFound"
    assert secret(op) is None
    op.kube.add(KEYRINGS, keyring("late", [NS]))
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "KeyAvailable"


@scenario
async def test_plaintext_is_published_only_where_the_keyring_allows_and_withdrawn_after() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("closed", [NS]))
    await setup(op, name="refused", ring="closed", exposePlaintext=True)
    assert ready(dk(op, "refused"))["reason"] == "PlaintextExportNotAllowed"
    assert secret(op, "refused-dek") is None

    await setup(op, ring="open", ring_spec={"allowPlaintextExport": True}, exposePlaintext=True)
    assert ready(dk(op))["reason"] == "KeyAvailable"
    entries = secret_entries(secret(op) or {})
    plaintext = base64.b64decode((secret(op) or {})["data"]["plaintext-key"])
    assert plaintext == dek(op, entries["wrapped-key"])

    # 1. The KeyRing stops allowing plaintext export: the entry leaves the Secret.
    op.kube.edit(KEYRINGS, "open", {"spec": {"allowPlaintextExport": False}})
    await op.run_until_idle()
    assert "plaintext-key" not in (secret(op) or {})["data"]
    assert ready(dk(op))["reason"] == "PlaintextExportNotAllowed"
    assert "PlaintextWithdrawn" in op.events.reasons("db", NS)
    assert dek(op, secret_entries(secret(op) or {})["wrapped-key"]) == plaintext  # no key lost

    # 2. Allowed again, then the namespace is no longer allowed: withdrawn again.
    op.kube.edit(KEYRINGS, "open", {"spec": {"allowPlaintextExport": True}})
    await op.run_until_idle()
    assert "plaintext-key" in (secret(op) or {})["data"]
    op.kube.edit(KEYRINGS, "open", {"spec": {"allowedNamespaces": {"names": ["elsewhere"]}}})
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "NamespaceNotAllowed"
    assert "plaintext-key" not in (secret(op) or {})["data"]
    assert op.events.reasons("db", NS).count("PlaintextWithdrawn") == 2


@scenario
async def test_a_datakey_of_a_keyring_being_deleted_waits() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("ring", [NS], deletionPolicy="Destroy"))
    await op.run_until_idle()
    op.kube.remove(KEYRINGS, "ring")
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "KeyRingDeleting"
    assert secret(op) is None


@scenario
async def test_an_unreadable_spec_is_reported() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("ring", [NS]))
    op.kube.add(DATAKEYS, {"metadata": {"name": "db", "namespace": NS}, "spec": {"x": 1}})
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "InvalidSpec"
    assert "InvalidSpec" in op.events.reasons("db", NS)


# -- the HSM ---------------------------------------------------------------------------------


@scenario
async def test_an_unavailable_hsm_leaves_published_keys_alone_and_new_ones_wait() -> None:
    op = FakeOperator()
    await setup(op, name="before")
    published = secret(op, "before-dek") or {}
    op.hsm.set_unavailable()
    op.kube.add(DATAKEYS, datakey("during", NS, "ring"))
    op.deliver()
    with pytest.raises(HsmError) as err:
        await datakey_reconciler.reconcile(op.rt, NS, "during")
    assert err.value.reason is Reason.TOKEN_UNAVAILABLE
    during = dk(op, "during")
    assert ready(during)["reason"] == "HSMUnavailable"
    assert "TOKEN_UNAVAILABLE" in ready(during)["message"]
    assert "HSMError" in op.events.reasons("during", NS)
    assert (secret(op, "before-dek") or {})["metadata"] == published["metadata"]

    op.hsm.set_available()
    await op.advance(1)
    assert ready(dk(op, "during"))["reason"] == "KeyAvailable"
    assert (secret(op, "before-dek") or {})["metadata"]["resourceVersion"] == (
        published["metadata"]["resourceVersion"]
    )


@scenario
async def test_a_failed_rewrap_keeps_a_published_key_ready() -> None:
    op = FakeOperator()
    await setup(op)
    op.hsm.fail_next("batch_rewrap", Reason.TOKEN_UNAVAILABLE)
    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    await op.run_until_idle(horizon=0)
    assert ready(dk(op))["reason"] == "KeyAvailable"  # its key still works
    assert "HSMError" in op.events.reasons("db", NS)
    await op.run_until_idle()
    assert dk(op)["status"]["keyRingVersion"] == 2


def deployment(name: str, opted_in: str | None = None) -> dict[str, Any]:
    annotations = {OPT_IN_ANNOTATION: opted_in} if opted_in else {}
    return {
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {"template": {"metadata": {"labels": {"app": name}}, "spec": {}}},
    }


@scenario
async def test_a_secret_stored_differently_than_written_is_not_ready() -> None:
    """A mutating admission webhook changed the Secret: the write's response tells."""
    op = FakeOperator()

    def strip_keyset(obj: dict[str, Any]) -> None:
        (obj.get("data") or {}).pop("keyset", None)

    op.kube.mutate(SECRETS, strip_keyset)
    op.kube.add(KEYRINGS, keyring("ring", [NS]))
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle(horizon=0)
    assert ready(dk(op))["reason"] == "SecretWriteFailed"
    assert "stored a different Secret" in ready(dk(op))["message"]
    assert op.metric("kustody_secret_write_failures_total") == 1
    op.kube.mutate(SECRETS, None)
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "KeyAvailable"
    assert "keyset" in (secret(op) or {})["data"]


@scenario
async def test_no_plaintext_key_in_events_or_any_status() -> None:
    op = FakeOperator()
    await setup(op, ring_spec={"allowPlaintextExport": True}, exposePlaintext=True)
    await rotate(op)
    plaintext = base64.b64decode((secret(op) or {})["data"]["plaintext-key"])
    needles = (plaintext.hex(), plaintext.hex().upper(), base64.b64encode(plaintext).decode())
    haystacks = [e.message for e in op.events.recorded]
    haystacks += [json.dumps(o) for o in op.kube.objects(KEYRINGS) + op.kube.objects(DATAKEYS)]
    haystacks += [json.dumps(c.body) for c in op.kube.calls if c.kind != "Secret"]
    for text in haystacks:
        for needle in needles:
            assert needle not in text


# -- more of adoption and the KeyRing's state ------------------------------------------------


def _ours(name: str = "db", ring: str = "ring") -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "kustody",
        "kustody.io/datakey": name,
        "kustody.io/keyring": ring,
    }


@pytest.mark.parametrize(
    ("metadata", "data", "why"),
    [
        ({"labels": _ours(ring="other")}, {}, "labels"),
        (
            {
                "labels": _ours(),
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x", "uid": "u",
                     "controller": True},
                ],
            },
            {"keyset": "e30="},
            "controlled by Deployment x",
        ),
        ({"labels": _ours()}, {}, "no keyset entry"),
        ({"labels": _ours()}, {"keyset": base64.b64encode(b"not json").decode()}, "cannot be"),
    ],
)  # fmt: skip
def test_a_secret_that_cannot_be_adopted_is_left_untouched(
    metadata: dict[str, Any], data: dict[str, str], why: str
) -> None:
    async def body() -> None:
        op = FakeOperator()
        body = {"metadata": {"name": "db-dek", "namespace": NS, **metadata}, "data": data}
        before = op.kube.add(SECRETS, body)
        await setup(op)
        ready_ = ready(dk(op))
        assert ready_["reason"] == "SecretConflict"
        assert why in ready_["message"]
        assert secret(op) == before
        assert op.hsm.ops("batch_generate_data_keys") == []

    asyncio.run(body())


@scenario
async def test_an_adoption_interrupted_before_the_secret_is_owned_is_finished() -> None:
    op = FakeOperator()
    restored, key = await orphaned_secret(op)
    op.kube.add(SECRETS, restored)
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    op.kube.fail_next("patch", SECRETS, api_error(500))  # taking the Secret over fails once
    await op.run_until_idle()
    assert [type(e) for e in op.errors()] == [Unavailable]
    obj = dk(op)
    assert ready(obj)["reason"] == "KeyAvailable"
    assert dek(op, obj["status"]["wrappedKey"]) == key
    live = secret(op) or {}
    assert live["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert "kustody.io/restored-from" in live["metadata"]["annotations"]
    assert op.events.reasons("db", NS).count("Adopted") == 1
    assert op.metric("kustody_datakey_adoptions_total", outcome="adopted") == 1
    assert len(op.hsm.ops("batch_generate_data_keys")) == 1


@scenario
async def test_a_secret_with_keys_of_another_keyring_is_not_adopted() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("other", [NS]))
    await setup(op, name="db", ring="other")
    live = secret(op) or {}
    op.kube.remove(DATAKEYS, "db", NS)
    await op.run_until_idle()
    labels = {**live["metadata"]["labels"], "kustody.io/keyring": "ring"}
    op.kube.add(SECRETS, {"metadata": {"name": "db-dek", "namespace": NS, "labels": labels},
                          "data": live["data"]})  # fmt: skip
    await setup(op, name="db", ring="ring")
    assert ready(dk(op))["reason"] == "AdoptionRefused"
    assert "KeyRing other" in ready(dk(op))["message"]
    assert op.hsm.ops("batch_rewrap") == []


@scenario
async def test_a_keyring_that_is_not_ready_makes_the_datakey_wait() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, {"metadata": {"name": "broken"}, "spec": {"deletionPolicy": "?"}})
    op.kube.add(DATAKEYS, datakey("a", NS, "broken"))
    op.hsm.set_unavailable()  # the next KeyRing cannot make its version 1
    op.kube.add(KEYRINGS, keyring("empty", [NS]))
    op.kube.add(DATAKEYS, datakey("b", NS, "empty"))
    await op.run_until_idle(horizon=0)
    assert ready(dk(op, "a"))["reason"] == "KeyRingNotReady"
    assert "unusable spec" in ready(dk(op, "a"))["message"]
    assert ready(dk(op, "b"))["reason"] == "KeyRingNotReady"
    assert "no primary version" in ready(dk(op, "b"))["message"]
    op.hsm.set_available()
    await op.run_until_idle()
    assert ready(dk(op, "b"))["reason"] == "KeyAvailable"


@scenario
async def test_automatic_rewraps_wait_for_the_maintenance_window() -> None:
    """A scheduled rotation falls in the window; a DataKey that could not be re-wrapped in it
    (the HSM was away) waits for the next window. 2026-01-01 is a Thursday."""
    from kustody.kube.resources import ROTATION_POLICIES
    from kustody.testing.fakes import rotation_policy

    op = FakeOperator()
    window = {"days": ["Thu"], "start": "00:00", "duration": "1h"}
    policy = rotation_policy("fortnight", rotationPeriod="336h", maintenanceWindow=window)
    op.kube.add(ROTATION_POLICIES, policy)
    await setup(op, ring_spec={"rotationPolicyRef": {"name": "fortnight"}})
    op.hsm.fail_next("batch_rewrap", Reason.TOKEN_UNAVAILABLE, times=1000)
    await op.advance(hours=336)  # Thursday, two weeks later: rotated, the re-wrap fails
    assert (op.kube.object(KEYRINGS, "ring") or {})["status"]["primaryVersion"] == 2
    assert dk(op)["status"]["keyRingVersion"] == 1
    op.clock.advance(hours=2)  # the window has closed
    op.hsm.clear_faults()  # the HSM is back
    op.rt.enqueue("DataKey", NS, "db")
    await op.run_until_idle()
    assert dk(op)["status"]["keyRingVersion"] == 1  # not outside the window
    assert ready(dk(op))["reason"] == "KeyAvailable"  # its key still works
    await op.advance(hours=168 - 2)  # the next Thursday: no rotation due, the window opens
    assert (op.kube.object(KEYRINGS, "ring") or {})["status"]["primaryVersion"] == 2
    assert dk(op)["status"]["keyRingVersion"] == 2


@scenario
async def test_a_status_wrapped_key_that_is_no_envelope_is_not_used() -> None:
    op = FakeOperator()
    await setup(op)
    op.kube.edit(DATAKEYS, "db", {"status": {"generations": None, "wrappedKey": "x"}}, NS,
                 status=True)  # fmt: skip
    op.hsm.calls.clear()
    await op.run_until_idle()
    assert ready(dk(op))["reason"] == "EnvelopeMismatch"
    assert "not a Kustody envelope" in ready(dk(op))["message"]
    used = {"batch_generate_data_keys", "batch_rewrap", "decrypt"}
    assert [c for c in op.hsm.calls if c.op in used] == []


@scenario
async def test_a_datakey_deleted_during_its_pass_is_left_alone() -> None:
    op = FakeOperator()
    op.kube.add(DATAKEYS, datakey("db", NS, "absent"))
    op.kube.fail_next("patch_status", DATAKEYS, api_error(404))
    await op.run_until_idle()
    assert op.errors() == []
    assert "status" not in dk(op)
    assert op.events.recorded == []
