"""``kustody demo``: the whole product on one machine, until Ctrl-C.

Starts (or reuses) the local control plane, a SoftHSM2 token, the HSM sidecar and the
operator, applies the CRDs and the examples, waits until they are Ready and prints what to
look at. Everything it starts stops with it, even when it is killed.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from kustody.dev.binaries import build
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.softhsm import create_token
from kustody.dev.stack import Operator, Sidecar
from kustody.domain.conditions import is_true
from kustody.errors import UserError

_REPO = Path(__file__).resolve().parents[3]


def _ready_count(cluster: Cluster, kind: str) -> tuple[int, int]:
    out = cluster.kubectl("get", kind, "-A", "-o", "json", check=False).stdout or '{"items": []}'
    items = json.loads(out)["items"]
    ready = sum(
        1 for i in items if is_true((i.get("status") or {}).get("conditions") or (), "Ready")
    )
    return ready, len(items)


def _counted(cluster: Cluster) -> int:
    """DataKeys the KeyRings' status counts (it trails the DataKeys by a moment)."""
    out = cluster.kubectl("get", "keyrings", "-o", "json", check=False).stdout or '{"items": []}'
    return sum(
        int(v.get("dataKeys", 0))
        for kr in json.loads(out)["items"]
        for v in (kr.get("status") or {}).get("versions") or ()
    )


def shell_path(cluster: Cluster) -> str:
    """The directories to put first on PATH: this Python's scripts (kustody, kubectl-kustody)
    and the cached control-plane binaries (kubectl, helm), quoted for a shell."""
    scripts = Path(sys.executable).parent
    return ":".join(shlex.quote(str(d)) for d in (scripts, cluster.binaries.directory))


def run(state_dir: Path, examples: Path, hold: bool = True) -> int:
    started = time.monotonic()
    binaries = build()
    plane: ControlPlane | None = ControlPlane(state_dir, binaries=binaries, log=lambda _: None)
    assert plane is not None
    if plane.running():
        cluster = Cluster.load(plane.state_dir)
        print(f"using the control plane already running in {plane.state_dir}")
        plane = None  # not ours to stop
    else:
        cluster = plane.start()
    sidecar: Sidecar | None = None
    operator: Operator | None = None
    stop = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    try:
        token = create_token(
            plane.state_dir / "softhsm" if plane else state_dir / "softhsm", "demo"
        )
        stack = state_dir / "demo"
        sidecar = Sidecar(stack, token).start()
        operator = Operator(stack, cluster, sidecar.socket).start()
        crds = _REPO / "crds"
        cluster.kubectl("apply", "--server-side", "-f", str(crds))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        operator.wait_active()
        cluster.kubectl("apply", "--server-side", "-f", str(examples))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            kr, dk = _ready_count(cluster, "keyrings"), _ready_count(cluster, "datakeys")
            if kr[0] == kr[1] and dk[0] == dk[1] and dk[1] > 0 and _counted(cluster) == dk[1]:
                break
            time.sleep(0.5)
        print(f"\nKustody is running ({time.monotonic() - started:.0f}s). What it made:\n")
        print(cluster.kubectl("get", "keyrings,datakeys,rotationpolicies", "-A").stdout)
        print(cluster.kubectl("get", "secrets", "-n", "payments", "-l",
                              "app.kubernetes.io/managed-by=kustody").stdout)  # fmt: skip
        status = subprocess.run(
            [sys.executable, "-m", "kustody", "status", "--kubeconfig", str(cluster.kubeconfig)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        print(status.stdout)
        print(
            "Try, in another terminal (the first two lines make kubectl, kustody and the\n"
            "kubectl kustody plugin the ones this demo uses):\n"
            f"  export KUBECONFIG={cluster.kubeconfig}\n"
            f"  export PATH={shell_path(cluster)}:$PATH\n"
            "  kubectl kustody status -n payments                  # DataKeys, versions, Events\n"
            "  kubectl kustody rotate payments --wait              # progress of the re-wrap\n"
            "  kubectl kustody doctor --hsm-socket "
            f"{sidecar.socket}\n"
            "  kubectl describe datakey card-vault -n payments     # conditions and Events\n"
            "  kubectl delete secret ledger-dek -n payments         # and watch it come back\n\n"
            f"Logs: {operator.proc.logfile}, {sidecar.proc.logfile}\n"
            "Ctrl-C stops everything (or `make demo-down` from another terminal)."
        )
        if not hold:
            return 0
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            if operator.proc.exited() is not None:
                raise UserError(
                    f"the operator exited; its log ends with:\n{operator.proc.log_tail()}"
                )
            if sidecar.proc.exited() is not None:
                raise UserError(
                    f"the HSM sidecar exited; its log ends with:\n{sidecar.proc.log_tail()}"
                )
            time.sleep(0.5)
        print("\nstopping ...")
        return 0
    finally:
        if operator is not None:
            operator.stop()
        if sidecar is not None:
            sidecar.stop()
        if plane is not None:
            plane.stop()
