"""Escrow to trusted third parties, drilled (issue 12), on a real control plane with the real
sidecar and operator processes and SoftHSM2 tokens.

* Refusals: an agent outside the KeyRing's jurisdictions, or not admitted by the Security
  Officer, gets nothing (condition names both); a wrapping key the SO did not trust is refused
  by the token itself (CKR_KEY_NOT_WRAPPABLE); escrow switched on for existing versions says
  they cannot be escrowed and a rotation makes an escrowable one; the KEK of a non-escrowed
  KeyRing cannot leave the token by any PKCS#11 path tried directly.
* The lost-token drill: a KeyRing escrowed to two agents, 50 DataKeys, one rotation; the token
  is destroyed; agent A's own token (holding its private key) gets the packages recovered into
  it; the operator adopts the versions (fingerprints match); every Secret decrypts to its old
  DEK and data encrypted with kustody.client before still decrypts.

How the tests show that nothing is in the clear outside a token: the KEKs are created and
recovered SENSITIVE (reading CKA_VALUE is refused, checked directly through PKCS#11) and leave
the token only as C_WrapKey output under an RSA key (the package holds 384 bytes of RSA-OAEP
ciphertext); the agent's private key is generated inside its token, sensitive and
non-extractable (checked the same way), and C_UnwrapKey puts the KEK straight into that token.
The DEKs (known to the test through the sidecar) appear in no package, status, Secret, Event or
log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kustody.api.client import Binding, HsmClient, HsmError, Reason
from kustody.client import UnwrapClient
from kustody.client.keyset import Keyset
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Operator, Sidecar
from kustody.dev.tokens import DevToken
from kustody.domain.escrow import Package, parse_public_key
from kustody_helpers import condition, eventually, get, isolated_plane, kustody_cli, ready

pytestmark = pytest.mark.slow

NS = "escrow-drill"
OPNS = "kustody-system"
TOKEN_SCRIPT = Path(__file__).with_name("escrow_token.py")


@dataclass
class Stack:
    plane: Cluster
    token: DevToken
    sidecar: Sidecar
    operator: Operator
    root: Path


def _cli(args: list[str], token: DevToken | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(token.env if token else {})}
    return subprocess.run(
        [sys.executable, "-m", "kustody", *args],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def _token_args(token: DevToken) -> list[str]:
    return ["--module", str(token.module), "--token-label", token.label]


def _direct(token: DevToken, *args: str) -> Any:
    """escrow_token.py: PKCS#11 on the token directly, as a holder of the user PIN."""
    result = subprocess.run(
        [sys.executable, str(TOKEN_SCRIPT), str(token.module), token.label,
         str(token.pin_file), *args],
        capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, **token.env},
    )  # fmt: skip
    return json.loads(result.stdout)


def _keygen(token: DevToken, label: str, out: Path) -> str:
    result = _cli(["escrow", "keygen", *_token_args(token), "--pin-file", str(token.pin_file),
                   "--label", label, "-o", str(out)], token)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out.read_text()


def _admit(token: DevToken, pem: Path) -> None:
    result = _cli(["escrow", "admit", *_token_args(token), "--so-pin-file",
                   str(token.so_pin_file), str(pem)], token)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "admitted" in result.stdout


def _agent(name: str, pem: str, jurisdiction: str) -> dict[str, Any]:
    return {
        "apiVersion": "kustody.io/v1alpha1",
        "kind": "EscrowAgent",
        "metadata": {"name": name},
        "spec": {"publicKey": pem, "jurisdiction": jurisdiction, "contact": f"{name}@example"},
    }


def _keyring(name: str, escrow: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [NS]}}
    if escrow is not None:
        spec["escrow"] = escrow
    return {
        "apiVersion": "kustody.io/v1alpha1",
        "kind": "KeyRing",
        "metadata": {"name": name},
        "spec": spec,
    }


def _apply(plane: Cluster, *docs: dict[str, Any]) -> None:
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)})
    plane.kubectl("apply", "--server-side", "-f", "-", input=body)


def _escrowed(plane: Cluster, ring: str, status: str, reason: str | None = None) -> Any:
    def check() -> Any:
        obj = get(plane, "keyring", ring)
        c = condition(obj, "Escrowed")
        return obj if c.get("status") == status and reason in (None, c.get("reason")) else None

    return eventually(check, 60, f"KeyRing {ring} Escrowed={status} {reason or ''}")


def _agent_ready(plane: Cluster, name: str, admitted: bool) -> dict[str, Any]:
    def check() -> Any:
        obj = get(plane, "escrowagent", name)
        st = (obj or {}).get("status") or {}
        return obj if "fingerprint" in st and st.get("admitted") is admitted else None

    result: dict[str, Any] = eventually(check, 60, f"EscrowAgent {name} admitted={admitted}")
    return result


def _packages(plane: Cluster, ring: str) -> list[dict[str, Any]]:
    selector = f"kustody.io/escrow-package=true,kustody.io/keyring={ring}"
    out = plane.kubectl("get", "secrets", "-n", OPNS, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


@pytest.fixture(scope="module")
def stack(
    kube: Cluster,
    make_softhsm_token: Callable[[str], DevToken],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("escrow")
    planes = isolated_plane(kube, root / "plane")
    plane = next(planes)
    token = make_softhsm_token("escrow-main")
    sidecar = Sidecar(root / "hsm", token).start()
    operator = Operator(
        root / "op", plane, sidecar.socket, name="escrow-op", metrics_port=_free_port()
    )
    built: Stack | None = None
    try:
        operator.start().wait_active()
        plane.kubectl("create", "namespace", NS)
        built = Stack(plane, token, sidecar, operator, root)
        yield built
    finally:
        # The drill replaces the sidecar and the operator: stop whichever run now.
        running = (built.operator, built.sidecar) if built else (operator, sidecar)
        for proc in running:
            proc.stop()
        planes.close()  # type: ignore[attr-defined]


def test_refusals_jurisdiction_admission_token_and_non_escrowed_keys(
    stack: Stack, make_softhsm_token: Callable[[str], DevToken], tmp_path: Path
) -> None:
    plane, token = stack.plane, stack.token
    agent_token = make_softhsm_token("escrow-refusals")
    far_pem = _keygen(agent_token, "faraway", tmp_path / "faraway.pem")
    stranger_pem = _keygen(agent_token, "stranger", tmp_path / "stranger.pem")
    _admit(token, tmp_path / "faraway.pem")  # admitted, but in the wrong country
    _apply(
        plane,
        _agent("faraway", far_pem, "US"),
        _agent("stranger", stranger_pem, "DE"),
        _keyring("narrow", {"agents": ["faraway"], "allowedJurisdictions": ["DE", "FR"]}),
        _keyring("lonely", {"agents": ["stranger"], "allowedJurisdictions": ["DE"]}),
        _keyring("plain", None),
    )
    _agent_ready(plane, "faraway", admitted=True)
    stranger = _agent_ready(plane, "stranger", admitted=False)
    assert condition(stranger, "Ready")["reason"] == "NotAdmitted"

    # Outside the allowed jurisdictions: refused, naming agent and jurisdiction; nothing made.
    narrow = _escrowed(plane, "narrow", "False", "AgentRefused")
    message = condition(narrow, "Escrowed")["message"]
    assert "faraway" in message
    assert "US" in message
    assert not narrow["status"].get("escrowExports")
    assert _packages(plane, "narrow") == []
    assert narrow["status"]["versions"][0]["escrowable"] is True

    # Not admitted by the Security Officer: refused, saying so.
    lonely = _escrowed(plane, "lonely", "False", "AgentRefused")
    assert "stranger" in condition(lonely, "Escrowed")["message"]
    assert "not admitted" in condition(lonely, "Escrowed")["message"]
    assert _packages(plane, "lonely") == []

    # The token itself refuses a wrapping key the SO did not trust, even when a user of the
    # token plants it as an ordinary wrapping key and asks the sidecar directly.
    _direct(token, "plant-untrusted", str(tmp_path / "stranger.pem"))
    fingerprint = parse_public_key(stranger_pem).fingerprint
    admitted_fp = parse_public_key(far_pem).fingerprint

    async def export(ring: str, fp: str) -> HsmError:
        async with HsmClient.unix(stack.sidecar.socket) as hsm:
            with pytest.raises(HsmError) as info:
                await hsm.export_escrow(ring, 1, fp)
            return info.value

    refused = asyncio.run(export("lonely", fingerprint))
    assert refused.reason is Reason.ESCROW_AGENT_NOT_ADMITTED
    assert "CKR_KEY_NOT_WRAPPABLE" in refused.message

    # A non-escrowed KeyRing's KEK: not through the sidecar, not through PKCS#11 directly.
    plain = asyncio.run(export("plain", admitted_fp))
    assert plain.reason is Reason.VERSION_NOT_ESCROWABLE
    attempts = _direct(token, "try-export", "plain", "1")
    assert len(attempts) >= 8
    assert "ok" not in attempts.values(), attempts
    # The escrowable KEK of an escrowed ring leaves only under the trusted key (and only
    # RSA-OAEP/PKCS#1 wrapping of it works); every other path is refused by the token.
    escrowable = _direct(token, "try-export", "narrow", "1")
    opened = sorted(k for k, v in escrowable.items() if v == "ok" and k.startswith("C_WrapKey"))
    assert opened
    assert all("trusted=True" in k for k in opened), escrowable
    assert escrowable["C_GetAttributeValue CKA_VALUE"] != "ok"
    assert escrowable["C_SetAttributeValue CKA_WRAP_WITH_TRUSTED=false"] != "ok"
    assert escrowable["C_SetAttributeValue CKA_SENSITIVE=false"] != "ok"

    # Escrow switched on for a KeyRing whose version 1 exists never-extractable.
    _apply(plane, _keyring("late", None))
    eventually(lambda: ready(get(plane, "keyring", "late")), 60, "late Ready")
    _apply(plane, _keyring("late", {"agents": ["faraway"], "allowedJurisdictions": ["US"]}))
    late = _escrowed(plane, "late", "False", "VersionNotEscrowable")
    assert "rotate" in condition(late, "Escrowed")["message"]
    assert kustody_cli(plane, "rotate", "late").returncode == 0

    def v2_exported() -> Any:
        obj = get(plane, "keyring", "late")
        exports = (obj or {}).get("status", {}).get("escrowExports") or []
        return obj if [(e["version"], e["agent"]) for e in exports] == [(2, "faraway")] else None

    late = eventually(v2_exported, 60, "version 2 of late escrowed")
    # A co-tenant with the user PIN pre-plants the next version of an escrowed KeyRing as a
    # "recovered" key of a value it knows: the rotation refuses to use it.
    _direct(token, "plant-recovered", "narrow", "2")
    assert kustody_cli(plane, "rotate", "narrow").returncode == 0
    planted = eventually(
        lambda: (
            (o := get(plane, "keyring", "narrow"))
            and condition(o, "Ready").get("reason") == "KeyNotTrusted"
            and o
        ),
        60,
        "the planted version refused",
    )
    assert "unwrapped into the token" in condition(planted, "Ready")["message"]
    assert planted["status"]["primaryVersion"] == 1
    assert "version(s) 1 " in condition(late, "Escrowed")["message"]
    escrowable_flags = [v.get("escrowable") for v in late["status"]["versions"]]
    assert escrowable_flags == [False, True]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pki(directory: Path) -> dict[str, Path]:
    """A CA the workload trusts and the unwrap service's serving certificate."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from test_unwrap import _cert

    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("kustody-unwrap-ca", ca_key, None, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("kustody-unwrap", key, ca, ca_key)
    pem = serialization.Encoding.PEM
    paths = {
        "ca": directory / "ca.crt",
        "cert": directory / "tls.crt",
        "key": directory / "tls.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _exported_events(plane: Cluster, ring: str) -> int:
    out = plane.kubectl(
        "get", "events", "-o", "json", "--field-selector", f"involvedObject.name={ring}"
    ).stdout
    items = json.loads(out)["items"]
    return sum(int(e.get("count") or 1) for e in items if e["reason"] == "EscrowExported")


def _audit(sidecar: Sidecar, ring: str) -> list[dict[str, Any]]:
    marker = "kustody.hsm.audit: "
    lines = sidecar.proc.logfile.read_text(errors="replace").splitlines()
    records = [json.loads(line.split(marker, 1)[1]) for line in lines if marker in line]
    return [r for r in records if r["rpc"] == "ExportEscrow" and r["key_ring"] == ring]


def _metric(operator: Operator, series: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series)
    ]
    return values[0] if values else 0.0


def _items(plane: Cluster, kind: str, ns: str = NS) -> list[dict[str, Any]]:
    items = json.loads(plane.kubectl("get", kind, "-n", ns, "-o", "json").stdout)["items"]
    return [i for i in items if kind != "secrets" or i.get("type") == "kustody.io/wrapped-key"]


def _deks(socket: Path, secrets: list[dict[str, Any]]) -> dict[str, list[bytes]]:
    async def run() -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        async with HsmClient.unix(socket) as hsm:
            for s in secrets:
                data = {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
                ctx = json.loads(data["encryption-context"])
                binding = Binding(ctx["namespace"], ctx["dataKey"], ctx["encryptionContext"])
                keys = json.loads(data["keyset"])["keys"]
                out[s["metadata"]["name"]] = [
                    await hsm.decrypt(k["wrappedKey"], binding, allow_plaintext_export=True)
                    for k in keys
                ]
        return out

    return asyncio.run(run())


def test_lost_token_drill_recovers_from_agent_a(
    stack: Stack, make_softhsm_token: Callable[[str], DevToken], tmp_path: Path
) -> None:
    plane, token = stack.plane, stack.token
    # Agent A's own token: its key pair is generated there; after the loss it becomes the
    # sidecar's token. Agent B keeps its key in another token.
    token_a = make_softhsm_token("escrow-agent-a")
    token_b = make_softhsm_token("escrow-agent-b")
    pem_a = _keygen(token_a, "agent-a", tmp_path / "a.pem")
    pem_b = _keygen(token_b, "agent-b", tmp_path / "b.pem")
    for pem in ("a.pem", "b.pem"):
        _admit(token, tmp_path / pem)
    n = 50
    ring = "vault"
    docs = [
        _agent("agent-a", pem_a, "DE"),
        _agent("agent-b", pem_b, "CH"),
        _keyring(ring, {"agents": ["agent-a", "agent-b"], "allowedJurisdictions": ["CH", "DE"]}),
    ]
    plane.kubectl("create", "serviceaccount", "app", "-n", NS)
    docs += [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": f"dk-{i:02d}", "namespace": NS},
            "spec": {
                "keyRingRef": {"name": ring},
                "secretName": f"dk-{i:02d}",
                "consumers": ["app"],
            },
        }
        for i in range(n)
    ]
    _apply(plane, *docs)
    _agent_ready(plane, "agent-a", admitted=True)
    _escrowed(plane, ring, "True")
    eventually(lambda: sum(ready(d) for d in _items(plane, "datakeys")) == n, 180, "all Ready")
    assert kustody_cli(plane, "rotate", ring).returncode == 0

    def settled() -> Any:
        obj = get(plane, "keyring", ring)
        exports = ((obj or {}).get("status") or {}).get("escrowExports") or []
        done = len(exports) == 4 and condition(obj, "Escrowed").get("status") == "True"
        dks = _items(plane, "datakeys")
        rewrapped = all(d["status"].get("keyRingVersion") == 2 and ready(d) for d in dks)
        return obj if done and rewrapped and len(dks) == n else None

    before_ring = eventually(settled, 180, "rotated, re-wrapped and both versions escrowed twice")
    exports = before_ring["status"]["escrowExports"]
    assert [(e["version"], e["agent"]) for e in exports] == [
        (1, "agent-a"), (1, "agent-b"), (2, "agent-a"), (2, "agent-b"),
    ]  # fmt: skip
    secrets_before = {s["metadata"]["name"]: s for s in _items(plane, "secrets")}
    deks_before = _deks(stack.sidecar.socket, list(secrets_before.values()))
    sample = secrets_before["dk-07"]
    data = {k: base64.b64decode(v).decode() for k, v in sample["data"].items()}
    keyset_doc = json.loads(data["keyset"])
    record_plain = b"a record written before the token was lost"
    keyset = Keyset.from_json(
        json.dumps(
            {
                "format": "kustody.io/keyset/v1",
                "dataKey": {"namespace": NS, "name": "dk-07"},
                "primaryKeyId": keyset_doc["primaryKeyId"],
                "keys": [
                    {
                        "keyId": k["keyId"],
                        "generation": k["generation"],
                        "status": k["status"],
                        "key": base64.b64encode(dek).decode(),
                    }
                    for k, dek in zip(keyset_doc["keys"], deks_before["dk-07"], strict=True)
                ],
            }
        )
    )
    record = keyset.encrypt(record_plain)

    # Every export is recorded: Events, the sidecar's audit lines (with the agent), the metric.
    fps = {parse_public_key(pem_a).fingerprint, parse_public_key(pem_b).fingerprint}
    assert {e["agentFingerprint"] for e in exports} == fps
    assert _exported_events(plane, ring) == 4
    audit = _audit(stack.sidecar, ring)
    assert sorted((a["version"], a["outcome"]) for a in audit) == [
        (1, "ok"), (1, "ok"), (2, "ok"), (2, "ok"),
    ]  # fmt: skip
    assert {a["agent"] for a in audit} == fps
    exported_metric = _metric(stack.operator, 'kustody_escrow_exports_total{outcome="exported"}')
    assert exported_metric >= 4

    # Re-export is idempotent: another pass makes no new package.
    rv = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in _packages(plane, ring)}
    plane.kubectl("annotate", "keyring", ring, "--overwrite", "drill/poke=1")
    eventually(
        lambda: condition(get(plane, "keyring", ring), "Escrowed").get("status") == "True",
        30, "still escrowed",
    )  # fmt: skip
    after_poke = get(plane, "keyring", ring) or {}
    assert after_poke["status"]["escrowExports"] == exports
    assert {s["metadata"]["name"]: s["metadata"]["resourceVersion"]
            for s in _packages(plane, ring)} == rv  # fmt: skip
    assert _exported_events(plane, ring) == 4
    assert len(_audit(stack.sidecar, ring)) == 4
    assert _metric(stack.operator, 'kustody_escrow_exports_total{outcome="exported"}') == (
        exported_metric
    )

    # Hand-over: agent A's packages to files.
    pkgdir = tmp_path / "packages-a"
    result = kustody_cli(plane, "escrow", "export", ring, "-d", str(pkgdir), "--agent", "agent-a")
    assert result.returncode == 0, result.stderr
    files = sorted(pkgdir.iterdir())
    assert [f.name for f in files] == [f"{ring}-v1-agent-a.json", f"{ring}-v2-agent-a.json"]
    fingerprints = {(e["version"], e["agent"]): e["packageFingerprint"] for e in exports}
    for f in files:
        package = Package.from_json(f.read_bytes())
        assert len(package.wrapped) == 384  # RSA-3072 OAEP ciphertext, nothing else
        assert package.fingerprint == fingerprints[(package.version, "agent-a")]
        assert (
            package.check_value
            == before_ring["status"]["versions"][package.version - 1]["fingerprint"]
        )
        assert f.stat().st_mode & 0o077 == 0

    # Leak scan: no DEK in packages, KeyRing status, Events, package Secrets or logs.
    events = stack.plane.kubectl("get", "events", "-A", "-o", "json").stdout
    haystack = "\n".join(
        [
            *(f.read_text() for f in files),
            json.dumps(before_ring),
            events,
            json.dumps(_packages(plane, ring)),
            stack.operator.log(),
            stack.sidecar.proc.logfile.read_text(errors="replace"),
        ]
    )
    for deks in deks_before.values():
        for dek in deks:
            assert dek.hex() not in haystack
            assert base64.b64encode(dek).decode() not in haystack
    # The escrowed KEKs and agent A's private key are sensitive: not readable from their tokens.
    attrs = _direct(token, "attributes", f"kustody:{ring}:v2")
    assert attrs["secret"]["sensitive"] is True
    assert attrs["secret"]["value"] != "ok"
    private_a = _direct(token_a, "attributes", "agent-a")["private"]
    assert private_a["sensitive"] is True
    assert private_a["extractable"] is False
    assert private_a["value"] != "ok"

    # The token is destroyed: sidecar and operator stop, its files are deleted.
    stack.operator.stop()
    stack.sidecar.stop()
    shutil.rmtree(token.directory)

    # Agent A recovers its packages inside its own token, which becomes the sidecar's token.
    result = _cli(["escrow", "recover", *_token_args(token_a), "--pin-file",
                   str(token_a.pin_file), *map(str, files)], token_a)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("recovered KEK version") == 2
    recovered = _direct(token_a, "attributes", f"kustody:{ring}:v1")["secret"]
    assert recovered["sensitive"] is True
    assert recovered["value"] != "ok"
    pki = _pki(tmp_path / "pki")
    sidecar = Sidecar(
        stack.root / "hsm-recovered",
        token_a,
        workload_listen=f"127.0.0.1:{_free_port()}",
        workload_tls_cert=pki["cert"],
        workload_tls_key=pki["key"],
        kubeconfig=plane.kubeconfig,
    ).start()
    operator = Operator(stack.root / "op-recovered", plane, sidecar.socket, name="escrow-op")
    stack.sidecar, stack.operator = sidecar, operator
    operator.start().wait_active()
    plane.kubectl("annotate", "keyring", ring, "--overwrite", "drill/poke=2")

    def adopted() -> Any:
        obj = get(plane, "keyring", ring)
        return (
            obj if ready(obj) and condition(obj, "HSMReachable").get("status") == "True" else None
        )

    after_ring = eventually(adopted, 90, "the KeyRing Ready on the recovered token")
    assert [(v["version"], v["fingerprint"]) for v in after_ring["status"]["versions"]] == [
        (v["version"], v["fingerprint"]) for v in before_ring["status"]["versions"]
    ]
    # The new token has not admitted the agents (its SO has not run the ceremony): say so.
    _agent_ready(plane, "agent-a", admitted=False)
    _escrowed(plane, ring, "False", "AgentRefused")

    # Every Secret decrypts, through the new sidecar, to the DEK it had; old data decrypts.
    secrets_after = {s["metadata"]["name"]: s for s in _items(plane, "secrets")}
    assert _deks(sidecar.socket, list(secrets_after.values())) == deks_before
    assert keyset.decrypt(record) == record_plain
    assert all(ready(d) for d in _items(plane, "datakeys"))

    # The workload's own unwrap (its ServiceAccount token, the sidecar's workload service)
    # gets the keyset back from the recovered token, and reads the record written before.
    token_file = tmp_path / "sa-token"
    token_file.write_text(
        plane.kubectl("create", "token", "app", "-n", NS, "--audience", "kustody").stdout.strip()
    )
    mounted = tmp_path / "dk-07-secret"
    mounted.mkdir()
    for key, value in secrets_after["dk-07"]["data"].items():
        (mounted / key).write_bytes(base64.b64decode(value))
    assert sidecar.workload_listen is not None
    client = UnwrapClient(sidecar.workload_listen, ca_file=pki["ca"], token_file=token_file)
    unwrapped = client.unwrap_keyset(mounted)
    assert unwrapped is not None
    assert Keyset.from_json(unwrapped).decrypt(record) == record_plain

    # And new key material can still be made (the recovered KEK wraps a new generation).
    plane.kubectl("annotate", "datakey", "dk-07", "-n", NS, "--overwrite",
                  "kustody.io/regenerate-requested-at=2026-12-02T05:00:00Z")  # fmt: skip
    eventually(
        lambda: len((get(plane, "datakey", "dk-07", NS) or {}).get("status", {})
                    .get("generations") or ()) == 2,
        60, "a new generation under the recovered KEK",
    )  # fmt: skip
