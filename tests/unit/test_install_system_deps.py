"""tools/install-system-deps.sh tells a non-root user what to run instead of failing obscurely."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_non_root_without_softhsm_gets_the_install_command(repo: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with no softhsm2-util in it
    bin_dir.mkdir()
    bin_dir.chmod(0o755)
    tmp_path.chmod(0o755)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    result = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash", "-s"],
        input=(repo / "tools" / "install-system-deps.sh").read_text(),
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "SoftHSM2 is missing" in result.stderr
    assert "apt-get install -y softhsm2" in result.stderr
