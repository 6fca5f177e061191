"""The shape rules of docs/architecture.md, checked on the source: reconcilers are made of
small functions, and no function takes more than six positional parameters."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "kustody"
RECONCILERS = ("controller/keyring", "controller/datakey", "controller/policy", "controller/escrow")
MAX_LINES = 50
MAX_POSITIONAL = 6


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "_proto" not in p.parts]


def test_reconciler_functions_are_short() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for path in _sources()
        if any(part in str(path.relative_to(PACKAGE)) for part in RECONCILERS)
        for fn in _functions(path)
        if fn.end_lineno is not None and fn.end_lineno - fn.lineno + 1 > MAX_LINES
    ]
    assert not long, "reconciler functions over 50 lines:\n" + "\n".join(long)


def test_no_function_takes_more_than_six_positional_parameters() -> None:
    wide = []
    for path in _sources():
        for fn in _functions(path):
            params = [*fn.args.posonlyargs, *fn.args.args]
            if params and params[0].arg in ("self", "cls"):
                params = params[1:]
            if len(params) > MAX_POSITIONAL:
                wide.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({len(params)})")
    assert not wide, "functions with more than 6 positional parameters:\n" + "\n".join(wide)


def test_the_rules_see_the_reconcilers() -> None:
    """The checks above would pass vacuously if the layout moved: the reconciler folders
    exist and hold functions."""
    for folder in RECONCILERS:
        files = list((PACKAGE / folder).glob("*.py"))
        assert files, folder
        assert sum(len(_functions(f)) for f in files) > 0, folder


def test_the_where_is_table_names_files_that_exist() -> None:
    """docs/architecture.md answers "where is ..." with paths: each must exist."""
    import re

    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    table = doc[doc.index("Where is…") : doc.index("import-linter (`make contracts`)")]
    paths = re.findall(r"`([a-z0-9_/]+\.py)`", table)
    assert len(paths) >= 8, paths
    missing = [p for p in paths if not (PACKAGE / p).is_file()]
    assert not missing, missing


def test_test_module_basenames_are_unique() -> None:
    """The test directories have no __init__.py (rootdir-relative imports), so pytest imports
    each test module by its basename: two with one name fail collection of the whole run."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    for path in sorted(tests.rglob("test_*.py")):
        if (path.parent / "__init__.py").exists():
            continue
        assert path.name not in seen, f"{path} and {seen[path.name]} share a basename"
        seen[path.name] = path
