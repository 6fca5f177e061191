"""The PKCS#11 worker process: the only process that loads the module and owns the session.

``python -m kustody.pkcs11.worker --fd N --parent PID --module ... --label ... --pin-file ...``

Started by :class:`kustody.sidecar.connection.HsmConnection`, connected to it by a socketpair
(``--fd``). The worker reads the PIN file itself; the PIN never crosses the pipe, argv or env.
Its main thread is the PKCS#11 thread (:mod:`kustody.pkcs11.thread`): it reads a request, runs
the named operation against the token, writes the answer, and takes the next one the front
end has already queued in the socket buffer, so it never waits for the event loop.

It dies with its parent: ``PR_SET_PDEATHSIG(SIGKILL)``, and EOF on the socket (the parent
closed it or is gone) ends the loop. Before it reads the PIN or opens the token it makes
itself undumpable: ``RLIMIT_CORE`` 0 (no core file) and ``PR_SET_DUMPABLE`` 0 (no core, and
its /proc files belong to root, so processes of its own uid cannot read its memory); it does
not start if either fails. SIGINT is ignored (a terminal's Ctrl-C reaches the whole
process group; the sidecar decides when the worker stops, by closing the socket).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kustody.api import wire
from kustody.api.errors import HsmError, Reason, from_domain
from kustody.api.health import NOT_YET, Health
from kustody.api.pin import read_pin
from kustody.api.process import die_with_parent, harden
from kustody.api.token import IvPolicy, TokenConfig
from kustody.domain.aad import KmsBinding
from kustody.domain.envelope import MAX_DEK_BYTES, MAX_PLAINTEXT_BYTES, MIN_DEK_BYTES, header_for
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import (
    DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    KeyVersionRef,
    VersionInfo,
    VersionState,
)
from kustody.pkcs11 import capabilities, thread
from kustody.pkcs11.kekstore import KekStore
from kustody.pkcs11.token import TokenLost, TokenSession

log = logging.getLogger(__name__)


def info_wire(info: VersionInfo) -> wire.WireInfo:
    return (
        info.ref.key_ring,
        info.ref.version,
        str(info.state),
        info.fingerprint,
        info.escrowable,
    )


class Token:
    """One token, one logged-in session, reopened when it is lost (on the PKCS#11 thread)."""

    def __init__(
        self,
        config: TokenConfig,
        *,
        retry_interval: float = 1.0,
        min_destroy_delay: float = DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    ) -> None:
        self.config = config
        self.retry_interval = retry_interval
        self.min_destroy_delay = min_destroy_delay
        self.health = NOT_YET
        self._token: TokenSession | None = None
        self.store: KekStore | None = None
        self._last_attempt = float("-inf")
        self._rejected_pin: bytes | None = None
        self._lost = False

    def check(self, *, force: bool) -> Health:
        """Probe the token (reconnecting if it was lost) and return the current health."""
        if self._token is not None:
            try:
                self._token.probe()
            except TokenLost as exc:
                self._lose(str(exc))
        if self.store is None:
            with contextlib.suppress(HsmError):
                self._ensure(force=force)
        return self.health

    def run(self, fn: Callable[[KekStore], Any]) -> Any:
        store = self._ensure(force=False)
        try:
            return fn(store)
        except TokenLost as exc:
            self._lose(str(exc))
            raise HsmError(
                Reason.TOKEN_UNAVAILABLE, "the token stopped answering; reconnecting"
            ) from None

    def _ensure(self, *, force: bool) -> KekStore:
        if self.store is not None:
            return self.store
        now = time.monotonic()
        if force or now - self._last_attempt >= self.retry_interval:
            self._last_attempt = now
            self._connect()
        if self.store is None:
            raise HsmError(Reason.TOKEN_UNAVAILABLE, f"{self.health.reason}: {self.health.message}")
        return self.store

    def _connect(self) -> None:
        try:
            if self.config.pin_file is None:
                raise HsmError(
                    Reason.PIN_FILE_UNREADABLE,
                    "no PIN file: pass --pin-file or set KUSTODY_HSM_PIN_FILE",
                )
            pin = read_pin(self.config.pin_file)
            if pin.digest == self._rejected_pin:
                # Retrying a rejected PIN could lock a real HSM; wait for the file to change.
                return
            token = TokenSession.open(self.config, pin, reinitialize=self._lost)
            try:
                profile = self._profile(token)
                store = KekStore(token, min_destroy_delay=self.min_destroy_delay, profile=profile)
            except (TokenLost, HsmError):
                token.close()
                raise
        except HsmError as exc:
            if exc.reason is Reason.PIN_INCORRECT and self.config.pin_file is not None:
                self._rejected_pin = read_pin(self.config.pin_file).digest
            self._set(Health(False, exc.reason, exc.message))
            return
        except TokenLost as exc:
            self._lost = True
            self._set(Health(False, Reason.TOKEN_LOST, f"the token stopped answering ({exc})"))
            return
        self._token, self.store, self._rejected_pin = token, store, None
        self._set(Health(True, None, f"token {self.config.label!r} is logged in ({profile})"))

    def _profile(self, token: TokenSession) -> capabilities.Profile:
        """Probe what the token can do and pick the profile (TOKEN_INCOMPATIBLE if none)."""
        try:
            policy = IvPolicy(self.config.gcm_iv)
        except ValueError:
            raise HsmError(
                Reason.INVALID_ARGUMENT,
                f"--gcm-iv must be auto or token, not {self.config.gcm_iv!r}",
            ) from None
        report = capabilities.probe(
            token.lib, token.token, token.session, str(self.config.module), policy
        )
        if report.profile is None:
            token.probe()  # a token that vanished mid-probe is TOKEN_LOST, not incompatible
            raise HsmError(
                Reason.TOKEN_INCOMPATIBLE,
                f"{report.verdict} (`kustody hsm probe` prints the whole report)",
            )
        log.info("token %r: capability profile %s", self.config.label, report.profile)
        return report.profile

    def _lose(self, why: str) -> None:
        self.close()
        self._lost = True
        self._last_attempt = float("-inf")
        self._set(Health(False, Reason.TOKEN_LOST, f"the token stopped answering ({why})"))

    def close(self) -> None:
        if self._token is not None:
            self._token.close()
        self._token = self.store = None

    def _set(self, health: Health) -> None:
        if health != self.health:
            if health.serving:
                log.info("HSM token %r is available", self.config.label)
            else:
                log.warning("HSM token %r is unavailable: %s", self.config.label, health.message)
        self.health = health


# -- operations (on the PKCS#11 thread) ------------------------------------------------------


def _error(exc: HsmError | DomainError) -> tuple[str, str]:
    err = exc if isinstance(exc, HsmError) else from_domain(exc)
    return (str(err.reason), err.message)


class _Keys:
    """Per-batch cache: (KeyRing, version or None) -> (ref, key object, header) or the error."""

    def __init__(self, store: KekStore) -> None:
        self._store = store
        self._cache: dict[tuple[str, int | None], tuple[KeyVersionRef, Any, bytes] | HsmError] = {}

    def get(self, key_ring: str, version: int | None) -> tuple[KeyVersionRef, Any, bytes]:
        found = self._cache.get((key_ring, version))
        if found is None:
            try:
                ref = self._store.resolve(key_ring, version)
                found = (ref, self._store.usable_key(ref), header_for(ref))
            except HsmError as exc:
                found = exc
            except DomainError as exc:
                found = from_domain(exc)
            self._cache[(key_ring, version)] = found
        if isinstance(found, HsmError):
            raise found
        return found


def _generate(store: KekStore, items: list[tuple[str, int | None, int, bool, bytes]]) -> list[Any]:
    """nonce ‖ DEK for every item from one C_GenerateRandom (disjoint slices), then one
    C_EncryptInit + C_Encrypt per item. Resolution and key lookup once per version.
    A lost token (TokenLost) aborts the whole batch; other errors are per item."""
    for item in items:
        if not MIN_DEK_BYTES <= item[2] <= MAX_DEK_BYTES:
            raise HsmError(Reason.INVALID_ARGUMENT, f"data key length {item[2]} is out of range")
    keys = _Keys(store)
    nb = store.nonce_bytes  # 0 when the token generates the IVs itself
    rnd = store.random(sum(nb + item[2] for item in items)) if items else b""
    encrypt = store.encrypt
    results: list[Any] = []
    offset = 0
    for ring, version, length, with_plaintext, binding in items:
        end = offset + nb + length
        nonce, dek = rnd[offset : offset + nb], rnd[offset + nb : end]
        offset = end
        try:
            ref, key, header = keys.get(ring, version)
            nonce, sealed = encrypt(key, ref, dek, nonce, header + binding)
            results.append((ref.version, nonce, sealed, dek if with_plaintext else None))
        except (HsmError, DomainError) as exc:
            results.append(_error(exc))
    return results


def _rewrap(
    store: KekStore, items: list[tuple[str, int, bytes, bytes, bytes, int | None]]
) -> list[Any]:
    """Unseal + reseal per item; one C_GenerateRandom for all the new nonces."""
    keys = _Keys(store)
    nb = store.nonce_bytes  # 0 when the token generates the IVs itself
    rnd = store.random(nb * len(items)) if items and nb else b""
    results: list[Any] = []
    for i, (ring, version, old_nonce, old_sealed, binding, to_version) in enumerate(items):
        nonce = rnd[i * nb : (i + 1) * nb]
        try:
            from_ref, from_key, from_header = keys.get(ring, version)
            plaintext = store.decrypt(
                from_key, from_ref, old_nonce, old_sealed, from_header + binding
            )
            ref, key, header = keys.get(ring, to_version)
            nonce, sealed = store.encrypt(key, ref, plaintext, nonce, header + binding)
            results.append((ref.version, nonce, sealed))
        except (HsmError, DomainError) as exc:
            results.append(_error(exc))
    return results


def _decrypt(store: KekStore, items: list[tuple[str, int, bytes, bytes, bytes]]) -> list[Any]:
    """Unseal each item (concurrent Decrypts coalesced by the front end): the plaintext or
    the item's error. Key lookup once per version; a lost token aborts the whole request."""
    keys: dict[tuple[str, int], tuple[KeyVersionRef, Any] | HsmError] = {}
    decrypt = store.decrypt
    results: list[Any] = []
    for ring, version, nonce, sealed, aad in items:
        found = keys.get((ring, version))
        if found is None:
            try:
                ref = KeyVersionRef(ring, version)
                found = (ref, store.usable_key(ref))
            except HsmError as exc:
                found = exc
            except DomainError as exc:
                found = from_domain(exc)
            keys[(ring, version)] = found
        if isinstance(found, HsmError):
            results.append(_error(found))
            continue
        try:
            results.append(decrypt(found[1], found[0], nonce, sealed, aad))
        except HsmError as exc:
            results.append(_error(exc))
    return results


def _seal(
    store: KekStore, ring: str, version: int | None, plaintext: bytes
) -> tuple[wire.WireInfo, bytes, bytes]:
    """Seal a KMS v2 seed, bound to the key_id (which names this version's fingerprint)."""
    if not 0 < len(plaintext) <= MAX_PLAINTEXT_BYTES:
        raise HsmError(Reason.INVALID_ARGUMENT, "plaintext size is out of range")
    ref = store.resolve(ring, version)
    info = store.info(ref)
    binding = KmsBinding(ref.kms_key_id(info.fingerprint)).encode()
    nonce, sealed = store.seal(ref, plaintext, header_for(ref) + binding)
    return info_wire(info), nonce, sealed


def _seal_many(store: KekStore, items: list[tuple[str, int | None, bytes]]) -> list[Any]:
    """KMS v2 seeds that arrived together (coalesced by the front end): per item
    ``(info, nonce, sealed)`` as :func:`_seal` answers, or the item's error. Resolution, the
    version's info, key and AAD once per (KeyRing, version); the nonces from one
    C_GenerateRandom. A lost token aborts the whole request."""
    nb = store.nonce_bytes  # 0 when the token generates the IVs itself
    rnd = store.random(nb * len(items)) if items and nb else b""
    versions: dict[tuple[str, int | None], tuple[Any, Any, bytes, wire.WireInfo] | HsmError] = {}
    encrypt = store.encrypt
    results: list[Any] = []
    for i, (ring, version, plaintext) in enumerate(items):
        if not 0 < len(plaintext) <= MAX_PLAINTEXT_BYTES:
            results.append(
                _error(HsmError(Reason.INVALID_ARGUMENT, "plaintext size is out of range"))
            )
            continue
        found = versions.get((ring, version))
        if found is None:
            try:
                ref = store.resolve(ring, version)
                info = store.info(ref)
                key = store.usable_key(ref)
                aad = header_for(ref) + KmsBinding(ref.kms_key_id(info.fingerprint)).encode()
                found = (ref, key, aad, info_wire(info))
            except HsmError as exc:
                found = exc
            except DomainError as exc:
                found = from_domain(exc)
            versions[(ring, version)] = found
        if isinstance(found, HsmError):
            results.append(_error(found))
            continue
        ref, key, aad, info_on_wire = found
        try:
            nonce, sealed = encrypt(key, ref, plaintext, rnd[i * nb : (i + 1) * nb], aad)
        except HsmError as exc:
            results.append(_error(exc))
            continue
        results.append((info_on_wire, nonce, sealed))
    return results


def _describe(store: KekStore, ring: str) -> tuple[int | None, tuple[wire.WireInfo, ...]]:
    return store.primary(ring), tuple(info_wire(i) for i in store.versions(ring))


def _rescan(store: KekStore) -> None:
    store.scan()


def _dispatch(token: Token, op: int, args: Any) -> Any:
    if op == wire.Op.GENERATE:
        return token.run(lambda s: _generate(s, args))
    if op == wire.Op.REWRAP:
        return token.run(lambda s: _rewrap(s, args))
    if op == wire.Op.DECRYPT:
        return token.run(lambda s: _decrypt(s, args))
    if op == wire.Op.CHECK:
        token.check(force=bool(args[0]))
        return None
    if op == wire.Op.SEAL:
        if isinstance(args, list):  # several seeds: one answer per item (see _seal_many)
            return token.run(lambda s: _seal_many(s, args))
        return token.run(lambda s: _seal(s, *args))
    if op == wire.Op.INFO:
        ring, version = args
        return token.run(lambda s: info_wire(s.info(s.resolve(ring, version))))
    if op == wire.Op.DESCRIBE:
        return token.run(lambda s: _describe(s, args[0]))
    if op == wire.Op.CREATE:
        ref, escrow = KeyVersionRef(args[0], args[1]), bool(args[2:] and args[2])
        return token.run(lambda s: info_wire(s.create(ref, escrow=escrow)))
    if op == wire.Op.EXPORT_ESCROW:
        ref, agent = KeyVersionRef(args[0], args[1]), str(args[2])
        return token.run(lambda s: s.export_escrow(ref, agent))
    if op == wire.Op.AGENT:
        return token.run(lambda s: s.agent_admitted(str(args[0])))
    if op == wire.Op.SET_STATE:
        ref, state = KeyVersionRef(args[0], args[1]), VersionState(args[2])
        return token.run(lambda s: info_wire(s.set_state(ref, state)))
    if op == wire.Op.DESTROY:
        ref = KeyVersionRef(*args)
        return token.run(lambda s: info_wire(s.destroy(ref)))
    if op == wire.Op.RESCAN:
        return token.run(_rescan)
    raise HsmError(Reason.INTERNAL, f"unknown worker operation {op}")


def serve(sock: socket.socket, token: Token) -> None:
    """Answer requests until the front end closes its end of the socket."""
    thread.mark_current()
    reader = sock.makefile("rb", buffering=1 << 16)
    sent_health: Health | None = None
    sent_snapshot: tuple[VersionInfo, ...] | None = None
    while True:
        header = reader.read(wire.HEADER_BYTES)
        if len(header) < wire.HEADER_BYTES:
            return
        size, request_id, op = wire.HEADER.unpack(header)
        if size > wire.MAX_BODY_BYTES:
            # Never read it: answer this request with a typed error and stop; the stream is
            # out of step and the front end restarts the worker when it sees the EOF.
            error = wire.too_large(size, "a request")
            log.error("%s; stopping", error.message)
            answer = (str(error.reason), error.message)
            sock.sendall(wire.frame(request_id, wire.STATUS_ERROR, (answer, None, None)))
            return
        body = reader.read(size)
        if len(body) < size:
            return
        try:
            result = _dispatch(token, op, wire.load(body))
            status = wire.STATUS_OK
        except (HsmError, DomainError) as exc:
            result, status = _error(exc), wire.STATUS_ERROR
        except Exception as exc:  # a bug: say which kind, never the text (it could hold data)
            log.exception("worker operation %s failed", op)
            result = (str(Reason.INTERNAL), f"internal error ({type(exc).__name__})")
            status = wire.STATUS_ERROR
        health = token.health
        store = token.store
        snapshot = store.snapshot if store is not None else ()
        update_health = None
        if health is not sent_health or op == wire.Op.CHECK:
            update_health, sent_health = health.to_wire(), health
        update_snapshot = None
        if snapshot is not sent_snapshot:
            update_snapshot = tuple(info_wire(i) for i in snapshot)
            sent_snapshot = snapshot
        try:
            data = wire.frame(request_id, status, (result, update_health, update_snapshot))
        except HsmError as exc:  # an answer over the frame limit: say so instead
            data = wire.frame(
                request_id, wire.STATUS_ERROR, ((str(exc.reason), exc.message), None, None)
            )
            sent_health = sent_snapshot = None  # send both again with the next answer
        sock.sendall(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kustody.pkcs11.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--module", type=Path, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--pin-file", type=Path)
    parser.add_argument("--retry-interval", type=float, default=1.0)
    parser.add_argument(
        "--min-destroy-delay", type=float, default=DEFAULT_MIN_DESTROY_DELAY_SECONDS
    )
    parser.add_argument("--gcm-iv", default="auto", choices=[p.value for p in IvPolicy])
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        harden()
    except OSError as exc:
        print(f"kustody.pkcs11.worker: cannot disable core dumps: {exc}", file=sys.stderr)
        return 3
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.fd)
    token = Token(
        TokenConfig(args.module, args.label, args.pin_file, gcm_iv=args.gcm_iv),
        retry_interval=args.retry_interval,
        min_destroy_delay=args.min_destroy_delay,
    )
    try:
        serve(sock, token)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        token.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
