"""``kustody-kms``, the Go KMS v2 plugin (kms/), on a real token next to the Python sidecar.

What it must get right, each against the real thing:

* the same envelope, key_id, Status and errors as ``kustody hsm --kms-socket``, so either
  opens what the other sealed and they can replace each other on one token;
* it follows the KeyRing's lifecycle, which only the sidecar changes: a new version becomes
  the write version, a disabled one stops decrypting, no ENABLED version makes Status say so;
* a co-tenant of the partition who plants a key under a version's label gets it refused,
  exactly as the sidecar refuses it (KEY_NOT_TRUSTED), and a ciphertext forged with the
  planted key never decrypts;
* a wrong PIN is reported (not retried until the PIN file changes), a fixed one recovers;
  no PIN, seed or plaintext in its log or its argv.

The plugin draws GCM nonces from the token RNG and passes them in (``gcm-iv=caller``): the
layer's second run, on Kryoptic with token-generated IVs only, skips this module.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kustody.api._proto import kms_v2_pb2 as kms
from kustody.api._proto import kms_v2_pb2_grpc as kms_grpc
from kustody.api.client import HsmClient
from kustody.api.token import TokenConfig
from kustody.dev.kmsplugin import KmsPlugin
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import KmsBinding, associated_data
from kustody.domain.envelope import Envelope, header_for
from kustody.domain.keyversion import KeyVersionRef, VersionState

from .conftest import run, running_sidecar, softhsm2_only, start_process

pytestmark = pytest.mark.skipif(
    os.environ.get("KUSTODY_HSM_GCM_IV") == "token",
    reason="kustody-kms passes GCM nonces in (gcm-iv=caller); token-generated IVs need the "
    "Python plugin",
)

T = TypeVar("T")
COTENANT = Path(__file__).with_name("cotenant.py")
KNOWN = bytes(range(32))  # the planted key's value, known to the attacker (cotenant.py)


@asynccontextmanager
async def stub(socket: Path) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        yield kms_grpc.KeyManagementServiceStub(channel)  # type: ignore[no-untyped-call]


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    """(code, reason, message) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = info.value
    reason = str(dict(error.trailing_metadata() or ()).get("kustody-reason", ""))
    return error.code(), reason, error.details() or ""


async def eventually(check: Callable[[], Awaitable[T]], ok: Callable[[T], bool]) -> T:
    """``check()`` until ``ok`` holds (the plugin rescans every second here), at most 20 s."""
    deadline = time.monotonic() + 20
    while True:
        value = await check()
        if ok(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


def go_plugin(binary: Path, token: DevToken, ring: str, directory: Path, *extra: str) -> KmsPlugin:
    directory.mkdir(parents=True, exist_ok=True)
    return KmsPlugin(
        binary,
        token,
        ring,
        directory / "go-kms.sock",
        directory / "go-kms.log",
        ("--health-interval", "1s", *extra),
    ).start()


def test_the_go_and_python_plugins_open_each_others_ciphertexts_and_follow_the_lifecycle(
    tmp_path: Path,
    hsm_token: DevToken,
    token_config: TokenConfig,
    ring: str,
    kms_plugin_binary: Path,
) -> None:
    py_socket = tmp_path / "py-kms.sock"
    seeds = [os.urandom(32) for _ in range(4)]

    async def main(go: KmsPlugin) -> None:
        async with (
            running_sidecar(
                tmp_path, token_config, kms_socket=py_socket, kms_key_ring=ring,
                kms_create_if_missing=True,
            ) as sidecar,
            stub(py_socket) as py,
            stub(go.socket) as gp,
        ):  # fmt: skip
            assert oct(os.stat(go.socket).st_mode & 0o777) == "0o600"
            status = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz == "ok"
            )
            assert status.healthz == "ok", status.healthz
            assert status.version == "v2"
            assert status.key_id == (await py.Status(kms.StatusRequest())).key_id
            assert status.key_id.startswith(f"{ring}:v1:")

            # Sealed by one, opened by the other, both ways.
            by_py = await py.Encrypt(kms.EncryptRequest(plaintext=seeds[0], uid="a"))
            by_go = await gp.Encrypt(kms.EncryptRequest(plaintext=seeds[1], uid="b"))
            assert by_go.key_id == by_py.key_id == status.key_id
            assert seeds[1] not in by_go.ciphertext
            assert len(by_go.ciphertext) == len(by_py.ciphertext)
            assert Envelope.from_bytes(by_go.ciphertext).key == KeyVersionRef(ring, 1)
            opened = await gp.Decrypt(
                kms.DecryptRequest(ciphertext=by_py.ciphertext, key_id=by_py.key_id, uid="c")
            )
            assert opened.plaintext == seeds[0]
            opened = await py.Decrypt(
                kms.DecryptRequest(ciphertext=by_go.ciphertext, key_id=by_go.key_id)
            )
            assert opened.plaintext == seeds[1]

            # The same refusals, with the same codes and reasons.
            for plugin in (py, gp):
                wrong_id = kms.DecryptRequest(
                    ciphertext=by_go.ciphertext, key_id=by_go.key_id + "x"
                )
                code, reason, _ = await refused(plugin.Decrypt(wrong_id))
                assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "AAD_MISMATCH")
                junk = kms.DecryptRequest(ciphertext=b"junk", key_id=by_go.key_id)
                code, reason, message = await refused(plugin.Decrypt(junk))
                assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_ENVELOPE")
                assert message == "not a Kustody envelope (bad magic)"
                other = Envelope.from_bytes(by_go.ciphertext)
                foreign = Envelope(KeyVersionRef("other-ring", 1), other.nonce, other.ciphertext)
                code, reason, message = await refused(
                    plugin.Decrypt(
                        kms.DecryptRequest(ciphertext=foreign.to_bytes(), key_id=by_go.key_id)
                    )
                )
                assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
                assert message == f"this KMS plugin serves KeyRing {ring}, not other-ring"
                code, reason, _ = await refused(plugin.Encrypt(kms.EncryptRequest(plaintext=b"")))
                assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
                too_big = kms.EncryptRequest(plaintext=bytes(4097))
                code, reason, _ = await refused(plugin.Encrypt(too_big))
                assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE")

            # Rotation by the sidecar: the Go plugin's write version follows.
            await sidecar.service.create_key_version(ring, 2)
            rotated = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: ":v2:" in s.key_id
            )
            assert rotated.key_id == (await py.Status(kms.StatusRequest())).key_id
            assert rotated.key_id.startswith(f"{ring}:v2:")
            resealed = await gp.Encrypt(kms.EncryptRequest(plaintext=seeds[2]))
            assert resealed.key_id == rotated.key_id
            assert Envelope.from_bytes(resealed.ciphertext).key.version == 2
            for sealed, seed in ((by_py, seeds[0]), (by_go, seeds[1]), (resealed, seeds[2])):
                request = kms.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id)
                assert (await gp.Decrypt(request)).plaintext == seed
                assert (await py.Decrypt(request)).plaintext == seed

            # v1 disabled by the sidecar: its ciphertexts stop decrypting in the Go plugin too.
            await sidecar.service.set_version_state(ring, 1, VersionState.DISABLED)
            old = kms.DecryptRequest(ciphertext=by_go.ciphertext, key_id=by_go.key_id)

            async def try_old() -> tuple[grpc.StatusCode, str, str] | None:
                try:
                    await gp.Decrypt(old)
                except grpc.aio.AioRpcError as error:
                    meta = dict(error.trailing_metadata() or ())
                    return error.code(), str(meta.get("kustody-reason")), error.details() or ""
                return None

            outcome = await eventually(try_old, lambda o: o is not None)
            assert outcome is not None
            assert outcome[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_DISABLED")
            assert f"{ring}/v1" in outcome[2]

            # No ENABLED version left: Status says why, Encrypt refuses.
            await sidecar.service.set_version_state(ring, 2, VersionState.DISABLED)
            unhealthy = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz != "ok"
            )
            assert unhealthy.healthz.startswith("NO_PRIMARY_VERSION: "), unhealthy.healthz
            code, reason, _ = await refused(gp.Encrypt(kms.EncryptRequest(plaintext=seeds[3])))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PRIMARY_VERSION")
            assert unhealthy.healthz == (await py.Status(kms.StatusRequest())).healthz

            # v1 destroyed by the sidecar: both refuse its ciphertexts alike.
            await sidecar.service.set_version_state(ring, 1, VersionState.DESTROY_SCHEDULED)
            await sidecar.service.destroy_version(ring, 1)

            async def destroyed() -> tuple[grpc.StatusCode, str, str] | None:
                outcome = await try_old()
                return outcome if outcome and outcome[1] == "VERSION_DESTROYED" else None

            go_says = await eventually(destroyed, lambda o: o is not None)
            py_says = await refused(py.Decrypt(old))
            assert go_says == py_says, (go_says, py_says)
            assert go_says[0] is grpc.StatusCode.FAILED_PRECONDITION

    go = go_plugin(kms_plugin_binary, hsm_token, ring, tmp_path / "go")
    try:
        assert go.process is not None
        cmdline = Path(f"/proc/{go.process.pid}/cmdline").read_bytes()
        run(main(go))
    finally:
        log = go.stop()
    pin = hsm_token.pin_file.read_text().strip()
    assert pin.encode() not in cmdline
    assert pin not in log
    for seed in seeds:
        assert seed.hex() not in log
    assert f"serving KMS v2 for KeyRing {ring}" in log


def test_a_pinned_version_that_does_not_exist_reads_the_same_in_both_plugins(
    tmp_path: Path,
    hsm_token: DevToken,
    token_config: TokenConfig,
    ring: str,
    kms_plugin_binary: Path,
) -> None:
    py_socket = tmp_path / "py-kms.sock"

    async def main(go: KmsPlugin) -> None:
        async with (
            running_sidecar(
                tmp_path, token_config, kms_socket=py_socket, kms_key_ring=ring,
                kms_version=3, kms_create_if_missing=True,
            ),
            stub(py_socket) as py,
            stub(go.socket) as gp,
        ):  # fmt: skip
            go_status = await eventually(
                lambda: gp.Status(kms.StatusRequest()),
                lambda s: s.healthz.startswith("VERSION_NOT_FOUND"),
            )
            py_status = await py.Status(kms.StatusRequest())
            assert go_status.healthz == py_status.healthz, (go_status, py_status)
            assert go_status.healthz == f"VERSION_NOT_FOUND: KEK version {ring}/v3 does not exist"
            assert go_status.key_id == py_status.key_id == ""
            for plugin in (py, gp):
                code, reason, _ = await refused(plugin.Encrypt(kms.EncryptRequest(plaintext=b"k")))
                assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")

    go = go_plugin(kms_plugin_binary, hsm_token, ring, tmp_path / "go", "--kms-version", "3")
    try:
        run(main(go))
    finally:
        go.stop()


def token_with_version_1(tmp_path: Path, label: str, ring: str) -> DevToken:
    """A token of its own whose KeyRing ``ring`` has version 1, created by the sidecar (as a
    subprocess, stopped again: the Go plugin then serves the token alone)."""
    token = create_token(tmp_path / "token", label)
    sidecar = start_process(tmp_path, token)

    async def create() -> None:
        async with HsmClient.unix(sidecar.socket) as hsm:
            await hsm.create_key_version(ring, 1)

    try:
        run(create())
    finally:
        sidecar.stop()
    return token


def _cotenant(token: DevToken, action: str, ref: KeyVersionRef) -> None:
    subprocess.run(
        [
            sys.executable, str(COTENANT), str(token.module), token.label, str(token.pin_file),
            action, ref.key_ring, str(ref.version),
        ],
        env={**os.environ, **token.env}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def _forged(ref: KeyVersionRef, key_id: str, plaintext: bytes) -> bytes:
    """A KMS ciphertext the attacker made offline with the key value it planted."""
    nonce = bytes(12)
    aad = associated_data(header_for(ref), KmsBinding(key_id))
    return Envelope(ref, nonce, AESGCM(KNOWN).encrypt(nonce, plaintext, aad)).to_bytes()


def test_a_co_tenants_planted_key_is_refused_and_forged_ciphertexts_never_open(
    tmp_path: Path, kms_plugin_binary: Path
) -> None:
    """Another user of the partition (same token, same user PIN) plants an AES key whose value
    it knows under the label of the version a rotation would create next, while the Go
    plugin serves. The plugin must not make it the write version, nor decrypt with it."""
    token = token_with_version_1(tmp_path, "cotenant-go", "pay")
    v2 = KeyVersionRef("pay", 2)
    seed = os.urandom(32)

    async def main(go: KmsPlugin) -> None:
        async with stub(go.socket) as gp:
            status = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz == "ok"
            )
            assert status.key_id.startswith("pay:v1:")
            good = await gp.Encrypt(kms.EncryptRequest(plaintext=seed))

            _cotenant(token, "known-value", v2)
            status = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz != "ok"
            )
            assert status.healthz.startswith("KEY_NOT_TRUSTED: "), status.healthz
            assert "pay/v2" in status.healthz
            assert "CKA_LOCAL is false" in status.healthz
            assert KNOWN.hex() not in status.healthz
            code, reason, _ = await refused(gp.Encrypt(kms.EncryptRequest(plaintext=seed)))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KEY_NOT_TRUSTED")
            forged_id = f"pay:v2:{status.key_id.rsplit(':', 1)[-1]}"
            for key_id in (forged_id, good.key_id, "pay:v2:000000"):
                forged = _forged(v2, key_id, b"attacker-chosen seed")
                code, reason, _ = await refused(
                    gp.Decrypt(kms.DecryptRequest(ciphertext=forged, key_id=key_id))
                )
                assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KEY_NOT_TRUSTED")
            # The trusted version keeps decrypting what it sealed.
            request = kms.DecryptRequest(ciphertext=good.ciphertext, key_id=good.key_id)
            assert (await gp.Decrypt(request)).plaintext == seed

    go = go_plugin(kms_plugin_binary, token, "pay", tmp_path / "go")
    try:
        run(main(go))
    finally:
        log = go.stop()
    assert KNOWN.hex() not in log
    assert seed.hex() not in log
    assert "KEY_NOT_TRUSTED: refusing to use the token object for pay/v2: CKA_LOCAL is false" in log


def test_a_wrong_pin_is_reported_not_retried_and_a_fixed_one_recovers(
    tmp_path: Path, kms_plugin_binary: Path
) -> None:
    token = token_with_version_1(tmp_path, "pin-go", "pins")
    right = token.pin_file.read_text()
    wrong = "0000-not-the-pin"
    pin_file = tmp_path / "pin"
    pin_file.write_text(wrong + "\n")
    pin_file.chmod(0o600)
    plugin = KmsPlugin(
        kms_plugin_binary,
        token,
        "pins",
        tmp_path / "go" / "kms.sock",
        tmp_path / "go.log",
        ("--health-interval", "1s", "--pin-file", str(pin_file)),
    ).start()

    async def main() -> None:
        async with stub(plugin.socket) as gp:
            status = await eventually(
                lambda: gp.Status(kms.StatusRequest()),
                lambda s: s.healthz.startswith("PIN_INCORRECT"),
            )
            assert status.healthz.startswith("PIN_INCORRECT: "), status.healthz
            code, reason, _ = await refused(gp.Encrypt(kms.EncryptRequest(plaintext=b"x" * 32)))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "TOKEN_UNAVAILABLE")
            await asyncio.sleep(2.5)  # two more health passes with the same, refused PIN
            again = await gp.Status(kms.StatusRequest())
            assert "not tried again until that file changes" in again.healthz, again.healthz
            pin_file.write_text(right)
            status = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz == "ok"
            )
            assert status.healthz == "ok", status.healthz
            assert status.key_id.startswith("pins:v1:")

    try:
        run(main())
    finally:
        log = plugin.stop()
    assert wrong not in log
    assert right.strip() not in log
    # One refused login, not one per health pass.
    assert log.count("PIN_INCORRECT: login to token") == 1, log
    assert json.dumps(right.strip()) not in log


@softhsm2_only("moves the token's directory away and back")
def test_the_token_lost_and_back_no_call_hangs_and_metrics_say_so(
    tmp_path: Path, kms_plugin_binary: Path
) -> None:
    """The token disappears under load: Status says so, no call hangs, the plugin reopens it
    when it is back, and /metrics counted it all. SIGTERM then stops the plugin cleanly."""
    token = token_with_version_1(tmp_path, "lost-go", "lost")
    go = go_plugin(
        kms_plugin_binary, token, "lost", tmp_path / "go", "--metrics-address", "127.0.0.1:0"
    )
    seed = os.urandom(32)
    middle: list[str] = []  # the outcomes while the token is away

    async def hammer(gp: Any, calls: int) -> list[str]:
        """``calls`` concurrent Encrypts; each outcome's reason ("" for ok), none may hang."""

        async def one() -> str:
            try:
                await gp.Encrypt(kms.EncryptRequest(plaintext=seed), timeout=10)
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    return "HUNG"
                return str(dict(error.trailing_metadata() or ()).get("kustody-reason", ""))
            return ""

        return list(await asyncio.gather(*(one() for _ in range(calls))))

    async def main() -> None:
        async with stub(go.socket) as gp:
            await eventually(lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz == "ok")
            good = await gp.Encrypt(kms.EncryptRequest(plaintext=seed))
            assert await hammer(gp, 32) == [""] * 32
            tokens = token.directory / "tokens"
            parked = tmp_path / "parked"
            shutil.move(tokens, parked)
            try:
                lost = await eventually(
                    lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz != "ok"
                )
                reason = lost.healthz.split(":", 1)[0]
                assert reason in {"TOKEN_LOST", "TOKEN_NOT_FOUND", "TOKEN_UNAVAILABLE"}, lost
                assert lost.key_id == good.key_id  # the last key_id, as the sidecar keeps it
                middle.extend(await hammer(gp, 32))
                assert set(middle) <= {"TOKEN_UNAVAILABLE", ""}, middle
                assert "TOKEN_UNAVAILABLE" in middle
            finally:
                shutil.move(parked, tokens)
            back = await eventually(
                lambda: gp.Status(kms.StatusRequest()), lambda s: s.healthz == "ok"
            )
            assert back.healthz == "ok", back.healthz
            assert await hammer(gp, 32) == [""] * 32
            request = kms.DecryptRequest(ciphertext=good.ciphertext, key_id=good.key_id)
            assert (await gp.Decrypt(request)).plaintext == seed

    try:
        run(main())
        address = re.search(r"metrics on http://(\S+)/metrics", go.log.read_text())
        assert address is not None
        with urllib.request.urlopen(f"http://{address[1]}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
    finally:
        log = go.stop()
    assert go.process is not None
    assert go.process.returncode == 0, log  # SIGTERM: stopped, not killed
    ok = 1 + 32 + middle.count("") + 32
    refused = middle.count("TOKEN_UNAVAILABLE")
    assert f'kustody_hsm_requests_total{{op="kms.Encrypt",outcome="ok"}} {ok}' in metrics
    assert (
        f'kustody_hsm_requests_total{{op="kms.Encrypt",outcome="TOKEN_UNAVAILABLE"}} {refused}'
        in metrics
    )
    assert "kustody_hsm_token_up 1" in metrics
    assert 'kustody_hsm_key_versions{keyring="lost",state="ENABLED"} 1' in metrics
    assert seed.hex() not in metrics + log
