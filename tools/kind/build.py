#!/usr/bin/env python3
"""Build (once, cached) everything a kind cluster needs on a machine that reaches no registry.

    .venv/bin/python tools/kind/build.py          # prints what it built and how long it took

- Go binaries, cached in ``${XDG_CACHE_HOME:-~/.cache}/kustody/kind/<k8s-version>/bin``:
  kubeadm, kubelet, kube-scheduler, kube-proxy (``tools/node``, the same Kubernetes release and
  build settings as the control plane in ``tools/controlplane``); kind, CoreDNS and the
  local-path provisioner (``tools/kind/gomod``); pause, compiled from the Kubernetes module's
  ``build/pause/linux/pause.c``. kube-apiserver, kube-controller-manager, kubectl and etcd come
  from ``kustody dev build``'s cache.
- Images, named as kubeadm of this release asks for them (``kubeadm config images list``),
  saved as archives next to the binaries: pause, kube-apiserver, kube-controller-manager,
  kube-scheduler, kube-proxy, etcd, CoreDNS, the local-path provisioner and a Debian image
  for the CNI DaemonSet and the provisioner's helper pods.
- The node image ``localhost/kustody/kind-node:<k8s-version>`` (``tools/kind/node``), rebuilt
  only when one of its inputs changed (the label ``io.kustody.inputs``).

Base images come from ``tools/image/base.sh`` (debootstrap, no registry).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from kustody.dev import binaries as cp  # noqa: E402

K8S_VERSION = cp.K8S_VERSION
KIND_VERSION = "v0.33.0"
NODE_IMAGE = f"localhost/kustody/kind-node:{K8S_VERSION}"
DEBIAN_IMAGE = "localhost/kustody/kind-debian:bookworm"
PROVISIONER_IMAGE = "localhost/kustody/local-path-provisioner:v0.0.30"
BASE_IMAGE = "localhost/debian:bookworm"

_NODE_TARGETS = ("kubeadm", "kubelet", "kube-scheduler", "kube-proxy")
_KIND_TARGETS = {
    "kind": "sigs.k8s.io/kind",
    "coredns": "github.com/coredns/coredns",
    "local-path-provisioner": "github.com/rancher/local-path-provisioner",
}


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kustody" / "kind" / K8S_VERSION


def bin_dir() -> Path:
    return cache_dir() / "bin"


def _log(msg: str) -> None:
    print(f"[kind-build] {msg}", flush=True)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stamp() -> dict[str, str]:
    try:
        data = json.loads((bin_dir() / "stamp.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(stamp: dict[str, str]) -> None:
    (bin_dir() / "stamp.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def _k8s_ldflags() -> str:
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={K8S_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def _go_build(module: Path, package: str, out: Path, ldflags: str, tags: str = "") -> float:
    started = time.monotonic()
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    cmd = ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out) + ".tmp", package]
    if tags:
        cmd[3:3] = ["-tags", tags]
    _run(cmd, cwd=module, env=env)
    os.replace(str(out) + ".tmp", out)
    return time.monotonic() - started


def build_binaries(timings: dict[str, float]) -> None:
    """The Go binaries (and pause) that are missing or were built from other inputs."""
    bin_dir().mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    node_mod = ROOT / "tools" / "node"
    kind_mod = ROOT / "tools" / "kind" / "gomod"
    wanted: dict[str, str] = {}
    for name in _NODE_TARGETS:
        wanted[name] = _digest(node_mod / "go.mod", node_mod / "go.sum")
    for name in _KIND_TARGETS:
        wanted[name] = _digest(kind_mod / "go.mod", kind_mod / "go.sum")
    wanted["pause"] = K8S_VERSION
    for name, digest in wanted.items():
        if stamp.get(name) == digest and (bin_dir() / name).is_file():
            continue
        _log(f"building {name} ...")
        if name in _NODE_TARGETS:
            took = _go_build(
                node_mod,
                f"k8s.io/kubernetes/cmd/{name}",
                bin_dir() / name,
                _k8s_ldflags(),
                "selinux,notest",
            )
        elif name in _KIND_TARGETS:
            took = _go_build(kind_mod, _KIND_TARGETS[name], bin_dir() / name, "-s -w")
        else:
            took = _build_pause(node_mod)
        timings[f"build {name}"] = took
        _log(f"built {name} in {took:.0f}s")
        stamp[name] = digest
        _write_stamp(stamp)


def _build_pause(node_mod: Path) -> float:
    started = time.monotonic()
    info = json.loads(
        _run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{K8S_VERSION}"],
            cwd=node_mod,
            capture_output=True,
        ).stdout
    )
    source = Path(info["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    out = bin_dir() / "pause"
    _run(
        [
            "gcc",
            "-Os",
            "-Wall",
            "-static",
            f"-DVERSION={pause_version()}",
            "-o",
            str(out),
            str(source),
        ]
    )
    return time.monotonic() - started


def kubeadm_images() -> dict[str, str]:
    """``kubeadm config images list`` of this release: component name -> image reference."""
    out = _run(
        [
            str(bin_dir() / "kubeadm"),
            "config",
            "images",
            "list",
            "--kubernetes-version",
            K8S_VERSION,
        ],
        capture_output=True,
    ).stdout.split()
    images = {}
    for ref in out:
        name = ref.rsplit("/", 1)[-1].split(":")[0]
        images[name] = ref
    return images


def pause_version() -> str:
    source = (
        Path(_run(["go", "env", "GOMODCACHE"], capture_output=True).stdout.strip())
        / f"k8s.io/kubernetes@{K8S_VERSION}"
        / "cmd/kubeadm/app/constants/constants.go"
    )
    match = re.search(r'PauseVersion = "([^"]+)"', source.read_text())
    return match.group(1) if match else "3.10.2"


def _image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], check=False).returncode == 0


def _label(ref: str, key: str) -> str:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{key}"}}}}', ref],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def _podman_build(ref: str, context: Path, containerfile: str, inputs: str, *args: str) -> bool:
    """Build ``ref`` unless an image with the same inputs label exists; True when built."""
    if _image_exists(ref) and _label(ref, "io.kustody.inputs") == inputs:
        return False
    (context / "Containerfile").write_text(containerfile)
    _run(
        [
            "podman",
            "build",
            "--network",
            "host",
            "--label",
            f"io.kustody.inputs={inputs}",
            "-t",
            ref,
            *args,
            str(context),
        ],
        stdout=subprocess.DEVNULL,
    )
    return True


def _scratch_image(binary: Path, name: str, entrypoint: list[str] | None = None) -> str:
    lines = [
        "FROM scratch",
        f"COPY {binary.name} /usr/local/bin/{name}",
        "ENV PATH=/usr/local/bin:/usr/bin:/bin",
    ]
    if entrypoint:
        lines.append(f"ENTRYPOINT {json.dumps(entrypoint)}")
    return "\n".join(lines) + "\n"


def build_images(timings: dict[str, float]) -> list[Path]:
    """The images the node preloads, each saved as an archive; returns the archives."""
    images = kubeadm_images()
    ctrl = cp.require_binaries()
    archives_dir = cache_dir() / "images"
    archives_dir.mkdir(parents=True, exist_ok=True)
    plan: dict[str, tuple[str, Path | None, str]] = {}
    bins = bin_dir()
    plan[images["pause"]] = (
        "pause",
        bins / "pause",
        _scratch_image(bins / "pause", "pause", ["/usr/local/bin/pause"]),
    )
    for comp, binary in (
        ("kube-apiserver", ctrl.kube_apiserver),
        ("kube-controller-manager", ctrl.kube_controller_manager),
        ("kube-scheduler", bins / "kube-scheduler"),
    ):
        plan[images[comp]] = (comp, binary, _scratch_image(binary, comp))
    plan[images["etcd"]] = ("etcd", ctrl.etcd, _scratch_image(ctrl.etcd, "etcd"))
    plan[images["coredns"]] = (
        "coredns",
        bins / "coredns",
        _scratch_image(bins / "coredns", "coredns", ["/usr/local/bin/coredns"]),
    )
    plan[images["kube-proxy"]] = (
        "kube-proxy",
        bins / "kube-proxy",
        f"FROM {BASE_IMAGE}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends iptables nftables"
        " conntrack ipset kmod && rm -rf /var/lib/apt/lists/*\n"
        "COPY kube-proxy /usr/local/bin/kube-proxy\n",
    )
    plan[PROVISIONER_IMAGE] = (
        "local-path-provisioner",
        bins / "local-path-provisioner",
        _scratch_image(bins / "local-path-provisioner", "local-path-provisioner"),
    )
    plan[DEBIAN_IMAGE] = ("debian", None, f"FROM {BASE_IMAGE}\n")
    archives = []
    base_id = _run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", BASE_IMAGE], capture_output=True
    ).stdout.strip()
    for ref, (name, binary, containerfile) in plan.items():
        archive = archives_dir / f"{name}.tar"
        inputs = hashlib.sha256(containerfile.encode() + base_id.encode())
        if binary is not None:
            inputs.update(_digest(binary).encode())
        label = inputs.hexdigest()[:16]
        if archive.is_file() and _image_exists(ref) and _label(ref, "io.kustody.inputs") == label:
            archives.append(archive)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            context = Path(tmp)
            if binary is not None:
                shutil.copy(binary, context / binary.name)
            started = time.monotonic()
            _podman_build(ref, context, containerfile, label)
            _run(["podman", "save", "--format", "docker-archive", "-o", f"{archive}.tmp", ref])
            os.replace(f"{archive}.tmp", archive)
            timings[f"image {name}"] = time.monotonic() - started
            _log(f"image {ref} -> {archive.name} ({time.monotonic() - started:.0f}s)")
        archives.append(archive)
    return archives


def _storage_manifest() -> str:
    """kind's own default storage manifest (local-path provisioner), with our images."""
    info = json.loads(
        _run(
            ["go", "mod", "download", "-json", f"sigs.k8s.io/kind@{KIND_VERSION}"],
            cwd=ROOT / "tools" / "kind" / "gomod",
            capture_output=True,
        ).stdout
    )
    source = (Path(info["Dir"]) / "pkg/build/nodeimage/const_storage.go").read_text()
    body = source.split("const defaultStorageManifest = `", 1)[1].split("\n`", 1)[0]
    body = body.replace("` + storageProvisionerImage + `", PROVISIONER_IMAGE)
    body = body.replace("` + storageHelperImage + `", DEBIAN_IMAGE)
    return (
        "# kind's default storage (sigs.k8s.io/kind pkg/build/nodeimage/const_storage.go), with\n"
        "# the provisioner and helper images built here (tools/kind/build.py).\n" + body + "\n"
    )


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def build_node_image(archives: list[Path], timings: dict[str, float]) -> str:
    info = json.loads(
        _run(
            ["go", "mod", "download", "-json", f"sigs.k8s.io/kind@{KIND_VERSION}"],
            cwd=ROOT / "tools" / "kind" / "gomod",
            capture_output=True,
        ).stdout
    )
    kind_base = Path(info["Dir"]) / "images" / "base" / "files"
    ctrl = cp.require_binaries()
    node_dir = ROOT / "tools" / "kind" / "node"
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        context = Path(tmp)
        shutil.copytree(kind_base, context / "kind-base", ignore=shutil.ignore_patterns("LICENSES"))
        for p in (context / "kind-base").rglob("*"):
            p.chmod(0o755 if p.is_dir() or os.access(p, os.X_OK) else 0o644)
        shutil.copytree(node_dir / "files", context / "files")
        (context / "files" / "kind" / "manifests" / "default-storage.yaml").write_text(
            _storage_manifest()
        )
        (context / "bin").mkdir()
        for binary in (bin_dir() / "kubeadm", bin_dir() / "kubelet", ctrl.kubectl):
            _link_or_copy(binary, context / "bin" / binary.name)
        (context / "images").mkdir()
        for archive in archives:
            _link_or_copy(archive, context / "images" / archive.name)
        containerfile = (node_dir / "Containerfile").read_text()
        inputs = _digest(
            node_dir,
            context / "kind-base",
            context / "bin",
            context / "images",
            context / "files" / "kind" / "manifests" / "default-storage.yaml",
        )
        started = time.monotonic()
        if _podman_build(
            NODE_IMAGE,
            context,
            containerfile,
            inputs,
            "--build-arg",
            f"KUBERNETES_VERSION={K8S_VERSION}",
        ):
            timings["node image"] = time.monotonic() - started
            _log(f"node image {NODE_IMAGE} built in {timings['node image']:.0f}s")
    return NODE_IMAGE


def main() -> int:
    started = time.monotonic()
    timings: dict[str, float] = {}
    _run(["bash", str(ROOT / "tools" / "image" / "podman-setup.sh")])
    _run(["bash", str(ROOT / "tools" / "image" / "base.sh")])
    cp.build()
    build_binaries(timings)
    archives = build_images(timings)
    image = build_node_image(archives, timings)
    total = time.monotonic() - started
    _log(f"{image} ready; kind at {bin_dir() / 'kind'}; {total:.0f}s in all")
    for step, took in timings.items():
        _log(f"  {step}: {took:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
