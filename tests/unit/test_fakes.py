"""kustody.testing.fakes behaves as the API server and the sidecar do, where reconcilers
can tell the difference."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from kustody.api.client import Binding, GenerateItem, HsmError, Reason, VersionState
from kustody.domain.envelope import Envelope
from kustody.kube.errors import Conflict, KubeError, NotFound, Unavailable
from kustody.kube.resources import DATAKEYS, KEYRINGS, SECRETS, WORKLOADS
from kustody.testing.fakes import (
    JSON_PATCH,
    FakeKeyService,
    FakeKube,
    FakeOperator,
    ManualClock,
    RecordingEvents,
    api_error,
    selector_matches,
)

T = TypeVar("T")


def run(call: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await call

    return asyncio.run(wrapper())


def _keyring(name: str = "ring") -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"algorithm": "AES256GCM"}}


# -- FakeKube ------------------------------------------------------------------------------


def test_create_sets_identity_versions_and_drops_status_of_custom_resources() -> None:
    kube = FakeKube(ManualClock())
    created = run(kube.create(KEYRINGS, {**_keyring(), "status": {"primaryVersion": 9}}))
    meta = created["metadata"]
    assert meta["generation"] == 1
    assert meta["uid"]
    assert meta["resourceVersion"].isdigit()
    assert meta["creationTimestamp"] == "2026-01-01T00:00:00Z"
    assert "status" not in created
    assert created["apiVersion"] == "kustody.io/v1alpha1"
    with pytest.raises(Conflict):
        run(kube.create(KEYRINGS, _keyring()))


def test_generation_moves_with_the_spec_only_and_status_goes_through_its_subresource() -> None:
    kube = FakeKube()
    kube.add(KEYRINGS, _keyring())
    labelled = run(kube.patch(KEYRINGS, "ring", {"metadata": {"labels": {"a": "b"}}}))
    assert labelled["metadata"]["generation"] == 1
    ignored = run(kube.patch(KEYRINGS, "ring", {"status": {"primaryVersion": 3}}))
    assert "status" not in ignored  # the main resource ignores status
    status = run(kube.patch_status(KEYRINGS, "ring", {"primaryVersion": 1}))
    assert status["status"] == {"primaryVersion": 1}
    assert status["metadata"]["generation"] == 1
    assert int(status["metadata"]["resourceVersion"]) > int(labelled["metadata"]["resourceVersion"])
    spec = run(kube.patch(KEYRINGS, "ring", {"spec": {"deletionPolicy": "Destroy"}}))
    assert spec["metadata"]["generation"] == 2
    assert spec["status"] == {"primaryVersion": 1}
    # A status write cannot change the spec or the labels.
    run(kube.patch(KEYRINGS, "ring", {"spec": {"x": 1}, "status": {"y": 2}}, subresource="status"))
    after = kube.object(KEYRINGS, "ring") or {}
    assert "x" not in after["spec"]
    assert after["status"] == {"primaryVersion": 1, "y": 2}


def test_a_no_op_write_keeps_the_resource_version() -> None:
    kube = FakeKube()
    before = kube.add(KEYRINGS, _keyring())
    after = run(kube.patch(KEYRINGS, "ring", {"spec": {"algorithm": "AES256GCM"}}))
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_stale_resource_versions_conflict() -> None:
    kube = FakeKube()
    first = kube.add(KEYRINGS, _keyring())
    rv = first["metadata"]["resourceVersion"]
    run(kube.patch_status(KEYRINGS, "ring", {"a": 1}, resource_version=rv))
    with pytest.raises(Conflict):
        run(kube.patch_status(KEYRINGS, "ring", {"a": 2}, resource_version=rv))
    with pytest.raises(Conflict):
        run(kube.patch(KEYRINGS, "ring", {"metadata": {"resourceVersion": rv, "labels": {}}}))
    assert (kube.object(KEYRINGS, "ring") or {})["status"] == {"a": 1}


def test_merge_patch_null_removes_and_json_patch_test_guards() -> None:
    kube = FakeKube()
    kube.add(
        SECRETS,
        {"metadata": {"name": "s", "namespace": "ns"}, "data": {"a": "YQ==", "b": "Yg=="}},
    )
    patched = run(kube.patch(SECRETS, "s", {"data": {"a": None, "c": "Yw=="}}, "ns"))
    assert patched["data"] == {"b": "Yg==", "c": "Yw=="}
    rv = patched["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/annotations", "value": {}},
        {"op": "add", "path": "/metadata/annotations/dk.kustody.io~1x", "value": "2"},
        {"op": "remove", "path": "/data/b"},
    ]
    done = run(kube.patch(SECRETS, "s", ops, "ns", content_type=JSON_PATCH))
    assert done["metadata"]["annotations"] == {"dk.kustody.io/x": "2"}
    assert done["data"] == {"c": "Yw=="}
    with pytest.raises(KubeError) as refused:
        run(kube.patch(SECRETS, "s", ops, "ns", content_type=JSON_PATCH))  # rv moved on
    assert refused.value.status == 422
    assert (kube.object(SECRETS, "s", "ns") or {})["data"] == {"c": "Yw=="}  # all or nothing


def test_secrets_fold_string_data_and_refuse_bad_base64() -> None:
    kube = FakeKube()
    secret = {"metadata": {"name": "s"}, "stringData": {"k": "v"}}
    created = run(kube.create(SECRETS, secret, "ns"))
    assert created["data"] == {"k": base64.b64encode(b"v").decode()}
    assert "generation" not in created["metadata"]
    with pytest.raises(KubeError) as bad:
        run(kube.patch(SECRETS, "s", {"data": {"k": "not base64!"}}, "ns"))
    assert bad.value.status == 400


def test_not_found_and_delete_with_finalizers_and_garbage_collection() -> None:
    kube = FakeKube()
    with pytest.raises(NotFound):
        run(kube.get(KEYRINGS, "nope"))
    assert run(kube.get_or_none(KEYRINGS, "nope")) is None
    run(kube.delete(KEYRINGS, "nope"))  # like Kube.delete: NotFound is not an error
    dk = kube.add(
        DATAKEYS,
        {"metadata": {"name": "dk", "namespace": "ns", "finalizers": ["x"]}, "spec": {}},
    )
    owner = {"apiVersion": "kustody.io/v1alpha1", "kind": "DataKey", "name": "dk",
             "uid": dk["metadata"]["uid"], "controller": True}  # fmt: skip
    kube.add(SECRETS, {"metadata": {"name": "s", "namespace": "ns", "ownerReferences": [owner]}})
    run(kube.delete(DATAKEYS, "dk", "ns"))
    deleting = kube.object(DATAKEYS, "dk", "ns") or {}
    assert deleting["metadata"]["deletionTimestamp"]
    with pytest.raises(KubeError):  # no new finalizers while deleting
        run(kube.patch(DATAKEYS, "dk", {"metadata": {"finalizers": ["x", "y"]}}, "ns"))
    run(kube.patch(DATAKEYS, "dk", {"metadata": {"finalizers": []}}, "ns"))
    assert kube.object(DATAKEYS, "dk", "ns") is None
    assert kube.object(SECRETS, "s", "ns") is None  # its owner went: collected


def test_list_by_label_selector_and_metadata_only() -> None:
    kube = FakeKube()
    for name, labels in (("a", {"x": "1", "y": "2"}), ("b", {"x": "1"}), ("c", {"x": "2"})):
        kube.add(
            SECRETS,
            {
                "metadata": {"name": name, "namespace": "ns", "labels": labels},
                "data": {"k": "eA=="},
            },
        )
    kube.add(SECRETS, {"metadata": {"name": "d", "namespace": "other"}})
    names = lambda items: sorted(i["metadata"]["name"] for i in items)  # noqa: E731
    assert names(run(kube.list(SECRETS, label_selector="x=1"))) == ["a", "b"]
    assert names(run(kube.list(SECRETS, label_selector="x=1,y"))) == ["a"]
    assert names(run(kube.list(SECRETS, label_selector="x!=1"))) == ["c", "d"]
    assert names(run(kube.list(SECRETS, label_selector="!y"))) == ["b", "c", "d"]
    assert names(run(kube.list(SECRETS, "other"))) == ["d"]
    items, version = run(kube.list_metadata(SECRETS, label_selector="x==1"))
    assert version.isdigit()
    assert names(items) == ["a", "b"]
    assert all(set(i) == {"apiVersion", "kind", "metadata"} for i in items)
    assert selector_matches("", {})


def test_injected_failures_hit_the_matching_request_once_and_calls_are_logged() -> None:
    kube = FakeKube()
    kube.add(KEYRINGS, _keyring())
    kube.fail_next("patch_status", KEYRINGS, api_error(500, message="etcd timeout"))
    kube.fail_next("get", "KeyRing", api_error(429), name="other")
    assert isinstance(api_error(429), Unavailable)
    with pytest.raises(Unavailable):
        run(kube.patch_status(KEYRINGS, "ring", {"a": 1}))
    assert "status" not in (kube.object(KEYRINGS, "ring") or {})  # refused: nothing changed
    run(kube.patch_status(KEYRINGS, "ring", {"a": 1}))  # once only
    run(kube.get(KEYRINGS, "ring"))  # another name: not affected
    with pytest.raises(Unavailable):
        run(kube.get(KEYRINGS, "other"))
    assert [c.verb for c in kube.requests(res=KEYRINGS, name="ring")] == [
        "patch_status", "patch_status", "get",
    ]  # fmt: skip
    assert len(kube.writes()) == 2


def test_workload_restart_patch_runs_against_the_fake() -> None:
    from kustody.kube import workloads

    kube = FakeKube()
    kube.add(
        WORKLOADS["Deployment"],
        {
            "metadata": {"name": "api", "namespace": "ns",
                         "annotations": {workloads.OPT_IN_ANNOTATION: "dk"}},
            "spec": {"template": {"spec": {}}},
        },
    )  # fmt: skip
    assert run(workloads.restart(kube, "ns", "Deployment", "api", "dk", 2))
    assert not run(workloads.restart(kube, "ns", "Deployment", "api", "dk", 2))  # idempotent
    live = kube.object(WORKLOADS["Deployment"], "api", "ns") or {}
    assert live["spec"]["template"]["metadata"]["annotations"] == {"dk.kustody.io/dk": "2"}
    assert live["metadata"]["generation"] == 2


# -- FakeKeyService ------------------------------------------------------------------------


def test_keys_are_real_envelopes_bound_to_their_place() -> None:
    hsm = FakeKeyService()
    info = run(hsm.create_key_version("ring", 1))
    assert run(hsm.create_key_version("ring", 1)) == info  # idempotent
    assert len(info.fingerprint) == 6
    here = Binding("ns", "dk", {"app": "a"})
    item = GenerateItem("ring", here, return_plaintext=True, allow_plaintext_export=True)
    (key,) = run(hsm.batch_generate_data_keys([item]))
    assert not isinstance(key, HsmError)
    envelope = Envelope.from_text(key.wrapped)
    assert (envelope.key.key_ring, envelope.key.version) == ("ring", 1)
    assert run(hsm.decrypt(key.wrapped, here, allow_plaintext_export=True)) == key.plaintext
    for elsewhere in (Binding("ns", "other", {"app": "a"}), Binding("ns", "dk", {})):
        with pytest.raises(HsmError) as err:
            run(hsm.decrypt(key.wrapped, elsewhere, allow_plaintext_export=True))
        assert err.value.reason is Reason.AAD_MISMATCH
    with pytest.raises(HsmError) as err:
        run(hsm.decrypt(key.wrapped, here, allow_plaintext_export=False))
    assert err.value.reason is Reason.PLAINTEXT_EXPORT_FORBIDDEN
    with pytest.raises(HsmError) as err:
        run(hsm.decrypt("kustody:v1:AAAA", here, allow_plaintext_export=True))
    assert err.value.reason is Reason.MALFORMED_ENVELOPE

    run(hsm.create_key_version("ring", 2))
    (moved,) = run(hsm.batch_rewrap([(key.wrapped, here)], to_version=2))
    assert not isinstance(moved, HsmError)
    assert (moved.from_version, moved.to_version) == (1, 2)
    assert hsm.unseal(moved.wrapped, here) == key.plaintext
    (refused,) = run(hsm.batch_rewrap([(key.wrapped, Binding("x", "y"))]))
    assert isinstance(refused, HsmError)
    assert refused.reason is Reason.AAD_MISMATCH


def test_version_states_and_the_tokens_waiting_period() -> None:
    clock = ManualClock()
    hsm = FakeKeyService(clock, min_destroy_delay=3600)
    run(hsm.create_key_version("ring", 1))
    run(hsm.create_key_version("ring", 2))
    here = Binding("ns", "dk")
    (key,) = run(hsm.batch_generate_data_keys([GenerateItem("ring", here, version=1)]))
    assert not isinstance(key, HsmError)

    def reason(call: Awaitable[Any]) -> Reason:
        with pytest.raises(HsmError) as err:
            run(call)
        return err.value.reason

    assert reason(hsm.destroy_version("ring", 1)) is Reason.VERSION_NOT_DISABLED
    run(hsm.set_version_state("ring", 1, VersionState.DISABLED))
    assert reason(hsm.decrypt(key.wrapped, here, allow_plaintext_export=True)) is (
        Reason.VERSION_DISABLED
    )
    (item,) = run(hsm.batch_rewrap([(key.wrapped, here)]))
    assert isinstance(item, HsmError)
    assert item.reason is Reason.VERSION_DISABLED
    assert reason(hsm.destroy_version("ring", 1)) is Reason.DESTRUCTION_NOT_DUE
    run(hsm.set_version_state("ring", 1, VersionState.DESTROY_SCHEDULED))
    clock.advance(3599)
    assert reason(hsm.destroy_version("ring", 1)) is Reason.DESTRUCTION_NOT_DUE
    clock.advance(1)
    assert run(hsm.destroy_version("ring", 1)).state is VersionState.DESTROYED
    assert run(hsm.destroy_version("ring", 1)).state is VersionState.DESTROYED  # idempotent
    assert reason(hsm.create_key_version("ring", 1)) is Reason.VERSION_DESTROYED
    assert reason(hsm.set_version_state("ring", 1, VersionState.ENABLED)) is (
        Reason.VERSION_DESTROYED
    )
    assert reason(hsm.set_version_state("ring", 3, VersionState.ENABLED)) is (
        Reason.VERSION_NOT_FOUND
    )
    described = run(hsm.describe_key("ring"))
    assert described.primary_version == 2
    assert [v.state for v in described.versions] == [VersionState.DESTROYED, VersionState.ENABLED]
    run(hsm.set_version_state("ring", 2, VersionState.DISABLED))
    (none,) = run(hsm.batch_generate_data_keys([GenerateItem("ring", here)]))
    assert isinstance(none, HsmError)
    assert none.reason is Reason.NO_PRIMARY_VERSION
    (short,) = run(hsm.batch_generate_data_keys([GenerateItem("ring", here, 2, length=8)]))
    assert isinstance(short, HsmError)
    assert short.reason is Reason.INVALID_ARGUMENT


def test_untrusted_keys_unavailability_and_injected_failures() -> None:
    hsm = FakeKeyService()
    hsm.plant_untrusted("ring", 1)
    with pytest.raises(HsmError) as err:
        run(hsm.describe_key("ring"))
    assert err.value.reason is Reason.KEY_NOT_TRUSTED
    with pytest.raises(HsmError) as err:
        run(hsm.create_key_version("ring", 1))
    assert err.value.reason is Reason.KEY_NOT_TRUSTED

    hsm.set_unavailable()
    assert not run(hsm.health()).serving
    with pytest.raises(HsmError) as err:
        run(hsm.describe_key("other"))
    assert err.value.reason is Reason.TOKEN_UNAVAILABLE
    hsm.set_available()
    assert run(hsm.health()).serving

    hsm.fail_next("create_key_version", Reason.TOKEN_FULL)
    with pytest.raises(HsmError) as err:
        run(hsm.create_key_version("other", 1))
    assert err.value.reason is Reason.TOKEN_FULL
    assert run(hsm.create_key_version("other", 1)).state is VersionState.ENABLED
    assert [c.op for c in hsm.ops("create_key_version")] == ["create_key_version"] * 3


# -- RecordingEvents, ManualClock, FakeOperator ---------------------------------------------


def test_events_are_recorded_with_their_object() -> None:
    events = RecordingEvents()
    obj = {"kind": "DataKey", "metadata": {"name": "dk", "namespace": "ns", "uid": "u"}}
    run(events.warning(obj, "HSMError", "down"))
    run(events.normal({"metadata": {"name": "ring"}}, "Created", "v1"))
    assert events.reasons() == ["HSMError", "Created"]
    assert events.reasons("dk", "ns") == ["HSMError"]
    (event,) = events.about("dk")
    assert (event.type, event.kind, event.uid, event.message) == ("Warning", "DataKey", "u", "down")


def test_manual_clock_moves_both_clocks_forward_only() -> None:
    clock = ManualClock()
    start, mono = clock(), clock.monotonic()
    assert start.tzinfo is dt.UTC
    clock.advance(hours=1)
    assert clock() - start == dt.timedelta(hours=1)
    assert clock.monotonic() - mono == 3600
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    clock.set(start + dt.timedelta(days=1))
    assert clock.monotonic() - mono == 86400


def test_fake_operator_delivers_watch_events_through_the_real_handlers() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, _keyring())
    ours = {"app.kubernetes.io/managed-by": "kustody", "kustody.io/keyring": "ring"}
    op.kube.add(SECRETS, {"metadata": {"name": "loose", "namespace": "ns", "labels": ours}})
    assert op.deliver() == 2
    assert op.rt.keyrings.get(None, "ring") is not None
    assert len(op.rt.secrets) == 0  # a labelled Secret no DataKey owns is not held
    assert op.rt.queue.pop() == ("KeyRing", "", "ring")
    assert op.deliver() == 0


def test_fake_operator_steps_as_a_worker_conflicts_again_soon_errors_back_off() -> None:
    async def body() -> None:
        op = FakeOperator()
        op.kube.add(KEYRINGS, _keyring())
        op.kube.fail_next("patch", KEYRINGS, api_error(409))  # adding the finalizer
        op.deliver()
        outcome = await op.step()
        assert outcome is not None
        assert isinstance(outcome.error, Conflict)
        assert op.rt.queue.due_in() == 0.5
        assert await op.step() is None  # nothing due now

        op.hsm.set_unavailable()
        op.clock.advance(0.5)
        outcome = await op.step()
        assert outcome is not None
        assert isinstance(outcome.error, HsmError)
        assert op.rt.queue.due_in() == 0.5  # the first backoff
        op.hsm.set_available()
        assert await op.run_until_idle() >= 1
        assert op.errors() == [e for e in op.errors() if isinstance(e, Conflict | HsmError)]
        assert op.rt.queue.due_in() == 300.0  # the KeyRing's resync

    asyncio.run(body())
