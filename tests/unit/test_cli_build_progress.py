"""``kustody dev build`` says how long it will take, then reports each binary with its time.

A fake ``go`` on PATH stands in for the compiler (the real build takes minutes and is
exercised by every cluster test run on a fresh machine)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from kustody.dev import binaries

FAKE_GO = """#!/bin/sh
if [ "$1" = env ]; then echo go1.26.1; exit 0; fi
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out="$2"; fi
  shift
done
sleep 0.3
printf '#!/bin/sh\\necho v1.36.3 v3.6.8 v3.22.0\\n' > "$out"
chmod +x "$out"
"""


@pytest.fixture
def fake_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "gobin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    go.write_text(FAKE_GO)
    go.chmod(go.stat().st_mode | stat.S_IEXEC)
    tools = tmp_path / "tools"
    for module in ("controlplane", "etcd", "helm"):
        (tools / module).mkdir(parents=True)
        (tools / module / "go.mod").write_text(f"module {module}\n")
        (tools / module / "go.sum").write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KUSTODY_TOOLS_DIR", str(tools))
    monkeypatch.setenv("KUSTODY_BIN_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(binaries, "_HEARTBEAT", 0.1)
    return tmp_path / "cache"


def test_build_estimates_first_then_reports_each_binary(fake_toolchain: Path) -> None:
    lines: list[str] = []
    built = binaries.build(log=lines.append)
    assert built.directory == fake_toolchain
    assert lines[0].startswith("building kube-apiserver, kube-controller-manager, kubectl, etcd")
    assert "a cold build takes about 8-20 minutes on 2 cores" in lines[1]
    names = [t.name for t in binaries.TARGETS]
    for index, name in enumerate(names, 1):
        step = f"[{index}/{len(names)}] {name}"
        assert any(line.strip().startswith(f"{step}: go build") for line in lines), lines
        assert any(line.strip().startswith(f"{step}: built in") for line in lines), lines
    assert any("still building" in line for line in lines), "no heartbeat while building"
    assert lines[-1].startswith("built 5 binaries in ")
    assert binaries.stale_targets(fake_toolchain) == []

    again: list[str] = []
    binaries.build(log=again.append)
    assert again == []  # cached: nothing to say


def test_estimate_covers_only_what_is_stale() -> None:
    assert "about 1-3 minutes" in binaries.estimate(["helm"])
    assert "about 6-15 minutes" in binaries.estimate(["kubectl", "kube-apiserver"])
