"""Shared test configuration. The ``kube`` and ``softhsm_token`` fixtures come from the
``kustody`` pytest plugin (``kustody.testing.plugin``).

``make test`` runs the suite in two processes (pytest-xdist, ``-n 2 --dist loadscope``). Each
process has its own session fixtures (control plane, tokens, sidecar, operator, temporary
directories) and runs whole groups of tests in file order, as a serial run would: a module's
tests share module fixtures and some build on the ones before them. A group is one module,
except:

- ``tests/kind`` is one group (one kind cluster of a fixed name, one image build);
- each test of the modules in ``_TEST_PER_GROUP`` is a group of its own (each builds a
  control plane, a sidecar and an operator of its own and shares nothing with the others).

Groups start longest first (the container layer, then the slow cluster modules, the other
cluster modules, the HSM layer, the unit tests), so that the processes finish together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Modules whose tests each run on a stack of their own: one group per test.
_TEST_PER_GROUP = ("tests/cluster/test_api_faults.py",)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


def group_of(nodeid: str) -> str:
    """The group a test runs in: the tests of a group run in one process, in file order."""
    module = nodeid.split("::", 1)[0]
    if module.startswith("tests/kind/"):
        return "tests/kind"
    if module in _TEST_PER_GROUP:
        return nodeid
    return module


def _rank(item: pytest.Item) -> int:
    module = item.nodeid.split("::", 1)[0]
    if module.startswith("tests/kind/"):
        return 0
    if module.startswith("tests/cluster/"):
        return 1 if item.get_closest_marker("slow") else 2
    if module.startswith("tests/hsm/"):
        return 3
    return 4


def pytest_configure(config: pytest.Config) -> None:
    dist = getattr(config.option, "dist", "no")
    if dist not in ("no", "loadscope"):
        raise pytest.UsageError(
            f"--dist {dist}: run the suite with --dist loadscope (tests/conftest.py: a "
            "module's tests must stay in one process, in file order)"
        )


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's loadscope scheduling with this suite's groups, in the order the workers
    collected them (``pytest_collection_modifyitems`` below), not by their number of tests."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only xdist's workers: a serial run keeps file order
        return
    # Whole groups, longest first; within a group, file order.
    order: dict[str, tuple[int, int]] = {}  # group -> (rank, index of its first test)
    for index, item in enumerate(items):
        group = group_of(item.nodeid)
        rank, first = order.get(group, (_rank(item), index))
        order[group] = (min(rank, _rank(item)), first)
    items.sort(key=lambda item: order[group_of(item.nodeid)])
