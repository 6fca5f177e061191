"""The PKCS#11 worker process: it alone holds the token, dies with the sidecar, and a crash of it
is reported, fails in-flight requests fast and typed, and is repaired by a restart.

These run the real `kustody hsm` process (its worker is its child) on a token of their own.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kustody.api import wire
from kustody.api.client import GenerateItem, HsmClient
from kustody.api.errors import HsmError, Reason
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import Binding
from kustody.sidecar.connection import HsmConnection
from kustody.sidecar.keyservice import GenerateRequest, KeyService

from .conftest import SidecarProcess, run, start_process

BINDING = Binding("shop", "db-key", {"app": "db"})


@pytest.fixture
def own_token(tmp_path: Path) -> DevToken:
    return create_token(tmp_path / "token", "worker-test")


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _worker_of(proc: SidecarProcess, within: float = 15) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for child in _children(proc.process.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"kustody.pkcs11.worker" in cmdline and _alive(child):
                return child
        time.sleep(0.05)
    raise AssertionError(f"no worker process under {proc.process.pid}:\n{proc.log.read_text()}")


def _wait_gone(pid: int, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} is still {_state(pid)}")
        time.sleep(0.05)


def test_only_the_worker_loads_the_module_and_it_gets_the_pin_path_not_the_pin(
    tmp_path: Path, own_token: DevToken
) -> None:
    proc = start_process(tmp_path, own_token)
    try:
        worker = _worker_of(proc)
        module = own_token.module.name
        assert module in Path(f"/proc/{worker}/maps").read_text()
        assert module not in Path(f"/proc/{proc.process.pid}/maps").read_text()
        pin = own_token.pin_file.read_text().strip().encode()
        cmdline = Path(f"/proc/{worker}/cmdline").read_bytes()
        assert b"--pin-file" in cmdline
        assert pin not in cmdline
        assert pin not in Path(f"/proc/{worker}/environ").read_bytes()
    finally:
        proc.stop()


def test_worker_crash_is_reported_fails_fast_and_is_repaired(
    tmp_path: Path, own_token: DevToken
) -> None:
    proc = start_process(tmp_path, own_token)

    async def main() -> tuple[int, int]:
        async with HsmClient.unix(proc.socket) as hsm:
            await hsm.create_key_version("r", 1)
            before = await hsm.generate_data_key("r", BINDING)
            worker = _worker_of(proc)

            # Keep the worker busy with batches in flight, then kill it under them.
            items = [GenerateItem("r", BINDING)] * 1000
            batches = [asyncio.create_task(hsm.batch_generate_data_keys(items)) for _ in range(30)]
            await asyncio.sleep(0.15)
            os.kill(worker, signal.SIGKILL)
            started = time.monotonic()
            done, pending = await asyncio.wait(batches, timeout=10)
            assert not pending, "in-flight requests hung after the worker died"
            assert time.monotonic() - started < 10
            failures = [t.exception() for t in done if t.exception() is not None]
            assert failures, "no request was in flight when the worker died"
            for failure in failures:
                assert isinstance(failure, HsmError)
                assert failure.reason is Reason.TOKEN_UNAVAILABLE, failure
                assert "worker" in failure.message

            # Health says why (until the new worker is logged in), then serves again.
            health = await hsm.health()
            if not health.serving:
                assert health.reason in {"WORKER_LOST", "TOKEN_UNAVAILABLE"}, health
            deadline = time.monotonic() + 20
            while not (health := await hsm.health()).serving:
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.1)
            replacement = _worker_of(proc)
            assert replacement != worker
            assert await hsm.rewrap(before.wrapped, BINDING)
            assert (await hsm.describe_key("r")).versions[0].ref.version == 1
            return worker, replacement

    try:
        killed, replacement = run(main())
    finally:
        log = proc.stop()
    assert f"worker process {killed} died (killed by SIGKILL)" in log
    _wait_gone(replacement)  # stopping the sidecar stopped its worker
    assert _state(killed) is None  # reaped by the sidecar, not left a zombie


def test_health_names_the_dead_worker(tmp_path: Path, own_token: DevToken) -> None:
    proc = start_process(tmp_path, own_token)

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            assert (await hsm.health()).serving
            worker = _worker_of(proc)
            proc.process.send_signal(signal.SIGSTOP)  # hold the sidecar so the restart waits
            try:
                os.kill(worker, signal.SIGKILL)
                _wait_gone(worker)
            finally:
                proc.process.send_signal(signal.SIGCONT)
            health = await hsm.health()
            assert not health.serving
            assert health.reason == "WORKER_LOST"
            assert "SIGKILL" in health.message
            with pytest.raises(HsmError) as info:
                await hsm.generate_data_key("r", BINDING)
            assert info.value.reason is Reason.TOKEN_UNAVAILABLE

    try:
        run(main())
    finally:
        proc.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_orphan_worker_after_the_sidecar_exits(
    tmp_path: Path, own_token: DevToken, sig: signal.Signals
) -> None:
    proc = start_process(tmp_path, own_token)
    try:
        worker = _worker_of(proc)
        proc.process.send_signal(sig)
        proc.process.wait(timeout=15)
        _wait_gone(worker)
    finally:
        proc.stop()


# -- issue 9: the worker holds the PIN and plaintext DEKs: no core dumps, not dumpable --------


def _wait_serving(proc: SidecarProcess) -> None:
    """Until the worker has answered (so it has run past its start-up hardening)."""

    async def serving() -> bool:
        async with HsmClient.unix(proc.socket, timeout=2) as hsm:
            return (await hsm.health()).serving

    deadline = time.monotonic() + 20
    while not run(serving()):
        assert time.monotonic() < deadline, proc.log.read_text()
        time.sleep(0.1)


def _core_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def _allow_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def test_the_worker_writes_no_core_dumps(tmp_path: Path, own_token: DevToken) -> None:
    """Even when the sidecar is started with core dumps allowed, its worker has none."""
    proc = start_process(tmp_path, own_token, preexec_fn=_allow_core_dumps)
    try:
        _wait_serving(proc)
        worker = _worker_of(proc)
        assert _core_limits(proc.process.pid) == ("unlimited", "unlimited")
        assert _core_limits(worker) == ("0", "0")
    finally:
        proc.stop()


WITHOUT_CAP_SYS_PTRACE = ("setpriv", "--bounding-set=-sys_ptrace")


def _can_open_memory(pid: int) -> bool:
    """Whether a process of the same uid and capabilities, but without CAP_SYS_PTRACE, may
    open ``/proc/<pid>/mem`` (the kernel's ptrace access check: allowed for a dumpable
    process of the same uid, refused for a non-dumpable one)."""
    probe = (
        "import os, sys\n"
        "try:\n"
        f"    os.close(os.open('/proc/{pid}/mem', os.O_RDONLY))\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
    )
    result = subprocess.run(
        [*WITHOUT_CAP_SYS_PTRACE, sys.executable, "-c", probe],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode in (0, 13), result.stderr
    return result.returncode == 0


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_the_worker_is_not_dumpable(tmp_path: Path, own_token: DevToken) -> None:
    """The sidecar and a would-be reader run with the same uid and the same capabilities
    (no CAP_SYS_PTRACE): the reader may open the front end's memory but not the worker's,
    which set PR_SET_DUMPABLE 0."""
    proc = start_process(tmp_path, own_token, prefix=WITHOUT_CAP_SYS_PTRACE)
    try:
        _wait_serving(proc)
        worker = _worker_of(proc)
        assert _can_open_memory(proc.process.pid)  # the same check passes for the front end
        assert not _can_open_memory(worker)
    finally:
        proc.stop()


# -- issue 9: the frame limit between front end and worker is enforced ------------------------


def test_frames_over_the_limit_are_typed_errors_and_the_stream_stays_in_step(
    connection: HsmConnection, key_service: KeyService, ring: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(key_service.create_key_version(ring, 1))
    monkeypatch.setattr(wire, "MAX_BODY_BYTES", 4096)
    # A request over the limit is refused before anything is sent.
    with pytest.raises(HsmError) as info:
        run(key_service.seal_kms(ring, None, b"s" * 4096))
    assert info.value.reason is Reason.REQUEST_TOO_LARGE
    assert "4096-byte frame limit" in info.value.message
    # An answer over the limit (8 DEKs of 512 bytes with their plaintext) fails its request...
    big = [GenerateRequest(ring, BINDING, length=512, include_plaintext=True)] * 8
    with pytest.raises(HsmError) as info:
        run(key_service.generate_data_keys(big))
    assert info.value.reason is Reason.REQUEST_TOO_LARGE
    # ... and the next requests on the same worker are answered correctly.
    generated = run(key_service.generate_data_key(GenerateRequest(ring, BINDING)))
    assert run(key_service.decrypt(generated.envelope, BINDING))
    assert [v.ref.version for v in run(key_service.describe_key(ring)).versions] == [1]
    monkeypatch.undo()
    assert len(run(key_service.generate_data_keys(big))) == 8


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


def test_the_worker_answers_an_oversized_frame_with_a_typed_error_and_stops(
    own_token: DevToken,
) -> None:
    """A header announcing more than MAX_BODY_BYTES: the worker does not try to read it (no
    hang, no 4 GiB buffer) but answers that request REQUEST_TOO_LARGE and exits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [
        sys.executable, "-m", "kustody.pkcs11.worker", "--fd", str(theirs.fileno()),
        "--parent", str(os.getpid()), "--module", str(own_token.module),
        "--label", own_token.label, "--pin-file", str(own_token.pin_file),
    ]  # fmt: skip
    worker = subprocess.Popen(
        command, pass_fds=(theirs.fileno(),), env={**os.environ, **own_token.env}
    )
    theirs.close()
    try:
        ours.settimeout(20)
        ours.sendall(wire.HEADER.pack(wire.MAX_BODY_BYTES + 1, 7, wire.Op.CHECK) + b"x" * 4096)
        size, request_id, status = wire.HEADER.unpack(_recv_exactly(ours, wire.HEADER_BYTES))
        result, _, _ = wire.load(_recv_exactly(ours, size))
        assert (request_id, status) == (7, wire.STATUS_ERROR)
        assert result[0] == "REQUEST_TOO_LARGE"
        assert ours.recv(1) == b""  # it stopped: its stream cannot be trusted any more
        assert worker.wait(timeout=10) == 0
    finally:
        ours.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
