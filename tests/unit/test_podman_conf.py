"""tools/image/podman-conf.sh: the two podman settings the container layer needs (issue 13),
written into containers.conf without losing what is there, and only once."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "image" / "podman-conf.sh"


def _run(conf: Path) -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT), str(conf)], capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.mark.parametrize(
    "before",
    [
        "",
        '[engine]\nruntime = "crun"\n',  # Debian's podman with crun: replaced, not duplicated
        '[containers]\ndefault_ulimits = ["nofile=1048576:1048576"]\n'
        '[engine]\nevents_logger = "file"\n',
    ],
)
def test_runc_and_no_default_ulimits_are_set_and_the_rest_kept(tmp_path: Path, before: str) -> None:
    conf = tmp_path / "containers" / "containers.conf"
    conf.parent.mkdir()
    conf.write_text(before)
    _run(conf)
    settings = tomllib.loads(conf.read_text())  # still valid TOML: no key twice
    assert settings["engine"]["runtime"] == "runc"
    assert settings["containers"]["default_ulimits"] == []
    if "events_logger" in before:
        assert settings["engine"]["events_logger"] == "file"
    text = conf.read_text()
    assert _run(conf) == ""  # a second run changes nothing
    assert conf.read_text() == text


def test_a_missing_file_is_created(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "containers" / "containers.conf"
    assert "runtime" in _run(conf)
    assert tomllib.loads(conf.read_text())["engine"]["runtime"] == "runc"
