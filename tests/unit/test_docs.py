"""Documentation that can go stale is checked: the generated CRD reference, the tests the
threat model cites, relative links, and the Argo CD ConfigMap example's embedded Lua."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "charts/kustody/README.md"]
)

# Written by the workload-unwrap work (issue 5) in parallel; linked already.


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_crd_reference_is_generated_from_the_current_crds() -> None:
    assert _tool("gen_crd_reference").main(["--check"]) == 0, "run tools/gen_crd_reference.py"


def test_crd_reference_documents_every_spec_field() -> None:
    text = (ROOT / "docs" / "crd-reference.md").read_text()
    for field in (
        "spec.keyRingRef.name",
        "spec.allowedNamespaces",
        "spec.destroyAfter",
        "status.versions[].state",
    ):
        assert f"`{field}`" in text, field


def test_every_test_the_threat_model_cites_exists() -> None:
    text = (ROOT / "docs" / "threat-model.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(cited) >= 20
    for path, name in cited:
        source = ROOT / path
        assert source.is_file(), path
        assert re.search(rf"^(async )?def {name}\(", source.read_text(), re.M), f"{path}::{name}"


def test_threat_model_covers_every_principle() -> None:
    text = (ROOT / "docs" / "threat-model.md").read_text()
    for principle in (
        "Random numbers come from a trusted source",
        "Keys are never sent or stored in the clear",
        "Key management is separate from the data and the platform",
        "No key, no data",
        "Escrow and third parties are deliberate",
    ):
        assert f"## {principle}" in text, principle


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    text = re.sub(r"`[^`\n]*`", "", doc.read_text())  # code spans hold regexes, not links
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_argocd_configmap_embeds_the_tested_lua() -> None:
    cm = yaml.safe_load((ROOT / "examples" / "argocd" / "argocd-cm.yaml").read_text())
    for kind in ("KeyRing", "DataKey", "RotationPolicy"):
        lua = (ROOT / "examples" / "argocd" / "health" / f"{kind.lower()}.lua").read_text()
        assert cm["data"][f"resource.customizations.health.kustody.io_{kind}"] == lua, kind
