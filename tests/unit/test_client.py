"""The workload client (kustody.client): Secret dir, retries, cache, tmpfs check, no heavy
imports. The real calls against a sidecar are in tests/cluster/test_unwrap.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kustody.client import UnwrapClient, UnwrapError, read_secret_dir
from kustody.client.commands import main, output_path, write_private
from kustody.client.memoryfs import filesystem_type, is_memory_backed
from kustody.client.unwrapper import Unwrapped

MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
25 22 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
40 22 0:30 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~empty-dir/keys rw - tmpfs tmpfs rw
41 22 8:1 /d /mnt/with\\040space rw - ext4 /dev/sda1 rw
42 41 0:31 / /mnt/with\\040space/mem rw - ramfs ramfs rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", "ext4"),
        ("/dev/shm/kustody", "tmpfs"),
        ("/dev/shmx", "ext4"),
        ("/var/lib/kubelet/pods/x/volumes/kubernetes.io~empty-dir/keys", "tmpfs"),
        ("/mnt/with space/a", "ext4"),
        ("/mnt/with space/mem/a", "ramfs"),
    ],
)
def test_filesystem_type_uses_the_longest_mount_point(path: str, kind: str) -> None:
    assert filesystem_type(path, MOUNTINFO) == kind


def test_memory_backed_on_this_machine(tmp_path: Path) -> None:
    if Path("/dev/shm").is_dir():
        assert is_memory_backed("/dev/shm")
    assert not is_memory_backed(tmp_path, mountinfo=tmp_path / "missing")


def test_write_private_is_atomic_and_0400(tmp_path: Path) -> None:
    target = tmp_path / "dek"
    write_private(target, b"k" * 32)
    write_private(target, b"j" * 32)  # replaces a read-only file
    assert target.read_bytes() == b"j" * 32
    assert target.stat().st_mode & 0o777 == 0o400
    assert os.listdir(tmp_path) == ["dek"]


def test_out_resolves_its_directory_and_refuses_a_final_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    # A symlinked directory: the file is written in (and checked as) the real directory.
    assert output_path(tmp_path / "via" / "dek") == real / "dek"
    # A symlink as the file itself: refused, whether or not its target exists.
    (tmp_path / "link").symlink_to(real / "elsewhere")
    with pytest.raises(ValueError, match="symbolic link"):
        output_path(tmp_path / "link")
    (real / "elsewhere").write_bytes(b"")
    with pytest.raises(ValueError, match="symbolic link"):
        output_path(tmp_path / "via" / ".." / "link")
    with pytest.raises(ValueError, match="not a directory"):
        output_path(tmp_path / "missing" / "dek")
    # write_private never writes through (nor replaces) a final symlink either.
    with pytest.raises(OSError, match="symbolic link"):
        write_private(tmp_path / "link", b"k" * 32)
    assert (tmp_path / "link").is_symlink()
    assert (real / "elsewhere").read_bytes() == b""


def test_a_symlink_into_dev_shm_does_not_put_the_key_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reported hole: ``--out`` a link on disk pointing into /dev/shm passed the tmpfs
    check (it looked at the target's directory) and the rename replaced the link on disk."""
    shm = Path("/dev/shm")
    if not is_memory_backed(shm):
        pytest.skip("/dev/shm is not a tmpfs here")
    if is_memory_backed(tmp_path):
        pytest.skip(f"{tmp_path} is itself memory-backed")
    target = shm / f"kustody-unit-{os.getpid()}"
    link = tmp_path / "dek"
    link.symlink_to(target)
    secrets_dir = tmp_path / "secret"
    secrets_dir.mkdir()
    code = main(["--secret-dir", str(secret_dir(secrets_dir)), "--out", str(link),
                 "--endpoint", "127.0.0.1:9", "--attempts", "1"])  # fmt: skip
    assert code == 1
    assert "is a symbolic link" in capsys.readouterr().err  # refused before any call
    assert link.is_symlink()  # untouched: nothing written on disk
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dek", "secret"]


def secret_dir(tmp_path: Path, **override: str) -> Path:
    files = {
        "wrapped-key": "kustody:v1:AAAA",
        "encryption-context": json.dumps(
            {"keyRing": "p", "namespace": "shop", "dataKey": "orders", "encryptionContext": {}}
        ),
        **override,
    }
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    return tmp_path


def test_secret_dir_is_read_strictly(tmp_path: Path) -> None:
    key = read_secret_dir(secret_dir(tmp_path))
    assert (key.key_ring, key.namespace, key.data_key) == ("p", "shop", "orders")
    bad = secret_dir(tmp_path, **{"encryption-context": '{"keyRing": 1}'})
    with pytest.raises(UnwrapError) as err:
        read_secret_dir(bad)
    assert err.value.reason == "SECRET_UNREADABLE"


class Scripted(UnwrapClient):
    """A client whose calls return or raise what the test says (no network)."""

    def __init__(self, outcomes: list[Any], **kwargs: Any) -> None:
        self.sleeps: list[float] = []
        super().__init__("x:1", sleep=self.sleeps.append, **kwargs)
        self.outcomes = outcomes
        self.calls = 0

    def _once(self, request: Any) -> Unwrapped:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return Unwrapped(outcome, 1)


def test_retries_back_off_on_transient_errors_only(tmp_path: Path) -> None:
    directory = secret_dir(tmp_path)
    busy = UnwrapError("RATE_LIMITED", "slow down", retryable=True)
    client = Scripted([busy, busy, b"k" * 32], backoff=0.1)
    assert client.unwrap(directory) == b"k" * 32
    assert client.calls == 3
    assert 0.05 <= client.sleeps[0] <= 0.1 and 0.1 <= client.sleeps[1] <= 0.2  # noqa: PT018

    refused = Scripted([UnwrapError("NOT_A_CONSUMER", "no")])
    with pytest.raises(UnwrapError):
        refused.unwrap(directory)
    assert refused.calls == 1
    assert refused.sleeps == []


def test_cache_is_keyed_by_the_envelope_and_expires(tmp_path: Path) -> None:
    now = [0.0]
    client = Scripted([b"a" * 32, b"b" * 32, b"c" * 32], cache_ttl=10, clock=lambda: now[0])
    directory = secret_dir(tmp_path)
    assert client.unwrap(directory) == b"a" * 32
    assert client.unwrap(directory) == b"a" * 32
    secret_dir(tmp_path, **{"wrapped-key": "kustody:v1:BBBB"})  # rewrapped: a new envelope
    assert client.unwrap(directory) == b"b" * 32
    now[0] += 11
    assert client.unwrap(directory) == b"c" * 32
    assert client.calls == 3


def test_the_client_imports_no_operator_dependencies() -> None:
    code = (
        "import sys, kustody.client, kustody.client.commands\n"
        "heavy = {'kopf', 'kubernetes', 'pkcs11', 'cryptography', 'prometheus_client', 'yaml'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
        "assert not [m for m in sys.modules if m.startswith('kustody.') and "
        "not m.startswith('kustody.client')], 'other kustody modules'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
