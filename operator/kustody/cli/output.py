"""``-o table|wide|json|yaml`` for every read command, as kubectl spells it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import yaml

FORMATS = ("table", "wide", "json", "yaml")


def add_output_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="table (default), wide (more columns), or json/yaml in the versioned schema "
        "kustody.io/cli/v1 (docs/cli.md)",
    )


def render(report: Mapping[str, Any], fmt: str, as_table: Callable[[bool], str]) -> str:
    """The report as ``fmt``; ``as_table(wide)`` draws the table from the same report."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(dict(report), sort_keys=False).rstrip("\n")
    return as_table(fmt == "wide")


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of ``kind`` (StatusReport, DoctorReport) shipped with the package."""
    text = resources.files("kustody.cli").joinpath("schemas", f"{kind.lower()}.v1.json")
    data: dict[str, Any] = json.loads(text.read_text())
    return data
