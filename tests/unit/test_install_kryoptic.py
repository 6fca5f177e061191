"""tools/install-kryoptic.sh: cached builds are reused, and it can be skipped or located."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = "tools/install-kryoptic.sh"


def _run(repo: Path, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(repo / SCRIPT), *args],
        env={"PATH": os.environ["PATH"], "HOME": str(cache), "XDG_CACHE_HOME": str(cache), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_print_module_names_the_cache_path(repo: Path, tmp_path: Path) -> None:
    result = _run(repo, tmp_path, "--print-module")
    assert result.returncode == 0
    assert result.stdout.strip() == str(
        tmp_path / "kustody" / "kryoptic" / "1.5.4" / "libkryoptic_pkcs11.so"
    )


def test_a_cached_module_is_not_rebuilt(repo: Path, tmp_path: Path) -> None:
    module = Path(_run(repo, tmp_path, "--print-module").stdout.strip())
    module.parent.mkdir(parents=True)
    module.write_bytes(b"cached")
    result = _run(repo, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert module.read_bytes() == b"cached"


def test_skip_says_so_and_builds_nothing(repo: Path, tmp_path: Path) -> None:
    result = _run(repo, tmp_path, KUSTODY_SKIP_KRYOPTIC="1")
    assert result.returncode == 0
    assert "not building Kryoptic" in result.stderr
    assert not (tmp_path / "kustody").exists()
