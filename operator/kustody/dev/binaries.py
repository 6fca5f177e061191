"""Build and cache the control-plane binaries from the Kubernetes Go modules.

kube-apiserver, kube-controller-manager and kubectl come from ``tools/controlplane`` (a wrapper
module around ``k8s.io/kubernetes``), etcd from ``tools/etcd`` and helm from ``tools/helm``.
Each is built once into ``${XDG_CACHE_HOME:-~/.cache}/kustody/bin/<k8s-version>/`` with the
official settings (CGO off, ``-trimpath``, version ldflags) and reused afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kustody.errors import UserError

K8S_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"
HELM_VERSION = "v3.22.0"
# helm derives the default Capabilities.KubeVersion used by `helm template` from these.
_HELM_K8S_MINOR = "37"
_MIN_GO = (1, 26)

Log = Callable[[str], None]


@dataclass(frozen=True)
class _Target:
    name: str
    module_dir: str
    package: str
    version: str

    def version_probe(self) -> list[str]:
        if self.name == "kubectl":
            return ["version", "--client"]
        return ["version", "--short"] if self.name == "helm" else ["--version"]


_CONTROLPLANE = ("kube-apiserver", "kube-controller-manager", "kubectl")
TARGETS: tuple[_Target, ...] = (
    _Target("kube-apiserver", "controlplane", "k8s.io/kubernetes/cmd/kube-apiserver", K8S_VERSION),
    _Target(
        "kube-controller-manager",
        "controlplane",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
        K8S_VERSION,
    ),
    _Target("kubectl", "controlplane", "k8s.io/kubernetes/cmd/kubectl", K8S_VERSION),
    _Target("etcd", "etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION),
    _Target("helm", "helm", "helm.sh/helm/v3/cmd/helm", HELM_VERSION),
)


@dataclass(frozen=True)
class Binaries:
    """The cached binaries of one Kubernetes release."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def kube_apiserver(self) -> Path:
        return self.path("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        return self.path("kube-controller-manager")

    @property
    def kubectl(self) -> Path:
        return self.path("kubectl")

    @property
    def etcd(self) -> Path:
        return self.path("etcd")

    @property
    def helm(self) -> Path:
        return self.path("helm")


def cache_dir() -> Path:
    """Where the binaries of this release live; ``KUSTODY_BIN_DIR`` overrides it."""
    override = os.environ.get("KUSTODY_BIN_DIR")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kustody" / "bin" / K8S_VERSION


def tools_dir() -> Path:
    """The ``tools/`` folder of the source checkout that holds the pinned Go modules."""
    override = os.environ.get("KUSTODY_TOOLS_DIR")
    candidate = Path(override) if override else Path(__file__).resolve().parents[3] / "tools"
    if not (candidate / "controlplane" / "go.mod").is_file():
        raise UserError(
            f"building the control plane needs a Kustody source checkout; {candidate} has no "
            "controlplane/go.mod (set KUSTODY_TOOLS_DIR, or KUSTODY_BIN_DIR to prebuilt binaries)"
        )
    return candidate


def _stamp_path(directory: Path) -> Path:
    return directory / "stamp.json"


def _module_digest(module_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((module_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def _read_stamp(directory: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_stamp_path(directory).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stale_targets(directory: Path | None = None) -> list[str]:
    """Names of binaries that are missing or were built for another version."""
    directory = directory or cache_dir()
    stamp = _read_stamp(directory)
    stale = []
    for target in TARGETS:
        entry = stamp.get(target.name, {})
        if not (directory / target.name).is_file() or entry.get("version") != target.version:
            stale.append(target.name)
    return stale


def require_binaries() -> Binaries:
    """The cached binaries, or a UserError saying how to build them."""
    directory = cache_dir()
    stale = stale_targets(directory)
    if stale:
        stamp = _read_stamp(directory)
        built_for = {stamp.get(n, {}).get("version") for n in stale} - {None}
        why = (
            f"were built for {', '.join(sorted(str(v) for v in built_for))}"
            if built_for
            else "are missing"
        )
        raise UserError(
            f"control-plane binaries in {directory} ({', '.join(stale)}) {why}; Kustody needs "
            f"Kubernetes {K8S_VERSION}, etcd {ETCD_VERSION}, helm {HELM_VERSION}. "
            "Build them with `kustody dev build` (or `make binaries`)."
        )
    return Binaries(directory)


def _check_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise UserError(
            "Go is needed once to build the control-plane binaries but `go` is not on PATH; "
            f"install Go >= {_MIN_GO[0]}.{_MIN_GO[1]} (https://go.dev/dl/) or point "
            "KUSTODY_BIN_DIR at prebuilt binaries"
        )
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=False)
    match = re.match(r"go(\d+)\.(\d+)", out.stdout.strip())
    if not match or (int(match.group(1)), int(match.group(2))) < _MIN_GO:
        raise UserError(
            f"Go {out.stdout.strip() or '(unknown)'} is too old to build Kubernetes "
            f"{K8S_VERSION}; install Go >= {_MIN_GO[0]}.{_MIN_GO[1]}"
        )
    return go


def _ldflags(target: _Target) -> str:
    if target.module_dir == "controlplane":
        major, minor = target.version.lstrip("v").split(".")[:2]
        flags = []
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [
                f"-X {pkg}.gitVersion={target.version}",
                f"-X {pkg}.gitMajor={major}",
                f"-X {pkg}.gitMinor={minor}",
                f"-X {pkg}.gitTreeState=clean",
                f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
            ]
        return " ".join(["-s", "-w", *flags])
    if target.name == "helm":
        return " ".join(
            [
                "-s",
                "-w",
                f"-X helm.sh/helm/v3/internal/version.version={target.version}",
                "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
                "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
                f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={_HELM_K8S_MINOR}",
                "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
                f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={_HELM_K8S_MINOR}",
            ]
        )
    return "-s -w"


@contextmanager
def _lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# What a cold build of each costs on 2 cores (empty Go caches, modules from the proxy), to say
# before starting; measured 7 min 55 s to 12 min for all five, slower machines up to 20.
_COLD_MINUTES = {"controlplane": (6, 15), "etcd": (1, 2), "helm": (1, 3)}
_HEARTBEAT = 30.0  # seconds between "still building" lines when not on a terminal


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def estimate(stale: list[str]) -> str:
    """How long building ``stale`` from cold takes, as a range to print before starting."""
    modules = {t.module_dir for t in TARGETS if t.name in stale}
    low = sum(_COLD_MINUTES.get(m, (1, 2))[0] for m in modules)
    high = sum(_COLD_MINUTES.get(m, (1, 2))[1] for m in modules)
    cores = os.cpu_count() or 1
    return (
        f"a cold build takes about {low}-{high} minutes on 2 cores ({cores} here), less with a "
        "warm Go cache; it happens once"
    )


def _go_build(go: str, tools: Path, target: _Target, out_dir: Path, log: Log, step: str) -> float:
    """Build one binary, saying every so often that it still is; returns the seconds taken."""
    module_dir = tools / target.module_dir
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    cmd = [go, "build", "-trimpath", "-tags", "selinux,notest", "-ldflags", _ldflags(target)]
    cmd += ["-o", str(out_dir / target.name), target.package]
    tty = log is print and sys.stdout.isatty()
    started = time.monotonic()
    log(f"  {step} {target.name}: go build {target.package} ...")
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            cmd, cwd=module_dir, env=env, stdout=subprocess.DEVNULL, stderr=errors, text=True
        )
        next_beat = started + _HEARTBEAT
        while True:
            try:
                proc.wait(timeout=min(1.0, _HEARTBEAT))
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if tty:
                    sys.stdout.write(f"\r  {step} {target.name}: {_elapsed(now - started)} ")
                    sys.stdout.flush()
                elif now >= next_beat:
                    log(f"  {step} {target.name}: still building ({_elapsed(now - started)})")
                    next_beat = now + _HEARTBEAT
        if tty:
            sys.stdout.write("\r\033[K")
        if proc.returncode != 0:
            errors.seek(0)
            tail = "\n".join(errors.read().strip().splitlines()[-15:])
            raise UserError(f"building {target.name} failed:\n{tail}")
    took = time.monotonic() - started
    log(f"  {step} {target.name}: built in {_elapsed(took)}")
    return took


def build(force: bool = False, log: Log = print) -> Binaries:
    """Build whatever is missing or stale (all of it with ``force``); returns the binaries."""
    directory = cache_dir()
    with _lock(directory):
        stale = [t.name for t in TARGETS] if force else stale_targets(directory)
        if not stale:
            return Binaries(directory)
        go = _check_go()
        tools = tools_dir()
        stamp = _read_stamp(directory)
        started = time.monotonic()
        log(f"building {', '.join(stale)} into {directory} (cached afterwards)")
        log(f"  {estimate(stale)}")
        staging = directory / f".build-{os.getpid()}"
        staging.mkdir(exist_ok=True)
        todo = [t for t in TARGETS if t.name in stale]
        try:
            for index, target in enumerate(todo, 1):
                _go_build(go, tools, target, staging, log, f"[{index}/{len(todo)}]")
                _verify(staging / target.name, target)
                os.replace(staging / target.name, directory / target.name)
                stamp[target.name] = {
                    "version": target.version,
                    "modules": _module_digest(tools / target.module_dir),
                }
                _stamp_path(directory).write_text(json.dumps(stamp, indent=2) + "\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"built {len(stale)} binaries in {_elapsed(time.monotonic() - started)}")
        return Binaries(directory)


def _verify(binary: Path, target: _Target) -> None:
    out = subprocess.run(
        [str(binary), *target.version_probe()], capture_output=True, text=True, check=False
    )
    text = out.stdout + out.stderr
    if target.version.lstrip("v") not in text:
        raise UserError(f"{target.name} reports {text.strip()!r}, expected {target.version}")
