"""KeyService against a real SoftHSM2 token: versions, data keys, AAD binding, states."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from kustody.api.errors import HsmError, Reason
from kustody.dev.tokens import DevToken
from kustody.domain.aad import Binding, KmsBinding
from kustody.domain.envelope import Envelope
from kustody.domain.keyversion import KeyVersionRef, VersionState
from kustody.pkcs11 import thread
from kustody.sidecar.connection import HsmConnection
from kustody.sidecar.keyservice import (
    CHUNK_ITEMS,
    GeneratedKey,
    GenerateRequest,
    KeyService,
    RewrapRequest,
)
from pkcs11 import Attribute, ObjectClass

from .conftest import run

BINDING = Binding("team-a", "db-key", {"app": "db", "tier": "prod"})


_lib: list[Any] = []


def _key_objects(token: DevToken, ref: KeyVersionRef) -> list[dict[str, object]]:
    """The token's objects for ``ref``, read by this (test) process in its own session.

    The sidecar's worker process owns the token; reading from a second process is fine.
    """
    if not _lib:
        _lib.append(pkcs11.lib(str(token.module)))
    session = _lib[0].get_token(token_label=token.label).open(user_pin=token.pin_file.read_text())
    try:
        return [
            {
                "extractable": obj[Attribute.EXTRACTABLE],
                "sensitive": obj[Attribute.SENSITIVE],
                "token": obj[Attribute.TOKEN],
                "sign": obj[Attribute.SIGN],
                "label": obj[Attribute.LABEL],
            }
            for obj in session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: ref.object_id}
            )
        ]
    finally:
        session.close()


def _expect(reason: Reason, coro: object) -> HsmError:
    with pytest.raises(HsmError) as info:
        run(coro)  # type: ignore[arg-type]
    assert info.value.reason is reason, info.value
    return info.value


def test_create_is_idempotent_and_key_is_locked_down(
    key_service: KeyService, hsm_token: DevToken, ring: str
) -> None:
    first = run(key_service.create_key_version(ring, 1))
    again = run(key_service.create_key_version(ring, 1))
    assert first == again
    assert first.state is VersionState.ENABLED
    assert len(first.fingerprint) == 6
    objects = _key_objects(hsm_token, KeyVersionRef(ring, 1))
    assert objects == [
        {
            "extractable": False,
            "sensitive": True,
            "token": True,
            "sign": False,
            "label": f"kustody:{ring}:v1",
        }
    ]


def test_create_after_restart_finds_existing_object(
    key_service: KeyService, connection: HsmConnection, hsm_token: DevToken, ring: str
) -> None:
    created = run(key_service.create_key_version(ring, 1))
    # Forget the cache as a crash would: a fresh scan must find the same object.
    run(connection.rescan())
    assert run(key_service.create_key_version(ring, 1)) == created
    assert len(_key_objects(hsm_token, KeyVersionRef(ring, 1))) == 1


def test_generate_and_decrypt_round_trip(key_service: KeyService, ring: str) -> None:
    run(key_service.create_key_version(ring, 1))
    generated = run(
        key_service.generate_data_key(GenerateRequest(ring, BINDING, include_plaintext=True))
    )
    assert generated.plaintext is not None
    assert len(generated.plaintext) == 32
    text = generated.envelope.to_text()
    assert text.startswith("kustody:v1:")
    assert generated.plaintext.hex() not in text
    plaintext = run(key_service.decrypt(Envelope.from_text(text), BINDING))
    assert plaintext == generated.plaintext


def test_plaintext_is_omitted_unless_asked(key_service: KeyService, ring: str) -> None:
    run(key_service.create_key_version(ring, 1))
    generated = run(key_service.generate_data_key(GenerateRequest(ring, BINDING, length=64)))
    assert generated.plaintext is None
    assert len(run(key_service.decrypt(generated.envelope, BINDING))) == 64


def test_data_keys_are_distinct(key_service: KeyService, ring: str) -> None:
    run(key_service.create_key_version(ring, 1))
    requests = [GenerateRequest(ring, BINDING, include_plaintext=True)] * 50
    keys = run(key_service.generate_data_keys(requests))
    plaintexts = {k.plaintext for k in keys if not isinstance(k, HsmError)}
    assert len(plaintexts) == 50


@pytest.mark.parametrize(
    "other",
    [
        Binding("team-b", "db-key", {"app": "db", "tier": "prod"}),
        Binding("team-a", "other-key", {"app": "db", "tier": "prod"}),
        Binding("team-a", "db-key", {"app": "db", "tier": "dev"}),
        Binding("team-a", "db-key", {"app": "db"}),
    ],
)
def test_wrong_binding_fails_authentication(
    key_service: KeyService, ring: str, other: Binding
) -> None:
    run(key_service.create_key_version(ring, 1))
    generated = run(key_service.generate_data_key(GenerateRequest(ring, BINDING)))
    _expect(Reason.AAD_MISMATCH, key_service.decrypt(generated.envelope, other))
    # The token is fine afterwards.
    assert run(key_service.decrypt(generated.envelope, BINDING))


def test_header_tampering_fails_authentication(key_service: KeyService, ring: str) -> None:
    run(key_service.create_key_version(ring, 1))
    run(key_service.create_key_version(ring, 2))
    generated = run(key_service.generate_data_key(GenerateRequest(ring, BINDING, version=1)))
    moved = Envelope(
        KeyVersionRef(ring, 2), generated.envelope.nonce, generated.envelope.ciphertext
    )
    _expect(Reason.AAD_MISMATCH, key_service.decrypt(moved, BINDING))


def test_primary_is_highest_enabled_and_rewrap_moves_versions(
    key_service: KeyService, ring: str
) -> None:
    run(key_service.create_key_version(ring, 1))
    old = run(key_service.generate_data_key(GenerateRequest(ring, BINDING, include_plaintext=True)))
    assert old.envelope.key.version == 1
    run(key_service.create_key_version(ring, 2))
    new = run(key_service.rewrap(RewrapRequest(old.envelope, BINDING)))
    assert new.key.version == 2
    assert run(key_service.decrypt(new, BINDING)) == old.plaintext
    run(key_service.set_version_state(ring, 2, VersionState.DISABLED))
    description = run(key_service.describe_key(ring))
    assert description.primary_version == 1
    assert [v.state for v in description.versions] == [VersionState.ENABLED, VersionState.DISABLED]


def test_disabled_version_refuses_and_destroy_needs_disabled(
    key_service: KeyService, connection: HsmConnection, hsm_token: DevToken, ring: str
) -> None:
    run(key_service.create_key_version(ring, 1))
    generated = run(key_service.generate_data_key(GenerateRequest(ring, BINDING)))
    _expect(Reason.VERSION_NOT_DISABLED, key_service.destroy_version(ring, 1))
    run(key_service.set_version_state(ring, 1, VersionState.DISABLED))
    _expect(Reason.VERSION_DISABLED, key_service.decrypt(generated.envelope, BINDING))
    _expect(
        Reason.NO_PRIMARY_VERSION, key_service.generate_data_key(GenerateRequest(ring, BINDING))
    )
    # The disabled state is on the token: a rescan (restart) still sees it.
    run(connection.rescan())
    _expect(Reason.VERSION_DISABLED, key_service.decrypt(generated.envelope, BINDING))
    run(key_service.set_version_state(ring, 1, VersionState.ENABLED))
    assert run(key_service.decrypt(generated.envelope, BINDING))
    run(key_service.set_version_state(ring, 1, VersionState.DISABLED))
    # DISABLED is not enough: destruction must be scheduled first (the waiting period is 0 here).
    _expect(Reason.DESTRUCTION_NOT_DUE, key_service.destroy_version(ring, 1))
    scheduled = run(key_service.set_version_state(ring, 1, VersionState.DESTROY_SCHEDULED))
    assert scheduled.state is VersionState.DESTROY_SCHEDULED
    _expect(Reason.VERSION_DISABLED, key_service.decrypt(generated.envelope, BINDING))
    run(connection.rescan())  # the schedule is on the token
    assert [v.state for v in run(key_service.describe_key(ring)).versions] == [
        VersionState.DESTROY_SCHEDULED
    ]
    destroyed = run(key_service.destroy_version(ring, 1))
    assert destroyed.state is VersionState.DESTROYED
    assert run(key_service.destroy_version(ring, 1)) == destroyed
    assert _key_objects(hsm_token, KeyVersionRef(ring, 1)) == []
    run(connection.rescan())
    _expect(Reason.VERSION_DESTROYED, key_service.decrypt(generated.envelope, BINDING))
    _expect(Reason.VERSION_DESTROYED, key_service.create_key_version(ring, 1))
    _expect(Reason.VERSION_DESTROYED, key_service.set_version_state(ring, 1, VersionState.ENABLED))


def test_unknown_version_and_ring(key_service: KeyService, ring: str) -> None:
    _expect(
        Reason.NO_PRIMARY_VERSION, key_service.generate_data_key(GenerateRequest(ring, BINDING))
    )
    _expect(
        Reason.VERSION_NOT_FOUND,
        key_service.generate_data_key(GenerateRequest(ring, BINDING, version=9)),
    )
    _expect(Reason.INVALID_ARGUMENT, key_service.create_key_version("Bad_Name", 1))
    _expect(Reason.INVALID_ARGUMENT, key_service.create_key_version(ring, 0))
    _expect(
        Reason.INVALID_ARGUMENT,
        key_service.generate_data_key(GenerateRequest(ring, BINDING, length=4)),
    )
    _expect(
        Reason.REQUEST_TOO_LARGE,
        key_service.generate_data_keys([GenerateRequest(ring, BINDING)] * 1001),
    )


def test_batch_reports_per_item_errors(key_service: KeyService, ring: str) -> None:
    run(key_service.create_key_version(ring, 1))
    good = run(key_service.generate_data_key(GenerateRequest(ring, BINDING)))
    results = run(
        key_service.rewrap_many(
            [
                RewrapRequest(good.envelope, BINDING),
                RewrapRequest(good.envelope, Binding("x", "y")),
                RewrapRequest(good.envelope, BINDING, to_version=7),
            ]
        )
    )
    assert isinstance(results[0], Envelope)
    assert isinstance(results[1], HsmError)
    assert results[1].reason is Reason.AAD_MISMATCH
    assert isinstance(results[2], HsmError)
    assert results[2].reason is Reason.VERSION_NOT_FOUND


def test_pkcs11_runs_only_in_the_worker_process(
    connection: HsmConnection, hsm_token: DevToken
) -> None:
    """The token session lives in the worker process; this process is not its PKCS#11 thread."""
    pid = connection.worker_pid
    assert pid is not None
    assert pid != os.getpid()
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(hsm_token.module.resolve()) in maps or hsm_token.module.name in maps
    assert not thread.on_thread()
    with pytest.raises(RuntimeError, match="PKCS#11 thread"):
        thread.assert_on_thread()


def test_token_fixture_keeps_pin_out_of_repr(hsm_token: DevToken) -> None:
    assert hsm_token.pin_file.read_text() not in repr(hsm_token)


def test_large_batches_go_in_chunks_and_keep_order_and_per_item_errors(
    key_service: KeyService, ring: str
) -> None:
    """A batch larger than a chunk is sent to the worker in several requests; the caller still
    gets one result per item, in order, with each item's own error."""
    run(key_service.create_key_version(ring, 1))
    count = 3 * CHUNK_ITEMS + 5
    bad = {0, CHUNK_ITEMS - 1, CHUNK_ITEMS, 2 * CHUNK_ITEMS + 3, count - 1}
    requests = [
        GenerateRequest(
            ring,
            Binding("team-a", f"key-{i}"),
            length=4 if i in bad else 16 + i % 3,
            include_plaintext=True,
        )
        for i in range(count)
    ]
    generated = run(key_service.generate_data_keys(requests))
    assert len(generated) == count
    for i, result in enumerate(generated):
        if i in bad:
            assert isinstance(result, HsmError)
            assert result.reason is Reason.INVALID_ARGUMENT
        else:
            assert isinstance(result, GeneratedKey)
            assert result.plaintext is not None
            assert len(result.plaintext) == 16 + i % 3
    keys = [r for r in generated if isinstance(r, GeneratedKey)]
    assert len({k.envelope.nonce for k in keys}) == len(keys)

    run(key_service.create_key_version(ring, 2))
    rewraps = [
        RewrapRequest(k.envelope, Binding("team-a", "other" if i % 40 == 7 else f"key-{j}"))
        for i, (j, k) in enumerate(
            (j, r) for j, r in enumerate(generated) if isinstance(r, GeneratedKey)
        )
    ]
    rewrapped = run(key_service.rewrap_many(rewraps))
    assert len(rewrapped) == len(rewraps)
    for i, (request, envelope) in enumerate(zip(rewraps, rewrapped, strict=True)):
        if i % 40 == 7:
            assert isinstance(envelope, HsmError)
            assert envelope.reason is Reason.AAD_MISMATCH
            continue
        assert isinstance(envelope, Envelope)
        assert envelope.key.version == 2
        plaintext = run(key_service.decrypt(envelope, request.binding))
        original = keys[i].plaintext
        assert plaintext == original


def test_concurrent_decrypts_are_coalesced_but_answered_one_by_one(
    key_service: KeyService, ring: str
) -> None:
    """Decrypts made together share one worker request; each caller gets its own plaintext or
    its own error, and a caller that gives up does not disturb the others."""
    run(key_service.create_key_version(ring, 1))
    run(key_service.create_key_version(ring, 2))
    keys = run(
        key_service.generate_data_keys(
            [
                GenerateRequest(ring, BINDING, version=1 + i % 2, include_plaintext=True)
                for i in range(40)
            ]
        )
    )
    assert all(isinstance(k, GeneratedKey) for k in keys)
    wrong = Binding("team-b", "db-key")

    async def all_at_once() -> list[bytes | BaseException]:
        calls = [
            key_service.decrypt(k.envelope, wrong if i % 5 == 3 else BINDING)  # type: ignore[union-attr]
            for i, k in enumerate(keys)
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0)  # every task has made its call: one is at the worker, 39 wait
        tasks[10].cancel()  # a caller that goes away
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = run(all_at_once())
    for i, (key, answer) in enumerate(zip(keys, answers, strict=True)):
        assert isinstance(key, GeneratedKey)
        if i == 10:
            assert isinstance(answer, asyncio.CancelledError)
        elif i % 5 == 3:
            assert isinstance(answer, HsmError)
            assert answer.reason is Reason.AAD_MISMATCH
        else:
            assert answer == key.plaintext

    run(key_service.set_version_state(ring, 2, VersionState.DISABLED))

    async def after_disable() -> list[bytes | BaseException]:
        return await asyncio.gather(
            *(key_service.decrypt(k.envelope, BINDING) for k in keys[:4]),  # type: ignore[union-attr]
            return_exceptions=True,
        )

    answers = run(after_disable())
    assert answers[0] == keys[0].plaintext  # type: ignore[union-attr]
    assert isinstance(answers[1], HsmError)
    assert answers[1].reason is Reason.VERSION_DISABLED
    assert answers[2] == keys[2].plaintext  # type: ignore[union-attr]
    assert isinstance(answers[3], HsmError)
    assert answers[3].reason is Reason.VERSION_DISABLED


def test_concurrent_kms_seals_are_coalesced_but_answered_one_by_one(
    key_service: KeyService, ring: str
) -> None:
    """KMS seeds sealed together share one worker request; each caller gets its own envelope
    (distinct nonces, bound to its version's key_id) or its own error."""
    run(key_service.create_key_version(ring, 1))
    run(key_service.create_key_version(ring, 2))
    seeds = [os.urandom(32) for _ in range(30)]

    async def all_at_once() -> list[Any]:
        calls = [
            key_service.seal_kms(ring if i % 7 != 4 else f"{ring}-none", None if i % 3 else 1, seed)
            for i, seed in enumerate(seeds)
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0)  # every task has made its call: one is at the worker, 29 wait
        tasks[11].cancel()  # a caller that goes away
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = run(all_at_once())
    nonces = set()
    for i, (seed, answer) in enumerate(zip(seeds, answers, strict=True)):
        if i == 11:
            assert isinstance(answer, asyncio.CancelledError)
            continue
        if i % 7 == 4:
            assert isinstance(answer, HsmError)
            assert answer.reason in (Reason.NO_PRIMARY_VERSION, Reason.VERSION_NOT_FOUND)
            continue
        envelope, info = answer
        assert info.ref.version == envelope.key.version == (2 if i % 3 else 1)
        nonces.add(envelope.nonce)
        key_id = info.ref.kms_key_id(info.fingerprint)
        assert run(key_service.decrypt(envelope, KmsBinding(key_id))) == seed
    assert len(nonces) == len([i for i in range(30) if i != 11 and i % 7 != 4])
