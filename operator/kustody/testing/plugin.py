"""Pytest fixtures for a real local control plane and SoftHSM2 tokens.

Registered as the ``kustody`` pytest11 entry point, so installing Kustody makes them available
to any test suite:

``kube``
    a session-wide :class:`kustody.dev.controlplane.Cluster` (etcd, kube-apiserver,
    kube-controller-manager) in a temporary directory; the binaries are built on first use.
``softhsm_token``
    a session-wide fresh token; ``make_softhsm_token`` makes more. SoftHSM2 by default; the
    implementation named by ``$KUSTODY_TEST_TOKEN`` (``softhsm2`` or ``kryoptic``, see
    :mod:`kustody.dev.tokens`) otherwise, so a suite runs unchanged on either.
``kube_namespace``
    a fresh namespace per test, deleted afterwards.
``kustody_crds``
    the kustody.io CRDs applied to ``kube`` (from ``$KUSTODY_CRDS_DIR`` or the checkout's crds/).
``hsm_sidecar``
    a session-wide ``kustody hsm`` process serving ``softhsm_token``.
``kustody_operator``
    a session-wide ``kustody operator`` process on ``kube``, using ``hsm_sidecar``.
``kms_plugin_binary``
    ``kustody-kms``, the Go KMS v2 plugin, built from the checkout's ``kms/`` (cached).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kustody.dev import binaries, kmsplugin
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar
from kustody.dev.tokens import DevToken, create_token, selected_kind
from kustody.errors import UserError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kustody")
    group.addoption(
        "--kustody-no-build",
        action="store_true",
        help="fail instead of building missing control-plane binaries",
    )


@pytest.fixture(scope="session")
def kube(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A real local control plane for the whole test session."""
    try:
        bins = (
            binaries.require_binaries()
            if request.config.getoption("--kustody-no-build")
            else binaries.build()
        )
        plane = ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries=bins, log=_quiet)
        cluster = plane.start()
    except UserError as exc:
        pytest.fail(f"could not start the local control plane: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        plane.stop()


@pytest.fixture
def kube_namespace(kube: Cluster) -> Iterator[str]:
    """A fresh namespace for one test; deleted (without waiting) afterwards."""
    name = f"t-{secrets.token_hex(4)}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def make_softhsm_token(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], DevToken]:
    """Factory: ``make_softhsm_token(label)`` creates a fresh token in its own directory (of
    the implementation ``$KUSTODY_TEST_TOKEN`` names; SoftHSM2 by default)."""

    def make(label: str = "kustody") -> DevToken:
        try:
            kind = selected_kind()
            return create_token(tmp_path_factory.mktemp(kind), label, kind=kind)
        except UserError as exc:
            pytest.fail(f"could not create a test token: {exc}", pytrace=False)

    return make


@pytest.fixture(scope="session")
def kms_plugin_binary() -> Path:
    """``kustody-kms`` for this checkout's sources (built once, then cached)."""
    try:
        return kmsplugin.build(log=_quiet)
    except UserError as exc:
        pytest.fail(f"could not build kustody-kms: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def softhsm_token(make_softhsm_token: Callable[[str], DevToken]) -> DevToken:
    """A fresh token (SoftHSM2 unless ``$KUSTODY_TEST_TOKEN`` says otherwise) for the session."""
    return make_softhsm_token("kustody")


def _quiet(_: str) -> None:
    pass


__all__ = ["Cluster", "DevToken", "Path", "SoftHSMToken"]


def crds_dir() -> Path:
    override = os.environ.get("KUSTODY_CRDS_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "crds"


@pytest.fixture(scope="session")
def kustody_crds(kube: Cluster) -> Path:
    """Apply the kustody.io CRDs (server-side, idempotent) and wait until they are served."""
    directory = crds_dir()
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(directory))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/keyrings.kustody.io", "crd/datakeys.kustody.io", "crd/rotationpolicies.kustody.io",
    )  # fmt: skip
    return directory


@pytest.fixture(scope="session")
def hsm_sidecar(
    softhsm_token: DevToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    """The HSM sidecar serving the session's SoftHSM2 token on a unix socket."""
    # No waiting period between SetVersionState(DESTROY_SCHEDULED) and DestroyVersion: the
    # cluster tests expire a destruction by moving status.destroyAt into the past.
    sidecar = Sidecar(
        tmp_path_factory.mktemp("hsm"), softhsm_token, extra_args=("--min-destroy-delay", "0s")
    )
    try:
        sidecar.start()
    except UserError as exc:
        pytest.fail(f"could not start the HSM sidecar: {exc}", pytrace=False)
    yield sidecar
    sidecar.stop()


@pytest.fixture(scope="session")
def kustody_operator(
    kube: Cluster,
    kustody_crds: Path,
    hsm_sidecar: Sidecar,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    """The operator, active (holding its Lease, caches synced) before the first test runs."""
    operator = Operator(tmp_path_factory.mktemp("operator"), kube, hsm_sidecar.socket)
    try:
        operator.start().wait_active()
    except UserError as exc:
        operator.stop()
        pytest.fail(f"could not start the operator: {exc}", pytrace=False)
    yield operator
    operator.stop()
