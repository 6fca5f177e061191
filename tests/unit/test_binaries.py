"""The binary cache: version checks and the messages that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kustody.dev import binaries
from kustody.errors import UserError


def _fake_cache(directory: Path, version: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = {}
    for target in binaries.TARGETS:
        (directory / target.name).write_text("#!/bin/sh\n")
        stamp[target.name] = {"version": version, "modules": "x"}
    (directory / "stamp.json").write_text(json.dumps(stamp))


def test_cache_from_another_version_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUSTODY_BIN_DIR", str(tmp_path))
    _fake_cache(tmp_path, "v1.30.0")
    with pytest.raises(UserError, match=r"built for v1\.30\.0.*kustody dev build"):
        binaries.require_binaries()


def test_empty_cache_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUSTODY_BIN_DIR", str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"are missing.*kustody dev build"):
        binaries.require_binaries()
    assert binaries.stale_targets(tmp_path / "none") == [t.name for t in binaries.TARGETS]


def test_missing_go_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUSTODY_BIN_DIR", str(tmp_path / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(UserError, match=r"Go is needed once.*not on PATH"):
        binaries.build()


def test_current_cache_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUSTODY_BIN_DIR", str(tmp_path))
    for target in binaries.TARGETS:
        (tmp_path / target.name).write_text("")
    stamp = {t.name: {"version": t.version} for t in binaries.TARGETS}
    (tmp_path / "stamp.json").write_text(json.dumps(stamp))
    assert binaries.require_binaries().kubectl == tmp_path / "kubectl"
    assert binaries.stale_targets() == []
