"""The KeyRing reconciler against the fakes (kustody.testing.fakes): every branch the cluster
tests cover, in milliseconds. Only the entry point (``keyring.reconcile`` through the
FakeOperator's worker loop) and what can be observed (API objects, Events, HSM versions,
metrics) are used, so these tests do not depend on how the reconciler is split inside."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from kustody.api.client import HsmError, Reason, VersionState
from kustody.controller.keyring import reconciler as keyring_reconciler
from kustody.domain.specs import RESTORE_ANNOTATION, ROTATE_ANNOTATION
from kustody.domain.timestamps import format_time, parse_time
from kustody.kube.errors import Unavailable
from kustody.kube.resources import DATAKEYS, KEYRINGS, ROTATION_POLICIES, SECRETS
from kustody.testing.fakes import (
    FakeOperator,
    api_error,
    condition,
    datakey,
    keyring,
    rotation_policy,
)

FINALIZER = "kustody.io/keyring-protection"
NS = "shop"


def scenario(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body in a fresh event loop."""

    def test() -> None:
        asyncio.run(body())

    test.__doc__ = body.__doc__
    return test


def ring(op: FakeOperator, name: str = "ring") -> dict[str, Any]:
    obj = op.kube.object(KEYRINGS, name)
    assert obj is not None
    return obj


def states(op: FakeOperator, name: str = "ring") -> list[str]:
    return [v["state"] for v in ring(op, name)["status"]["versions"]]


async def ready_ring(
    op: FakeOperator, name: str = "ring", policy: str | None = None, **spec: Any
) -> dict[str, Any]:
    op.kube.add(KEYRINGS, keyring(name, [NS], policy, **spec))
    await op.run_until_idle()
    obj = ring(op, name)
    assert condition(obj, "Ready")["status"] == "True", obj["status"]
    return obj


async def rotate(op: FakeOperator, name: str = "ring") -> None:
    """`kustody rotate`: the request annotation, then the operator's passes."""
    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, name, {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    await op.run_until_idle()


# -- finalizer and provisioning ----------------------------------------------------------------


@scenario
async def test_a_new_keyring_gets_its_finalizer_and_version_1() -> None:
    op = FakeOperator()
    obj = await ready_ring(op)
    assert FINALIZER in obj["metadata"]["finalizers"]
    (v1,) = obj["status"]["versions"]
    assert (v1["version"], v1["state"]) == (1, "Enabled")
    assert v1["fingerprint"] == op.hsm.fingerprint("ring", 1)
    assert obj["status"]["primaryVersion"] == 1
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "HSMReachable")["status"] == "True"
    assert condition(obj, "Rotating")["reason"] == "UpToDate"
    assert op.hsm.states("ring") == {1: VersionState.ENABLED}
    assert op.events.reasons("ring") == ["Created"]
    assert op.metric("kustody_hsm_requests_total", op="CreateKeyVersion", outcome="ok") == 1
    assert op.errors() == []


@scenario
async def test_a_pass_with_nothing_to_do_writes_nothing() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.kube.calls.clear()
    assert await keyring_reconciler.reconcile(op.rt, "ring") == 300.0
    assert op.kube.writes() == []
    assert len(op.hsm.ops("create_key_version")) == 1  # only the first pass created v1


@scenario
async def test_versions_the_token_already_holds_are_adopted_not_created() -> None:
    """deletionPolicy Retain: a KeyRing of the same name finds its versions again."""
    op = FakeOperator()
    old = op.hsm.add_version("ring", 1, VersionState.DISABLED)
    op.hsm.add_version("ring", 2)
    obj = await ready_ring(op)
    assert [(v["version"], v["state"]) for v in obj["status"]["versions"]] == [
        (1, "Disabled"),
        (2, "Enabled"),
    ]
    assert obj["status"]["versions"][0]["fingerprint"] == old.fingerprint
    assert obj["status"]["primaryVersion"] == 2
    assert "Adopted" in op.events.reasons("ring")
    assert op.hsm.ops("create_key_version") == []


# -- integrity -----------------------------------------------------------------------------


@scenario
async def test_missing_key_material_stops_everything_until_it_is_back() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.hsm.drop_version("ring", 1)
    op.hsm.calls.clear()
    assert await keyring_reconciler.reconcile(op.rt, "ring") == 30.0
    obj = ring(op)
    assert condition(obj, "Ready")["reason"] == "KeyMaterialMissing"
    assert condition(obj, "HSMReachable")["status"] == "True"
    assert "KeyMaterialMissing" in op.events.reasons("ring")
    assert {c.op for c in op.hsm.calls} == {"describe_key"}  # nothing created or changed
    assert states(op) == ["Enabled"]


@scenario
async def test_another_key_under_the_label_is_a_fingerprint_mismatch() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.hsm.replace_key("ring", 1)
    await rotate(op)  # a requested rotation must not happen either
    obj = ring(op)
    assert condition(obj, "Ready")["reason"] == "FingerprintMismatch"
    assert "FingerprintMismatch" in op.events.reasons("ring")
    assert obj["status"]["primaryVersion"] == 1
    assert op.hsm.states("ring") == {1: VersionState.ENABLED}


@scenario
async def test_token_state_drift_is_corrected_to_the_status() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.hsm.set_state("ring", 1, VersionState.DISABLED)  # changed behind the operator's back
    await keyring_reconciler.reconcile(op.rt, "ring")
    assert op.hsm.states("ring") == {1: VersionState.ENABLED}
    assert condition(ring(op), "Ready")["status"] == "True"


# -- rotation ------------------------------------------------------------------------------


@scenario
async def test_a_requested_rotation_makes_version_2_primary_once() -> None:
    op = FakeOperator()
    await ready_ring(op)
    await rotate(op)
    status = ring(op)["status"]
    assert status["primaryVersion"] == 2
    assert status["lastRotationReason"] == "Requested"
    assert status["lastRotationRequest"] == ring(op)["metadata"]["annotations"][ROTATE_ANNOTATION]
    assert states(op) == ["Enabled", "Enabled"]
    assert op.hsm.states("ring") == {1: VersionState.ENABLED, 2: VersionState.ENABLED}
    assert op.events.reasons("ring").count("Rotated") == 1
    assert op.metric("kustody_rotations_total", outcome="success") == 1
    # The same request seen again (a resync) rotates nothing.
    await op.advance(hours=1)
    assert ring(op)["status"]["primaryVersion"] == 2
    assert len(op.hsm.ops("create_key_version")) == 2


@scenario
async def test_a_policy_rotates_on_schedule() -> None:
    op = FakeOperator()
    op.kube.add(ROTATION_POLICIES, rotation_policy("daily", rotationPeriod="24h"))
    obj = await ready_ring(op, policy="daily")
    assert obj["status"]["nextRotationAt"] == format_time(op.clock().replace(day=2))
    await op.advance(hours=23)
    assert ring(op)["status"]["primaryVersion"] == 1
    await op.advance(hours=1)
    status = ring(op)["status"]
    assert status["primaryVersion"] == 2
    assert status["lastRotationReason"] == "Scheduled"
    assert "Rotated" in op.events.reasons("ring")


@scenario
async def test_a_failed_rotation_is_counted_and_reported() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.hsm.fail_next("create_key_version", Reason.TOKEN_FULL, "no room")
    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    op.deliver()
    with pytest.raises(HsmError):
        await keyring_reconciler.reconcile(op.rt, "ring")
    assert op.metric("kustody_rotations_total", outcome="failure") == 1
    obj = ring(op)
    assert condition(obj, "Ready")["reason"] == "HSMUnavailable"
    assert condition(obj, "HSMReachable")["reason"] == "TokenFull"
    assert "HSMError" in op.events.reasons("ring")
    # The request is still pending: the next pass rotates.
    await op.run_until_idle()
    assert ring(op)["status"]["primaryVersion"] == 2
    assert condition(ring(op), "Ready")["status"] == "True"


# -- retirement, destruction, restore --------------------------------------------------------


async def retiring_ring(op: FakeOperator, **policy: str) -> None:
    spec = {"retireAfter": "0s", "destroyAfter": "24h", **policy}
    op.kube.add(ROTATION_POLICIES, rotation_policy("retire", **spec))
    await ready_ring(op, policy="retire")


@scenario
async def test_an_unreferenced_old_version_is_disabled_scheduled_then_destroyed() -> None:
    op = FakeOperator()
    await retiring_ring(op)
    await rotate(op)
    v1 = ring(op)["status"]["versions"][0]
    assert v1["state"] == "DestroyScheduled"
    assert "disabledAt" in v1
    # destroyAfter from the pass that scheduled it (the one after the disabling pass)
    waiting = parse_time(v1["destroyAt"]) - parse_time(v1["disabledAt"])  # type: ignore[operator]
    assert dt.timedelta(hours=24) <= waiting <= dt.timedelta(hours=24, seconds=5)
    assert op.hsm.state("ring", 1) is VersionState.DESTROY_SCHEDULED
    assert {"Disabled", "DestroyScheduled"} <= set(op.events.reasons("ring"))
    assert op.metric("kustody_version_transitions_total", to="Disabled") == 1

    await op.advance(hours=24)
    assert states(op) == ["Destroyed", "Enabled"]
    assert op.hsm.states("ring") == {1: VersionState.DESTROYED, 2: VersionState.ENABLED}
    assert "Destroyed" in op.events.reasons("ring")
    assert op.metric("kustody_version_transitions_total", to="Destroyed") == 1


@scenario
async def test_the_tokens_longer_waiting_period_wins_destruction_not_due() -> None:
    op = FakeOperator(min_destroy_delay=48 * 3600)
    await retiring_ring(op)
    await rotate(op)
    op.clock.advance(hours=24)  # destroyAt has come, the token's own period has not
    op.deliver()
    await keyring_reconciler.reconcile(op.rt, "ring")
    assert states(op)[0] == "DestroyScheduled"
    assert op.hsm.state("ring", 1) is VersionState.DESTROY_SCHEDULED
    assert "DestructionNotDue" in op.events.reasons("ring")
    op.clock.advance(hours=24)
    await keyring_reconciler.reconcile(op.rt, "ring")
    assert states(op)[0] == "Destroyed"
    assert op.hsm.state("ring", 1) is VersionState.DESTROYED


@scenario
async def test_a_refused_destruction_is_not_retried_every_second() -> None:
    """A DestroyVersion refused with DESTRUCTION_NOT_DUE (the token's own waiting period is
    longer) is tried again at the resync, not every second."""
    op = FakeOperator(min_destroy_delay=48 * 3600)
    await retiring_ring(op)
    await rotate(op)
    op.clock.advance(hours=24)
    op.deliver()
    again = await keyring_reconciler.reconcile(op.rt, "ring")
    assert again is not None
    assert again > 60.0


@scenario
async def test_a_version_a_datakey_still_uses_is_never_retired() -> None:
    """rewrap: Manual keeps the DataKey on v1: v1 stays Enabled and the block is reported."""
    op = FakeOperator()
    await retiring_ring(op, rewrap="Manual")
    op.kube.add(DATAKEYS, datakey("held", NS, "ring"))
    await op.run_until_idle()
    await rotate(op)
    obj = ring(op)
    assert states(op) == ["Enabled", "Enabled"]
    assert obj["status"]["versions"][0]["dataKeys"] == 1
    assert condition(obj, "Rotating")["reason"] == "ManualRewrap"
    assert "RetirementBlocked" in op.events.reasons("ring")
    assert op.hsm.state("ring", 1) is VersionState.ENABLED


@scenario
async def test_forged_labelled_secrets_hold_off_nothing() -> None:
    op = FakeOperator()
    await retiring_ring(op)
    labels = {
        "app.kubernetes.io/managed-by": "kustody",
        "kustody.io/keyring": "ring",
        "kustody.io/keyring-version": "1",
        "kustody.io/datakey": "forged",
    }
    for namespace in (NS, "tenant"):  # allowed, and not allowed, by the KeyRing
        secret = {"metadata": {"name": "forged-dek", "namespace": namespace, "labels": labels}}
        op.kube.add(SECRETS, secret)
    await rotate(op)
    obj = ring(op)
    assert states(op)[0] == "DestroyScheduled"
    assert obj["status"]["versions"][0]["dataKeys"] == 0
    assert not obj["status"]["destructionImpact"]
    assert "RetirementBlocked" not in op.events.reasons("ring")
    await op.advance(hours=24)
    assert states(op)[0] == "Destroyed"


@scenario
async def test_a_datakey_outside_the_allowed_namespaces_is_no_reference() -> None:
    op = FakeOperator()
    await retiring_ring(op, rewrap="Manual")
    op.kube.add(DATAKEYS, datakey("held", NS, "ring"))
    await op.run_until_idle()
    op.kube.edit(KEYRINGS, "ring", {"spec": {"allowedNamespaces": {"names": ["elsewhere"]}}})
    await rotate(op)
    assert states(op)[0] == "DestroyScheduled"


@scenario
async def test_a_disabled_version_is_enabled_again_only_for_a_genuine_reference() -> None:
    op = FakeOperator()
    await ready_ring(op)  # no policy: nothing retires on its own
    op.kube.add(DATAKEYS, datakey("real", NS, "ring"))
    await op.run_until_idle()
    await rotate(op)
    # The platform team disables v1 (the DataKey moved to v2), forged Secrets name v1.
    versions = ring(op)["status"]["versions"]
    versions[0].update(state="Disabled", disabledAt=format_time(op.clock()))
    op.kube.edit(KEYRINGS, "ring", {"status": {"versions": versions}}, status=True)
    forged = {"app.kubernetes.io/managed-by": "kustody", "kustody.io/keyring": "ring",
              "kustody.io/keyring-version": "1"}  # fmt: skip
    op.kube.add(SECRETS, {"metadata": {"name": "x", "namespace": NS, "labels": forged}})
    await op.advance(hours=1)
    assert states(op) == ["Disabled", "Enabled"]
    assert op.hsm.state("ring", 1) is VersionState.DISABLED
    assert "Restored" not in op.events.reasons("ring")

    # A DataKey whose status names v1 (in the KeyRing's namespaces) is a genuine reference:
    # v1 comes back at once.
    op.kube.edit(DATAKEYS, "real", {"status": {"keyRingVersion": 1}}, NS, status=True)
    op.deliver()
    await keyring_reconciler.reconcile(op.rt, "ring")
    assert states(op)[0] == "Enabled"
    assert op.hsm.state("ring", 1) is VersionState.ENABLED
    assert "Restored" in op.events.reasons("ring")


@scenario
async def test_a_restore_request_cancels_a_scheduled_destruction() -> None:
    op = FakeOperator()
    await retiring_ring(op, destroyAfter="720h")
    await rotate(op)
    assert states(op)[0] == "DestroyScheduled"
    # The runbook: stop the policy from retiring it again, then ask for the restore.
    op.kube.edit(ROTATION_POLICIES, "retire", {"spec": {"retireAfter": "720h"}})
    request = f"1@{format_time(op.clock())}"
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {RESTORE_ANNOTATION: request}}})
    await op.run_until_idle()
    v1 = ring(op)["status"]["versions"][0]
    assert v1["state"] == "Enabled"
    assert "restoredAt" in v1
    assert "destroyAt" not in v1
    assert ring(op)["status"]["lastRestoreRequest"] == request
    assert op.hsm.state("ring", 1) is VersionState.ENABLED
    assert "Restored" in op.events.reasons("ring")


@scenario
async def test_a_garbled_restore_request_is_reported_and_not_applied() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {RESTORE_ANNOTATION: "x@1"}}})
    await op.run_until_idle()
    assert "InvalidRestoreRequest" in op.events.reasons("ring")
    assert ring(op)["status"]["lastRestoreRequest"] == "x@1"
    assert condition(ring(op), "Ready")["status"] == "True"


# -- deletion ------------------------------------------------------------------------------


@scenario
async def test_deleting_with_retain_keeps_the_keys_for_a_later_keyring() -> None:
    op = FakeOperator()
    obj = await ready_ring(op, deletionPolicy="Retain")
    fingerprint = obj["status"]["versions"][0]["fingerprint"]
    op.kube.remove(KEYRINGS, "ring")
    await op.run_until_idle()
    assert op.kube.object(KEYRINGS, "ring") is None
    assert op.hsm.states("ring") == {1: VersionState.ENABLED}

    again = await ready_ring(op, deletionPolicy="Retain")
    assert again["status"]["versions"][0]["fingerprint"] == fingerprint
    assert "Adopted" in op.events.reasons("ring")


@scenario
async def test_deleting_with_destroy_waits_for_the_destruction_then_lets_go() -> None:
    op = FakeOperator()
    await ready_ring(op, deletionPolicy="Destroy")
    op.kube.remove(KEYRINGS, "ring")
    await op.run_until_idle()
    obj = ring(op)
    assert obj["metadata"]["deletionTimestamp"]
    assert states(op) == ["DestroyScheduled"]
    assert condition(obj, "Ready")["reason"] == "Deleting"
    assert op.hsm.state("ring", 1) is VersionState.DESTROY_SCHEDULED
    await op.advance(hours=720)  # the default destroyAfter
    assert op.kube.object(KEYRINGS, "ring") is None
    assert op.hsm.states("ring") == {1: VersionState.DESTROYED}


@scenario
async def test_a_forged_reference_does_not_block_crypto_shredding() -> None:
    op = FakeOperator()
    await ready_ring(op, deletionPolicy="Destroy")
    labels = {"app.kubernetes.io/managed-by": "kustody", "kustody.io/keyring": "ring",
              "kustody.io/keyring-version": "1"}  # fmt: skip
    op.kube.add(SECRETS, {"metadata": {"name": "f", "namespace": "tenant", "labels": labels}})
    op.kube.remove(KEYRINGS, "ring")
    await op.run_until_idle()
    await op.advance(hours=720)
    assert op.kube.object(KEYRINGS, "ring") is None
    assert op.hsm.states("ring") == {1: VersionState.DESTROYED}


# -- summary and failures --------------------------------------------------------------------


@scenario
async def test_rotating_says_how_many_datakeys_are_still_on_older_versions() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.kube.add(DATAKEYS, datakey("a", NS, "ring"))
    await op.run_until_idle()
    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    op.deliver()
    await keyring_reconciler.reconcile(op.rt, "ring")  # before the DataKey's own pass
    rotating = condition(ring(op), "Rotating")
    assert (rotating["status"], rotating["reason"]) == ("True", "Rewrapping")
    assert rotating["message"].startswith("1 of 1 DataKeys")
    await op.run_until_idle()  # the DataKey is re-wrapped, the KeyRing looks again
    assert condition(ring(op), "Rotating")["reason"] == "UpToDate"


@scenario
async def test_a_missing_rotation_policy_makes_the_keyring_not_ready() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("ring", [NS], policy="absent"))
    await op.run_until_idle()
    ready = condition(ring(op), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RotationPolicyNotFound")
    assert "absent" in ready["message"]
    assert states(op) == ["Enabled"]  # provisioning does not wait for the policy
    op.kube.add(ROTATION_POLICIES, rotation_policy("absent"))
    await op.advance(2)
    assert condition(ring(op), "Ready")["status"] == "True"


@scenario
async def test_an_unavailable_hsm_is_visible_and_the_keyring_recovers() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.hsm.set_unavailable()
    with pytest.raises(HsmError):
        await keyring_reconciler.reconcile(op.rt, "ring")
    obj = ring(op)
    reachable = condition(obj, "HSMReachable")
    assert (reachable["status"], reachable["reason"]) == ("False", "TokenUnavailable")
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "HSMUnavailable")
    assert "TOKEN_UNAVAILABLE" in ready["message"]
    assert "HSMError" in op.events.reasons("ring")
    assert op.hsm.states("ring") == {1: VersionState.ENABLED}
    op.hsm.set_available()
    await keyring_reconciler.reconcile(op.rt, "ring")
    assert condition(ring(op), "HSMReachable")["status"] == "True"
    assert condition(ring(op), "Ready")["status"] == "True"


@scenario
async def test_a_planted_key_is_not_trusted_and_nothing_is_adopted() -> None:
    op = FakeOperator()
    op.hsm.plant_untrusted("ring", 1)
    op.kube.add(KEYRINGS, keyring("ring", [NS]))
    op.deliver()
    assert op.rt.queue.pop() is not None
    assert await keyring_reconciler.reconcile(op.rt, "ring") == 60.0
    obj = ring(op)
    assert condition(obj, "Ready")["reason"] == "KeyNotTrusted"
    assert condition(obj, "HSMReachable")["status"] == "True"
    assert "KeyNotTrusted" in op.events.reasons("ring")
    assert not obj["status"].get("versions")
    assert op.hsm.ops("create_key_version") == []


@scenario
async def test_an_unreadable_spec_is_reported_and_nothing_is_provisioned() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, {"metadata": {"name": "ring"}, "spec": {"deletionPolicy": "Maybe"}})
    await op.run_until_idle()
    ready = condition(ring(op), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert op.hsm.calls == []
    # Deleting it lets go at once and keeps whatever the token has (as Retain).
    op.kube.remove(KEYRINGS, "ring")
    await op.run_until_idle()
    assert op.kube.object(KEYRINGS, "ring") is None
    assert op.hsm.calls == []


# -- the API server --------------------------------------------------------------------------


@scenario
async def test_an_api_outage_mid_rotation_makes_the_new_version_once() -> None:
    op = FakeOperator()
    await ready_ring(op)
    op.kube.fail_next("patch_status", KEYRINGS, api_error(500, message="etcd is down"))
    await rotate(op)  # the status write after CreateKeyVersion fails; the retry finishes it
    assert isinstance(op.errors()[-1], Unavailable)
    assert ring(op)["status"]["primaryVersion"] == 2
    assert op.hsm.states("ring") == {1: VersionState.ENABLED, 2: VersionState.ENABLED}
    assert [c.version for c in op.hsm.ops("create_key_version")] == [1, 2, 2]  # idempotent
    assert op.events.reasons("ring").count("Rotated") == 1
    assert op.metric("kustody_rotations_total", outcome="success") == 1


@scenario
async def test_the_operator_never_writes_a_spec() -> None:
    """GitOps: applying the same manifests again changes nothing (generation stays 1)."""
    op = FakeOperator()
    await retiring_ring(op)
    op.kube.add(DATAKEYS, datakey("db", NS, "ring"))
    await op.run_until_idle()
    await rotate(op)
    await op.advance(hours=24)
    assert states(op) == ["Destroyed", "Enabled"]
    ours = ("KeyRing", "DataKey", "RotationPolicy")
    assert op.kube.writes()
    for call in op.kube.writes():
        if call.kind in ours:
            assert "spec" not in (call.body or {}), call
    for res, name, ns in ((KEYRINGS, "ring", None), (DATAKEYS, "db", NS)):
        assert (op.kube.object(res, name, ns) or {})["metadata"]["generation"] == 1


@scenario
async def test_a_datakey_deleted_while_the_watch_was_broken_stops_counting_after_a_relist() -> None:
    from kustody.controller import events

    op = FakeOperator()
    await retiring_ring(op, rewrap="Manual")
    op.kube.add(DATAKEYS, datakey("held", NS, "ring"))
    await op.run_until_idle()
    await rotate(op)
    assert states(op)[0] == "Enabled"  # held by the DataKey
    op.kube.remove(DATAKEYS, "held", NS)
    assert op.skip_events() > 0  # the watch missed the deletion
    await op.advance(hours=1)
    assert states(op)[0] == "Enabled"  # the cache still has it
    await events.prune(op.rt, op.kube)  # the relist after the watch came back
    assert op.rt.datakeys.get(NS, "held") is None
    await op.run_until_idle()
    assert states(op)[0] == "DestroyScheduled"


@scenario
async def test_an_unusable_rotation_policy_is_named_in_ready() -> None:
    op = FakeOperator()
    op.kube.add(ROTATION_POLICIES, rotation_policy("bad", rotationPeriod="often"))
    op.kube.add(KEYRINGS, keyring("ring", [NS], policy="bad"))
    await op.run_until_idle()
    ready = condition(ring(op), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RotationPolicyNotFound")
    assert "cannot be used" in ready["message"]


@scenario
async def test_a_deleting_keyring_without_our_finalizer_is_left_alone() -> None:
    op = FakeOperator()
    obj = keyring("ring", [NS])
    obj["metadata"]["finalizers"] = ["other"]
    op.kube.add(KEYRINGS, obj)
    op.kube.remove(KEYRINGS, "ring")
    await op.run_until_idle()
    assert ring(op)["metadata"]["finalizers"] == ["other"]
    assert "status" not in ring(op)
    assert op.hsm.calls == []


@scenario
async def test_a_destruction_the_token_cannot_do_now_is_an_hsm_failure() -> None:
    op = FakeOperator()
    await retiring_ring(op)
    await rotate(op)
    op.hsm.fail_next("destroy_version", Reason.TOKEN_UNAVAILABLE)
    await op.advance(hours=24)
    assert any(isinstance(e, HsmError) for e in op.errors())
    assert "HSMError" in op.events.reasons("ring")
    assert states(op)[0] == "Destroyed"  # the retry did it
    assert condition(ring(op), "Ready")["status"] == "True"
