"""A real local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

Built from the Kubernetes Go modules (see ``binaries``) and run as local processes, the way
controller-runtime's envtest does, plus kube-controller-manager so that ownerReference garbage
collection, namespace deletion and ServiceAccount tokens work as in a cluster.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kustody.dev.binaries import Binaries, require_binaries
from kustody.dev.pki import ControlPlanePKI, create_pki
from kustody.dev.processes import ManagedProcess, cmdline, find_marked, terminate
from kustody.errors import UserError

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
)
_PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager")
_STATE_FILE = "cluster.json"

Log = Callable[[str], None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int

    @classmethod
    def allocate(cls, apiserver: int | None = None) -> Ports:
        if apiserver is not None and _port_in_use(apiserver):
            raise UserError(
                f"port {apiserver} on 127.0.0.1 is already in use; stop what listens there "
                "(`ss -ltnp`) or choose another with --port (or omit it for a free port)"
            )
        return cls(_free_port(), _free_port(), apiserver or _free_port(), _free_port())


@dataclass
class Cluster:
    """Handles to a running control plane: its address, credentials and CLI tools."""

    state_dir: Path
    server: str
    ports: Ports
    binaries: Binaries
    pki: ControlPlanePKI = field(repr=False)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.etcd_client}"

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster."""
        return self._run(
            [str(self.binaries.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input,
            check,
            timeout,
        )

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster, with its caches inside the state directory."""
        return self._run(
            [str(self.binaries.helm), "--kubeconfig", str(self.kubeconfig), *args],
            input,
            check,
            timeout,
        )

    def helm_env(self) -> dict[str, str]:
        home = self.state_dir / "helm"
        return {
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(self.kubeconfig),
        }

    def _run(
        self, argv: list[str], input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.helm_env()}
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, argv, result.stdout, result.stderr
            )
        return result

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for this cluster."""
        from kubernetes import config

        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )

    def _etcd(self, call: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call of etcd's v3 JSON gateway (the gRPC API over HTTP: no etcdctl needed)."""
        request = urllib.request.Request(
            f"{self.etcd_url}/v3/{call}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, Any] = json.load(response)
        return result

    def etcd_get(self, key: str) -> bytes | None:
        """The raw value stored in etcd under ``key`` (for encryption-at-rest checks)."""
        kvs = self._etcd("kv/range", {"key": base64.b64encode(key.encode()).decode()}).get("kvs")
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def etcd_revision(self) -> int:
        """etcd's current revision (what every resourceVersion is taken from)."""
        header = self._etcd("kv/range", {"key": base64.b64encode(b"/").decode()})["header"]
        return int(header["revision"])

    def etcd_compact(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: the current one), as the API
        server's own compactor does every 5 minutes, and wait until it is physically done.
        A watch from an older resourceVersion then ends with 410 Gone. Returns the revision."""
        revision = revision or self.etcd_revision()
        self._etcd("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET ``path`` on the API server as the admin user."""
        request = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(
                request, timeout=timeout, context=self.ssl_context()
            ) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    @classmethod
    def load(cls, state_dir: Path) -> Cluster:
        """Handles to the control plane recorded in ``state_dir`` (it may not be running)."""
        try:
            data = json.loads((state_dir / _STATE_FILE).read_text())
        except FileNotFoundError:
            raise UserError(
                f"no local control plane in {state_dir}; start one with `kustody dev up`"
            ) from None
        return cls(
            state_dir=state_dir,
            server=data["server"],
            ports=Ports(**data["ports"]),
            binaries=Binaries(Path(data["binaries"])),
            pki=ControlPlanePKI(state_dir / "pki"),
        )


class ControlPlane:
    """Starts and stops etcd, kube-apiserver and kube-controller-manager in ``state_dir``.

    ``detach=False`` (tests, the demo) ties the processes to this one: they are killed when it
    dies, even by SIGKILL. ``detach=True`` (``kustody dev up``) leaves them running until
    ``kustody dev down``; their pidfiles and command lines let a later process find them.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        binaries: Binaries | None = None,
        apiserver_port: int | None = None,
        encryption_config: Path | None = None,
        extra_apiserver_args: Sequence[str] = (),
        watch_cache: bool = True,
        detach: bool = False,
        log: Log = print,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self._binaries = binaries
        self._apiserver_port = apiserver_port
        self._encryption_config = encryption_config
        self._extra_apiserver_args = tuple(extra_apiserver_args)
        self._watch_cache = watch_cache
        self._detach = detach
        self._log = log
        self._procs = {name: ManagedProcess(name, self.state_dir) for name in _PROGRAMS}
        self.cluster: Cluster | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def running(self) -> dict[str, int]:
        """Our live processes in this state directory, by name."""
        return {name: pid for name, proc in self._procs.items() if (pid := proc.pid()) is not None}

    def start(self, timeout: float = 90) -> Cluster:
        """Start everything and wait until the API server is ready; on failure stop it all."""
        binaries = self._binaries or require_binaries()
        self._clean_stale()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pki = create_pki(self.state_dir / "pki")
        ports = Ports.allocate(self._apiserver_port)
        cluster = Cluster(
            self.state_dir, f"https://127.0.0.1:{ports.apiserver}", ports, binaries, pki
        )
        self._write_kubeconfig(cluster)
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._start("etcd", self._etcd_args(cluster))
            self._wait("etcd", deadline, lambda: _http_ok(f"{cluster.etcd_url}/health"))
            self._start("kube-apiserver", self._apiserver_args(cluster))
            self._wait("kube-apiserver", deadline, lambda: cluster.get("/readyz")[0] == 200)
            self._start("kube-controller-manager", self._controller_manager_args(cluster))
            kcm = f"https://127.0.0.1:{ports.controller_manager}/healthz"
            self._wait("kube-controller-manager", deadline, lambda: _https_ok_insecure(kcm))
            self._wait(
                "kube-controller-manager",
                deadline,
                lambda: cluster.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                what="the default ServiceAccount",
            )
        except BaseException:
            self.stop()
            raise
        (self.state_dir / _STATE_FILE).write_text(
            json.dumps(
                {
                    "server": cluster.server,
                    "ports": ports.__dict__,
                    "binaries": str(binaries.directory),
                },
                indent=2,
            )
        )
        self._log(
            f"control plane ready in {time.monotonic() - started:.1f}s at {cluster.server} "
            f"(kubeconfig: {cluster.kubeconfig})"
        )
        self.cluster = cluster
        return cluster

    def stop(self) -> list[str]:
        """Stop every process of this state directory; returns the names stopped."""
        pids: dict[int, str] = {}
        for name in reversed(_PROGRAMS):
            proc = self._procs[name]
            if (pid := proc.pid()) is not None:
                pids[pid] = name
            elif proc.popen is not None and proc.popen.poll() is None:
                pids[proc.popen.pid] = name
        for pid in find_marked(str(self.state_dir), _PROGRAMS):
            pids.setdefault(pid, "orphan")
        # etcd last: kube-apiserver told to stop while etcd is already gone hangs in its
        # shutdown until SIGKILL (10 s), and etcd itself waits for its clients. In this order
        # the whole control plane is gone in about a second.
        etcd = [p for p in pids if Path(cmdline(p).split(" ", 1)[0]).name == "etcd"]
        terminate([p for p in pids if p not in etcd])
        terminate(etcd)
        for proc in self._procs.values():
            proc.pidfile.unlink(missing_ok=True)
        (self.state_dir / _STATE_FILE).unlink(missing_ok=True)
        self.cluster = None
        return sorted(set(pids.values()))

    # -- faults (for reliability tests) ---------------------------------------------------

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (SIGTERM, then SIGKILL): clients see refused connections
        and broken watches; etcd and kube-controller-manager keep running."""
        proc = self._procs["kube-apiserver"]
        pid = proc.pid() or (proc.popen.pid if proc.popen is not None else None)
        if pid is not None:
            terminate([pid])
        proc.pidfile.unlink(missing_ok=True)

    def start_apiserver(self, timeout: float = 90) -> None:
        """Start kube-apiserver again on the same port and wait until it is ready."""
        cluster = self._require_cluster()
        if self._procs["kube-apiserver"].pid() is not None:
            raise UserError("kube-apiserver is already running")
        self._start("kube-apiserver", self._apiserver_args(cluster))
        deadline = time.monotonic() + timeout
        self._wait("kube-apiserver", deadline, lambda: cluster.get("/readyz")[0] == 200)

    def restart_apiserver(self, timeout: float = 90) -> None:
        self.stop_apiserver()
        self.start_apiserver(timeout)

    def _require_cluster(self) -> Cluster:
        if self.cluster is None:
            raise UserError("the control plane is not running; start() it first")
        return self.cluster

    def _clean_stale(self) -> None:
        running = self.running()
        if running:
            raise UserError(
                f"a control plane is already running in {self.state_dir} "
                f"({', '.join(f'{n} pid {p}' for n, p in running.items())}); use it, or stop "
                "it with `kustody dev down`"
            )
        for proc in self._procs.values():
            if proc.pidfile.exists():
                self._log(f"removing stale pidfile {proc.pidfile} (process is gone)")
                proc.pidfile.unlink()
        orphans = find_marked(str(self.state_dir), _PROGRAMS)
        if orphans:
            self._log(f"stopping {len(orphans)} orphaned process(es) from an earlier run")
            terminate(orphans)

    def _start(self, name: str, argv: list[str]) -> None:
        self._procs[name].start(argv, detach=self._detach)

    def _wait(
        self, name: str, deadline: float, ready: Callable[[], bool], what: str | None = None
    ) -> None:
        proc = self._procs[name]
        while True:
            code = proc.exited()
            if code is not None:
                tail = proc.log_tail()
                hint = ""
                if "address already in use" in tail:
                    hint = " (a port was taken meanwhile; run it again)"
                raise UserError(
                    f"{name} exited with code {code} during start-up{hint}; "
                    f"its log ({proc.logfile}) ends with:\n{tail}"
                )
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise UserError(
                    f"timed out waiting for {what or name}; see {proc.logfile}:\n{proc.log_tail()}"
                )
            time.sleep(0.1)

    # -- arguments -----------------------------------------------------------------------

    def _etcd_args(self, c: Cluster) -> list[str]:
        peer = f"http://127.0.0.1:{c.ports.etcd_peer}"
        return [
            str(c.binaries.etcd),
            "--name=default",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={c.etcd_url}",
            f"--advertise-client-urls={c.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, c: Cluster) -> list[str]:
        args = [
            str(c.binaries.kube_apiserver),
            f"--etcd-servers={c.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={c.ports.apiserver}",
            f"--cert-dir={self.state_dir / 'apiserver'}",
            f"--tls-cert-file={c.pki.serving_cert}",
            f"--tls-private-key-file={c.pki.serving_key}",
            f"--client-ca-file={c.pki.ca_cert}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={c.pki.sa_pub}",
            f"--service-account-signing-key-file={c.pki.sa_key}",
            "--allow-privileged=true",
            "--profiling=false",
        ]
        if not self._watch_cache:
            # Every watch and list goes to etcd: a compaction is then visible to clients as
            # 410 Gone instead of being hidden by the cache (reliability tests).
            args.append("--watch-cache=false")
        if self._encryption_config is not None:
            args.append(f"--encryption-provider-config={self._encryption_config}")
        return args + list(self._extra_apiserver_args)

    def _controller_manager_args(self, c: Cluster) -> list[str]:
        return [
            str(c.binaries.kube_controller_manager),
            f"--kubeconfig={c.kubeconfig}",
            f"--authentication-kubeconfig={c.kubeconfig}",
            f"--authorization-kubeconfig={c.kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={c.pki.sa_key}",
            f"--root-ca-file={c.pki.ca_cert}",
            "--use-service-account-credentials=false",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={c.ports.controller_manager}",
            f"--cert-dir={self.state_dir / 'controller-manager'}",
        ]

    def _write_kubeconfig(self, c: Cluster) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kustody-dev",
                    "cluster": {"server": c.server, "certificate-authority": str(c.pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "kustody-admin",
                    "user": {
                        "client-certificate": str(c.pki.admin_cert),
                        "client-key": str(c.pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "kustody-dev",
                    "context": {"cluster": "kustody-dev", "user": "kustody-admin"},
                }
            ],
            "current-context": "kustody-dev",
        }
        c.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        c.kubeconfig.chmod(0o600)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status) == 200


def _https_ok_insecure(url: str) -> bool:
    # kube-controller-manager serves /healthz with a self-signed certificate of its own.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return int(response.status) == 200
