"""Crash safety of DEK generations: the operator is SIGKILLed while it regenerates every
DataKey and while it re-wraps their multi-generation keysets (issue 11).

Afterwards no generation may be lost (generation 1 still opens to the DEK it had), each
DataKey has exactly one primary, the Secret publishes exactly the status's keyset, every
KEK version exists once in the token, and everything is Ready.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kustody.api.client import Binding, HsmClient
from kustody.dev.controlplane import Cluster
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar
from kustody_helpers import eventually, get, isolated_plane, kustody_cli, ready
from test_crash_safety import _token_objects

pytestmark = pytest.mark.slow

N = 60
RING = "gencrash"
NS = "gencrash"


@pytest.fixture(scope="module")
def plane(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from isolated_plane(kube, tmp_path_factory.mktemp("gencrash"))


def _manifests() -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": RING},
            "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [NS]}},
        },
    ]
    docs += [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": f"dk-{i:02d}", "namespace": NS},
            "spec": {"keyRingRef": {"name": RING}, "secretName": f"dk-{i:02d}"},
        }
        for i in range(N)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def _items(plane: Cluster, kind: str) -> list[dict[str, Any]]:
    return list(json.loads(plane.kubectl("get", kind, "-n", NS, "-o", "json").stdout)["items"])


def _open(socket: Path, pairs: list[tuple[str, str, Binding]]) -> dict[tuple[str, str], bytes]:
    """(DataKey, wrapped key, binding) → DEK, decrypted through the sidecar's socket."""

    async def run() -> dict[tuple[str, str], bytes]:
        async with HsmClient.unix(socket) as hsm:
            deks = await asyncio.gather(
                *(hsm.decrypt(w, b, allow_plaintext_export=True) for _, w, b in pairs)
            )
        return {(name, w): dek for (name, w, _), dek in zip(pairs, deks, strict=True)}

    return asyncio.run(run())


def _binding(name: str) -> Binding:
    return Binding(NS, name, {})


def _generation(dk: dict[str, Any], number: int) -> dict[str, Any]:
    return next(g for g in dk["status"]["generations"] if g["generation"] == number)


def test_regeneration_and_rewrap_of_keysets_survive_sigkills(
    plane: Cluster,
    make_softhsm_token: Callable[[str], SoftHSMToken],
    tmp_path: Path,
) -> None:
    token = make_softhsm_token("gencrash")
    sidecar = Sidecar(tmp_path / "stack", token).start()
    operator = Operator(tmp_path / "stack", plane, sidecar.socket, name="gencrash-op")
    rng = random.Random(20261202)
    try:
        operator.start().wait_active()
        plane.kubectl("apply", "--server-side", "-f", "-", input=_manifests())
        eventually(lambda: sum(ready(d) for d in _items(plane, "datakeys")) == N, 180, "all Ready")
        first = {
            d["metadata"]["name"]: _generation(d, 1)["wrappedKey"]
            for d in _items(plane, "datakeys")
        }
        before = _open(sidecar.socket, [(n, w, _binding(n)) for n, w in first.items()])

        # Regenerate every DataKey, then rotate, while the operator is killed and restarted.
        plane.kubectl(
            "annotate", "datakeys", "--all", "-n", NS, "--overwrite",
            "kustody.io/regenerate-requested-at=2026-12-02T00:00:00Z",
        )  # fmt: skip
        for kill in range(6):
            if kill == 3:
                assert kustody_cli(plane, "rotate", RING).returncode == 0
            time.sleep(rng.uniform(0.1, 1.2))
            operator.kill()
            operator.start()
            operator.wait_active(timeout=60)

        def settled() -> bool:
            primary = ((get(plane, "keyring", RING) or {}).get("status") or {}).get(
                "primaryVersion"
            )
            dks = _items(plane, "datakeys")
            # The status is written before the Secret (by design): wait for both.
            published = {
                s["metadata"]["name"]: json.loads(base64.b64decode(s["data"]["keyset"]))
                for s in _items(plane, "secrets")
                if "keyset" in (s.get("data") or {})
            }
            # The rotation was requested while the operator was being killed: wait for it too
            # (without this, the DataKeys' regeneration alone can look settled on version 1).
            return primary == 2 and len(dks) == N and all(
                ready(d)
                and len(d["status"].get("generations") or ()) == 2
                and all(g["keyRingVersion"] == primary for g in d["status"]["generations"])
                and [k["wrappedKey"] for k in published.get(d["metadata"]["name"], {})
                     .get("keys", [])] == [g["wrappedKey"] for g in d["status"]["generations"]]
                for d in dks
            )  # fmt: skip

        eventually(settled, 240, "every DataKey regenerated once and re-wrapped, Ready")
        dks = {d["metadata"]["name"]: d for d in _items(plane, "datakeys")}
        secrets = {s["metadata"]["name"]: s for s in _items(plane, "secrets")}
        pairs: list[tuple[str, str, Binding]] = []
        for name, dk in dks.items():
            generations = dk["status"]["generations"]
            assert [g["state"] for g in generations] == ["DecryptOnly", "Primary"], name
            assert [g["generation"] for g in generations] == [1, 2], name
            published = json.loads(base64.b64decode(secrets[name]["data"]["keyset"]))
            assert [k["wrappedKey"] for k in published["keys"]] == [
                g["wrappedKey"] for g in generations
            ], name
            pairs += [(name, g["wrappedKey"], _binding(name)) for g in generations]
        after = _open(sidecar.socket, pairs)
        for name, dk in dks.items():
            # Generation 1 still opens to the very DEK it had before all this.
            assert after[(name, _generation(dk, 1)["wrappedKey"])] == before[(name, first[name])]
            assert after[(name, _generation(dk, 2)["wrappedKey"])] != before[(name, first[name])]
        counts = _token_objects(token, RING)
        assert counts == {f"kustody:{RING}:v1": 1, f"kustody:{RING}:v2": 1}, counts
    finally:
        operator.stop()
        sidecar.stop()
