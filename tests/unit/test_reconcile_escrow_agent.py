"""EscrowAgents and the escrow step of a KeyRing pass, against the fakes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from kustody.controller.escrow import reconciler as escrow_reconciler
from kustody.domain.escrow import parse_public_key
from kustody.domain.specs import ROTATE_ANNOTATION
from kustody.domain.timestamps import format_time
from kustody.kube.resources import ESCROW_AGENTS, KEYRINGS, SECRETS
from kustody.testing.fakes import FakeOperator, condition, keyring

NS = "shop"


def scenario(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def test() -> None:
        asyncio.run(body())

    test.__doc__ = body.__doc__
    return test


# Public halves of 3072-bit RSA keys made once for these tests (generating them per run
# would cost up to seconds); no private key exists anywhere.
AGENT_PEMS = {
    "alice": """\
-----BEGIN PUBLIC KEY-----
MIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAl/2DMXpeLo1Age/H/U9U
+0kMJ61VroKxiEPJywJk7DZgZB6CUrQopGcIz9+e90YCL49BdvjyyPxxoc2UmJat
m4+lWIzGOfyWEoCd3RM2AKglj2X2no9AGOvQB7RHGG5DqSGsXIK/SW1QFV5YAGX5
YULmuOowyaFe2QyiE8OGZh5wnTlnQMSbJUHlujPZgbkcpuCnPKhBEA8AbvXsrhEa
BjMOF+UDv8eKxvkW/0SlVZ3qpsk7OR3qUGyysrWIatXHLIyHbNpnjdpCYJnlQNQg
Wb0mt9mbhhTb3lhzWxorTnYuibKevW9c+nwOFAMAR7mv0zHEw42AhwaWUzCzz8dq
pjWzCOxSSCdwLqppsLSedbnIE36boyGkuRyzbxL1338OXdyNMeJx5bzp5IhFQblF
FMLkHEoE8PenRoaJNDH1sMHFlaqSS78bXWNr6pu4GkNrF2ab6ZKrHg4TfxyDdNxT
DmP6PRr+pfS72feZc49QgqzokyjJa+Ua2XxtUaPXA0vtAgMBAAE=
-----END PUBLIC KEY-----
""",
    "faraway": """\
-----BEGIN PUBLIC KEY-----
MIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAw6kq6Czt6hw4sRNWbLCQ
jFrBASIjzRnk4ac9hWi7UNNxIeIWUVtpGmg4UqNRrHNWqNq7gzPu2pmeSldf2qBI
u4JNGjAaSxSxyDkQhudLco5A+BFNuqlepf/5czySkeFd9yqFgT8QdQEaSzSjTLh0
I0YkxyVNIiHAp3yQyeR5YI7SV0TGAAlDUd4mqy0HbX5LLgAiFIV7wTPuU0m+XHy/
WJymhbn7BAMc3xkueG9vP1Q0LvqoRRpoMBjWa2CKPjcxEziR/MOv9yyswEzibyTk
N+xFPAqj/Fn6weJzJrc+E/JVljVe4smN8gh/97dyOJ1L4rTlBX7eOy6HUduD4kD6
xxNFspDsQlSFEFtLXixv2v7UqPu8aBxm9c+puoSJyPQ7VjDSwQJMBTA9p5Mpg5zM
6rpkjlqxXvSRH06mutA1+tpD7Qfq0l4eY8JZgd+8G3ztAFdPxtVQf1nT8IeSwV3X
nVpxUJ3Jf2ZMbhI+dIYJiX4nqWMaDBLSzQWNTzjkq2ejAgMBAAE=
-----END PUBLIC KEY-----
""",
    "stranger": """\
-----BEGIN PUBLIC KEY-----
MIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAqL+qGIcNnv7rBFKQJPSt
qtloJE0ql54Ez4rlqdUx98LI1L1JCefmyppR9jGBMIdMYUlAytlYxXUZ8uQyo9eJ
2Ra9heiwjdkT2UkiW//+qzsPoNcKrEHJwRcuz/N3YCgAfcNL3LdEdcl18lCT/7m5
ufYi9qV1yOJirnbEBvH/Th00RqlbgsDjubSM8EmjHcw3xEWnpwUE6kO7YP6R565x
thIA0WhgyXqtxRZZUTeB/7IQyee+bWL8SFT5bVqQo58mIkgdNwnwL3s4lMYjkVG/
TDiW4eiyz2rbOmpGhh3N2oyC839V9CJV8+KjtSZLLl7peVkLVSZgA5c6t94/qrw0
TwemHe+aN6gH4+Qj5sEgPZGqnd87Fm0kTTH33A6Gnx3587i5MyA8BRMO44VqUkr9
ogswrQydM1gmER9pZObkS1Ump7uIQoqe6QzWWvec/gtyEL6GjnRdBMmUcjJkxmwx
jitZ61N9fTDy21CX3xuO0Mea1eULLMtjCTNGhvCU8B4/AgMBAAE=
-----END PUBLIC KEY-----
""",
}


def agent_pem(name: str) -> str:
    return AGENT_PEMS[name]


def agent(name: str, jurisdiction: str = "DE", pem: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"publicKey": pem if pem is not None else agent_pem(name),
                 "jurisdiction": jurisdiction, "contact": f"{name}@example"},
    }  # fmt: skip


def admit(op: FakeOperator, name: str) -> str:
    fingerprint = parse_public_key(agent_pem(name)).fingerprint
    op.hsm.admitted_agents.add(fingerprint)
    return fingerprint


def packages(op: FakeOperator) -> list[str]:
    return [s["metadata"]["name"] for s in op.kube.objects(SECRETS, op.namespace)]


# -- EscrowAgent -----------------------------------------------------------------------------


@scenario
async def test_an_agent_is_ready_once_the_token_admits_its_key() -> None:
    op = FakeOperator()
    op.kube.add(ESCROW_AGENTS, agent("alice"))
    await op.run_until_idle()
    obj = op.kube.object(ESCROW_AGENTS, "alice") or {}
    fingerprint = parse_public_key(agent_pem("alice")).fingerprint
    assert obj["status"]["fingerprint"] == fingerprint
    assert obj["status"]["admitted"] is False
    assert obj["status"]["keyBits"] == 3072
    assert condition(obj, "Ready")["reason"] == "NotAdmitted"
    assert op.events.reasons("alice") == ["NotAdmitted"]

    admit(op, "alice")  # the Security Officer, outside the cluster
    await op.advance(30)  # the agent is looked at again on its own
    obj = op.kube.object(ESCROW_AGENTS, "alice") or {}
    assert obj["status"]["admitted"] is True
    assert condition(obj, "Ready")["reason"] == "Admitted"
    assert op.events.reasons("alice") == ["NotAdmitted", "Admitted"]
    op.kube.calls.clear()
    assert await escrow_reconciler.reconcile_agent(op.rt, "alice") == 300.0
    assert op.kube.writes() == []


@scenario
async def test_an_unusable_public_key_is_reported() -> None:
    op = FakeOperator()
    op.kube.add(ESCROW_AGENTS, agent("bob", pem="-----BEGIN PRIVATE KEY-----\n..."))
    await op.run_until_idle()
    obj = op.kube.object(ESCROW_AGENTS, "bob") or {}
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidPublicKey")
    assert "private key" in ready["message"]
    assert obj["status"]["admitted"] is False
    assert op.hsm.ops("escrow_agent_admitted") == []


# -- the escrow step of a KeyRing ------------------------------------------------------------


def escrowed_ring(name: str, agents: list[str], allowed: list[str]) -> dict[str, Any]:
    return keyring(name, [NS], escrow={"agents": agents, "allowedJurisdictions": allowed})


@scenario
async def test_every_live_version_is_escrowed_once_to_each_admitted_allowed_agent() -> None:
    op = FakeOperator()
    admit(op, "alice")
    op.kube.add(ESCROW_AGENTS, agent("alice", "DE"))
    op.kube.add(KEYRINGS, escrowed_ring("ring", ["alice"], ["DE"]))
    await op.run_until_idle()
    obj = op.kube.object(KEYRINGS, "ring") or {}
    assert condition(obj, "Escrowed")["reason"] == "Exported"
    assert [(e["version"], e["agent"]) for e in obj["status"]["escrowExports"]] == [(1, "alice")]
    assert obj["status"]["versions"][0]["escrowable"] is True
    assert packages(op) == ["kustody-escrow-ring-v1-alice"]
    assert "EscrowExported" in op.events.reasons("ring")
    assert op.metric("kustody_escrow_exports_total", outcome="exported") == 1

    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, "ring", {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    await op.run_until_idle()
    obj = op.kube.object(KEYRINGS, "ring") or {}
    assert [(e["version"], e["agent"]) for e in obj["status"]["escrowExports"]] == [
        (1, "alice"), (2, "alice"),
    ]  # fmt: skip
    await op.advance(hours=1)
    assert len(op.hsm.ops("export_escrow")) == 2  # never made again
    assert op.metric("kustody_escrow_exports_total", outcome="exported") == 2


@scenario
async def test_agents_outside_the_jurisdictions_or_not_admitted_are_refused() -> None:
    op = FakeOperator()
    admit(op, "faraway")
    op.kube.add(ESCROW_AGENTS, agent("faraway", "US"))
    op.kube.add(ESCROW_AGENTS, agent("stranger", "DE"))
    op.kube.add(KEYRINGS, escrowed_ring("narrow", ["faraway"], ["DE", "FR"]))
    op.kube.add(KEYRINGS, escrowed_ring("lonely", ["stranger"], ["DE"]))
    await op.run_until_idle()
    narrow = condition(op.kube.object(KEYRINGS, "narrow"), "Escrowed")
    assert (narrow["status"], narrow["reason"]) == ("False", "AgentRefused")
    assert "faraway" in narrow["message"]
    assert "US" in narrow["message"]
    lonely = condition(op.kube.object(KEYRINGS, "lonely"), "Escrowed")
    assert "not admitted" in lonely["message"]
    assert packages(op) == []
    assert op.hsm.ops("export_escrow") == []
    assert "EscrowAgentRefused" in op.events.reasons("narrow")


@scenario
async def test_a_version_created_before_escrow_was_switched_on_is_reported() -> None:
    op = FakeOperator()
    admit(op, "alice")
    op.kube.add(ESCROW_AGENTS, agent("alice", "DE"))
    op.kube.add(KEYRINGS, keyring("late", [NS]))
    await op.run_until_idle()
    escrow = {"agents": ["alice"], "allowedJurisdictions": ["DE"]}
    op.kube.edit(KEYRINGS, "late", {"spec": {"escrow": escrow}})
    await op.run_until_idle()
    late = condition(op.kube.object(KEYRINGS, "late"), "Escrowed")
    assert late["reason"] == "VersionNotEscrowable"
    assert "rotate" in late["message"]
    value = format_time(op.clock())
    op.kube.edit(KEYRINGS, "late", {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    await op.run_until_idle()
    obj = op.kube.object(KEYRINGS, "late") or {}
    assert [(e["version"], e["agent"]) for e in obj["status"]["escrowExports"]] == [(2, "alice")]
    assert [v["escrowable"] for v in obj["status"]["versions"]] == [False, True]


@scenario
async def test_a_token_that_refuses_an_agent_the_status_calls_admitted_is_reported() -> None:
    """The token was replaced (or the SO withdrew the key) since the agent was last looked at."""
    op = FakeOperator()
    admit(op, "alice")
    op.kube.add(ESCROW_AGENTS, agent("alice", "DE"))
    await op.run_until_idle()
    op.hsm.admitted_agents.clear()
    op.kube.add(KEYRINGS, escrowed_ring("ring", ["alice"], ["DE"]))
    await op.run_until_idle()
    escrowed = condition(op.kube.object(KEYRINGS, "ring"), "Escrowed")
    assert (escrowed["status"], escrowed["reason"]) == ("False", "EscrowExportFailed")
    assert "v1 → alice" in escrowed["message"]
    assert op.metric("kustody_escrow_exports_total", outcome="refused") >= 1
    assert packages(op) == []
    assert "EscrowExportFailed" in op.events.reasons("ring")


@scenario
async def test_a_package_stored_before_a_crash_is_recorded_not_made_again() -> None:
    op = FakeOperator()
    admit(op, "alice")
    op.kube.add(ESCROW_AGENTS, agent("alice", "DE"))
    op.kube.add(KEYRINGS, escrowed_ring("ring", ["alice"], ["DE"]))
    await op.run_until_idle()
    recorded = (op.kube.object(KEYRINGS, "ring") or {})["status"]["escrowExports"]
    # As if the operator died between storing the package and writing the status.
    op.kube.edit(KEYRINGS, "ring", {"status": {"escrowExports": None}}, status=True)
    await op.advance(hours=1)
    again = (op.kube.object(KEYRINGS, "ring") or {})["status"]["escrowExports"]
    assert [e["packageFingerprint"] for e in again] == [e["packageFingerprint"] for e in recorded]
    assert again[0]["exportedAt"] == recorded[0]["exportedAt"]
    assert len(op.hsm.ops("export_escrow")) == 1
    assert op.events.reasons("ring").count("EscrowExported") == 1


@scenario
async def test_an_unusable_escrow_spec_is_reported() -> None:
    op = FakeOperator()
    op.kube.add(KEYRINGS, keyring("ring", [NS], escrow={"agents": [], "allowedJurisdictions": []}))
    await op.run_until_idle()
    escrowed = condition(op.kube.object(KEYRINGS, "ring"), "Escrowed")
    assert (escrowed["status"], escrowed["reason"]) == ("False", "InvalidSpec")
    assert op.hsm.ops("export_escrow") == []
