"""Crash safety, as the operator issue asks: rotate a KeyRing with 200 DataKeys while the
operator is SIGKILLed at random moments and restarted, 10 times.

The policy retires superseded versions at once (retireAfter 0s), so re-wrap, disable and
destruction scheduling all race against the kills. Afterwards every Secret must still open
to the DEK it had before, each version must exist exactly once in the token, no referenced
version may be Disabled or Destroyed, and everything must be Ready.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kustody.api.client import Binding, HsmClient
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Operator, Sidecar
from kustody.dev.tokens import DevToken
from kustody_helpers import eventually, get, isolated_plane, policy, ready

pytestmark = pytest.mark.slow

N = int(__import__("os").environ.get("CRASH_N", "200"))
KILLS = 10
RING = "crash"
NS = "crash"


@pytest.fixture(scope="module")
def plane(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from isolated_plane(kube, tmp_path_factory.mktemp("crash"))


def _manifests() -> str:
    docs: list[dict[str, object]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        json.loads(policy("crash", retireAfter="0s", destroyAfter="24h")),
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": RING},
            "spec": {
                "algorithm": "AES256GCM",
                "rotationPolicyRef": {"name": "crash"},
                "allowedNamespaces": {"names": [NS]},
            },
        },
    ]
    docs += [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": f"dk-{i:03d}", "namespace": NS},
            "spec": {"keyRingRef": {"name": RING}, "secretName": f"dk-{i:03d}"},
        }
        for i in range(N)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def _items(plane: Cluster, kind: str) -> list[dict[str, object]]:
    return list(json.loads(plane.kubectl("get", kind, "-n", NS, "-o", "json").stdout)["items"])


def _deks(socket: Path, secrets: list[dict[str, object]]) -> dict[str, bytes]:
    import base64

    async def run() -> dict[str, bytes]:
        async with HsmClient.unix(socket) as hsm:

            async def one(secret: dict[str, object]) -> tuple[str, bytes]:
                data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}  # type: ignore[attr-defined]
                ctx = json.loads(data["encryption-context"])
                binding = Binding(ctx["namespace"], ctx["dataKey"], ctx["encryptionContext"])
                dek = await hsm.decrypt(data["wrapped-key"], binding, allow_plaintext_export=True)
                return ctx["dataKey"], dek

            return dict(await asyncio.gather(*(one(s) for s in secrets)))

    return asyncio.run(run())


def _token_objects(token: DevToken, ring: str) -> dict[str, int]:
    """Count KEK objects per label straight from the token (not through the sidecar)."""
    script = (
        "import collections, json, sys, pkcs11\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        "lib = pkcs11.lib(sys.argv[1]); tok = lib.get_token(token_label=sys.argv[2])\n"
        "with tok.open(user_pin=open(sys.argv[3]).read().strip()) as s:\n"
        "    keys = s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})\n"
        "    labels = [o[Attribute.LABEL] for o in keys]\n"
        "print(json.dumps(collections.Counter(labels)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(token.module), token.label, str(token.pin_file)],
        env={**token.env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts: dict[str, int] = json.loads(out)
    return {k: v for k, v in counts.items() if k.startswith(f"kustody:{ring}:")}


def _rotate(plane: Cluster) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kustody", "rotate", RING, "--kubeconfig", str(plane.kubeconfig)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def _behind(plane: Cluster) -> int:
    """DataKeys not yet wrapped under the KeyRing's primary version."""
    kr = get(plane, "keyring", RING) or {}
    primary = (kr.get("status") or {}).get("primaryVersion")
    return sum(
        1
        for d in _items(plane, "datakeys")
        if (d.get("status") or {}).get("keyRingVersion") != primary  # type: ignore[union-attr]
    )


def _diagnose(plane: Cluster, operator: Operator) -> str:
    import collections

    kr = get(plane, "keyring", RING) or {}
    dks = _items(plane, "datakeys")
    by_state = collections.Counter(
        (
            (d.get("status") or {}).get("keyRingVersion"),  # type: ignore[union-attr]
            next(
                (
                    f"{c['status']}/{c['reason']}"
                    for c in (d.get("status") or {}).get("conditions") or ()  # type: ignore[union-attr]
                    if c["type"] == "Ready"
                ),
                "none",
            ),
        )
        for d in dks
    )
    return (
        f"KeyRing status: {json.dumps(kr.get('status'), indent=1)}\n"
        f"DataKeys by (version, Ready): {dict(by_state)}\n"
        f"annotations: {kr.get('metadata', {}).get('annotations')}\n"
        f"operator warnings:\n"
        + "\n".join(
            line
            for line in operator.log().splitlines()
            if (" WARNING " in line or " ERROR " in line) and "connectionpool" not in line
        )[-6000:]
    )


def test_rotation_survives_ten_sigkills(
    plane: Cluster,
    make_softhsm_token: Callable[[str], DevToken],
    tmp_path: Path,
) -> None:
    token = make_softhsm_token("crash")
    sidecar = Sidecar(tmp_path / "stack", token).start()
    operator = Operator(tmp_path / "stack", plane, sidecar.socket, name="crash-op")
    rng = random.Random(20261129)
    try:
        operator.start().wait_active()
        plane.kubectl("apply", "--server-side", "-f", "-", input=_manifests())
        eventually(
            lambda: sum(ready(d) for d in _items(plane, "datakeys")) == N,
            180,
            f"all {N} DataKeys to be Ready",
        )
        before = _deks(sidecar.socket, _items(plane, "secrets"))
        assert len(before) == N

        _rotate(plane)
        mid_rewrap = 0
        for kill in range(KILLS):
            if kill == KILLS // 2:
                _rotate(plane)  # a second re-wrap storm, started while kills continue
            time.sleep(rng.uniform(0.05, 1.0))
            operator.kill()
            mid_rewrap += _behind(plane) > 0
            operator.start()
            operator.wait_active(timeout=60)
        # The kills must have hit real work, or this test would prove nothing.
        assert mid_rewrap >= 1, "no kill landed while DataKeys were still being re-wrapped"
        print(f"{mid_rewrap} of {KILLS} kills landed while DataKeys were still being re-wrapped")

        def settled() -> bool:
            kr = get(plane, "keyring", RING) or {}
            dks = _items(plane, "datakeys")
            return (
                ready(kr)
                and kr["status"].get("primaryVersion") == 3
                and all(ready(d) and d["status"]["keyRingVersion"] == 3 for d in dks)  # type: ignore[index]
                and [v["state"] for v in kr["status"]["versions"]]
                == ["DestroyScheduled", "DestroyScheduled", "Enabled"]
            )

        try:
            eventually(settled, 240, "the rotation, re-wrap and retirement to settle")
        except AssertionError:
            print(_diagnose(plane, operator))
            raise
        secrets = _items(plane, "secrets")
        after = _deks(sidecar.socket, secrets)
        assert after == before, "a DataKey's DEK changed or was lost"
        for s in secrets:
            assert s["metadata"]["labels"]["kustody.io/keyring-version"] == "3"  # type: ignore[index]
        for d in _items(plane, "datakeys"):
            assert d["status"]["dekGeneration"] == 1  # type: ignore[index]

        kr = get(plane, "keyring", RING) or {}
        states = {v["version"]: v["state"] for v in kr["status"]["versions"]}
        assert states == {1: "DestroyScheduled", 2: "DestroyScheduled", 3: "Enabled"}
        assert {v["version"]: v["dataKeys"] for v in kr["status"]["versions"]} == {1: 0, 2: 0, 3: N}
        assert _token_objects(token, RING) == {f"kustody:{RING}:v{v}": 1 for v in (1, 2, 3)}
    finally:
        operator.stop()
        sidecar.stop()
