"""The RotationPolicy reconciler against the fakes: validity and how many KeyRings use it."""

from __future__ import annotations

import asyncio

from kustody.controller.policy import reconciler as policy_reconciler
from kustody.kube.resources import KEYRINGS, ROTATION_POLICIES
from kustody.testing.fakes import FakeOperator, condition, keyring, rotation_policy


def test_a_valid_policy_says_what_it_does_and_counts_its_keyrings() -> None:
    async def body() -> None:
        op = FakeOperator()
        spec = {"rotationPeriod": "720h", "destroyAfter": "24h", "rewrap": "Manual"}
        op.kube.add(ROTATION_POLICIES, rotation_policy("monthly", **spec))
        await op.run_until_idle()
        obj = op.kube.object(ROTATION_POLICIES, "monthly") or {}
        ready = condition(obj, "Ready")
        assert (ready["status"], ready["reason"]) == ("True", "Valid")
        assert ready["message"] == "rotates every 720h, destroys after 24h, rewrap Manual"
        assert obj["status"]["keyRings"] == 0
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]

        for name in ("a", "b"):
            op.kube.add(KEYRINGS, keyring(name, ["shop"], policy="monthly"))
        await op.run_until_idle()
        assert (op.kube.object(ROTATION_POLICIES, "monthly") or {})["status"]["keyRings"] == 2
        op.kube.remove(KEYRINGS, "b")
        await op.run_until_idle()
        assert (op.kube.object(ROTATION_POLICIES, "monthly") or {})["status"]["keyRings"] == 1

    asyncio.run(body())


def test_an_invalid_policy_is_not_ready_and_a_fixed_one_is() -> None:
    async def body() -> None:
        op = FakeOperator()
        op.kube.add(ROTATION_POLICIES, rotation_policy("bad", rotationPeriod="often"))
        await op.run_until_idle()
        ready = condition(op.kube.object(ROTATION_POLICIES, "bad"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert "spec.rotationPeriod" in ready["message"]
        op.kube.edit(ROTATION_POLICIES, "bad", {"spec": {"rotationPeriod": "24h"}})
        await op.run_until_idle()
        obj = op.kube.object(ROTATION_POLICIES, "bad") or {}
        assert condition(obj, "Ready")["reason"] == "Valid"
        assert obj["status"]["observedGeneration"] == 2

    asyncio.run(body())


def test_an_unchanged_policy_is_not_written_again() -> None:
    async def body() -> None:
        op = FakeOperator()
        op.kube.add(ROTATION_POLICIES, rotation_policy("p"))
        await op.run_until_idle()
        op.kube.calls.clear()
        assert await policy_reconciler.reconcile(op.rt, "p") is None
        assert op.kube.writes() == []
        assert await policy_reconciler.reconcile(op.rt, "gone") is None

    asyncio.run(body())
