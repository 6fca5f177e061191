"""KEK versions inside the token: create, seal, unseal, disable, schedule, destroy.

Thread-confined (PKCS#11 thread). What is on the token is the truth; this class caches key
handles (SoftHSM2 re-reads its files on every object search) and rebuilds the cache by scanning
whenever the session is (re)opened.

Durable state on the token:

* ENABLED  — the AES key object has CKA_ENCRYPT and CKA_DECRYPT true.
* DISABLED — both false (the token itself then refuses to use the key); a mix counts as
  DISABLED, so an interrupted enable/disable is never more permissive than intended.
* DESTROY_SCHEDULED — DISABLED, plus a data object (CKA_APPLICATION
  ``kustody-destroy-scheduled``, same label) whose value is the time (Unix seconds, ASCII) the
  destruction was scheduled. DESTROYED is reachable only from here, and only once the
  sidecar's minimum waiting period has passed since that time. Scheduling disables the key
  first and then writes the record; cancelling (ENABLED or DISABLED) deletes the record first:
  an interrupted change reads as DISABLED, never as scheduled earlier than it was.
* DESTROYED — a tombstone data object (CKA_APPLICATION ``kustody-tombstone``, same label) and no
  key. The tombstone is written before the key is deleted; a scan that finds both finishes
  the interrupted destruction. A destroyed version number is never created again.

Only keys that are what a Kustody KEK claims to be are used: AES, 32 bytes, generated in the
token (CKA_LOCAL), never extractable, sensitive, and unable to wrap or unwrap. Any other
object under a KEK version's label and ID (e.g. planted by another user of a shared HSM
partition) is refused with ``KEY_NOT_TRUSTED`` by every operation that would adopt, describe
or use it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams

from kustody.domain.duration import format_duration
from kustody.domain.envelope import NONCE_BYTES, TAG_BYTES
from kustody.domain.keyversion import (
    DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    KeyVersionRef,
    VersionInfo,
    VersionState,
    parse_label,
    primary_version,
)
from kustody.hsm import thread
from kustody.hsm.errors import HsmError, Reason
from kustody.hsm.token import TokenLost, TokenSession, classify

log = logging.getLogger(__name__)

TOMBSTONE_APPLICATION = "kustody-tombstone"
SCHEDULE_APPLICATION = "kustody-destroy-scheduled"
KEK_BYTES = 32
_AUTH_FAILED = (p11.GeneralError, p11.EncryptedDataInvalid, p11.EncryptedDataLenRange)
_GCM = Mechanism.AES_GCM
_TAG_BITS = TAG_BYTES * 8


@dataclass
class _Record:
    info: VersionInfo
    key: Any | None
    untrusted: str | None = None  # why the key object is not one Kustody generated


def _translate(exc: p11.PKCS11Error, action: str) -> Exception:
    reason = classify(exc)
    if reason is Reason.TOKEN_LOST:
        return TokenLost(type(exc).__name__)
    if reason is Reason.TOKEN_FULL:
        return HsmError(Reason.TOKEN_FULL, f"{action}: the token has no room left")
    return HsmError(Reason.INTERNAL, f"{action} failed ({type(exc).__name__})")


@contextmanager
def _pkcs11_errors(action: str) -> Iterator[None]:
    try:
        yield
    except p11.PKCS11Error as exc:
        raise _translate(exc, action) from None


def _fingerprint(key: Any) -> str:
    """Key check value: CKA_CHECK_VALUE, i.e. the first 3 bytes of AES-ECB(K, 0^128)."""
    try:
        return bytes(key[Attribute.CHECK_VALUE]).hex()
    except p11.PKCS11Error:
        pass
    try:
        return bytes(key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)[:3]).hex()
    except p11.PKCS11Error:
        return ""


def _state_of(key: Any, scheduled: float | None = None) -> VersionState:
    if key[Attribute.ENCRYPT] and key[Attribute.DECRYPT]:
        return VersionState.ENABLED  # a schedule record next to an enabled key is stale
    return VersionState.DISABLED if scheduled is None else VersionState.DESTROY_SCHEDULED


# What a KEK Kustody generated is: (attribute, required value, its PKCS#11 name).
_TRUSTED = (
    (Attribute.KEY_TYPE, KeyType.AES, "CKA_KEY_TYPE"),
    (Attribute.VALUE_LEN, KEK_BYTES, "CKA_VALUE_LEN"),
    (Attribute.LOCAL, True, "CKA_LOCAL"),
    (Attribute.NEVER_EXTRACTABLE, True, "CKA_NEVER_EXTRACTABLE"),
    (Attribute.SENSITIVE, True, "CKA_SENSITIVE"),
    (Attribute.EXTRACTABLE, False, "CKA_EXTRACTABLE"),
    (Attribute.WRAP, False, "CKA_WRAP"),
    (Attribute.UNWRAP, False, "CKA_UNWRAP"),
)


def _distrust(key: Any) -> str | None:
    """None for a key Kustody would have generated, else which attribute says otherwise.

    Reads only public attributes (never CKA_VALUE); the text names attributes and their
    required values, nothing about the key's material."""
    for attribute, want, name in _TRUSTED:
        try:
            value = key[attribute]
        except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
            return f"{name} cannot be read"
        if isinstance(want, bool):
            if bool(value) is not want:
                return f"{name} is {str(bool(value)).lower()}, must be {str(want).lower()}"
        elif value != want:
            shown = want.name if isinstance(want, KeyType) else want
            return f"{name} is not {shown}"
    return None


def _not_trusted(ref: KeyVersionRef, why: str) -> HsmError:
    return HsmError(
        Reason.KEY_NOT_TRUSTED,
        f"KEK version {ref}: the token object labelled {ref.label!r} is not a key Kustody "
        f"generated ({why}); it is not used. Remove it from the token or use another version",
    )


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KekStore:
    def __init__(
        self, token: TokenSession, *, min_destroy_delay: float = DEFAULT_MIN_DESTROY_DELAY_SECONDS
    ) -> None:
        self._token = token
        self.min_destroy_delay = min_destroy_delay
        self._rings: dict[str, dict[int, _Record]] = {}
        self.snapshot: tuple[VersionInfo, ...] = ()
        self.scan()

    @property
    def _session(self) -> Any:
        return self._token.session

    # -- inventory -------------------------------------------------------------------------

    def scan(self) -> None:
        thread.assert_on_thread()
        rings: dict[str, dict[int, _Record]] = {}
        with _pkcs11_errors("scanning the token"):
            schedules = self._schedules(None)
            for key in self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                ref = parse_label(key.label)
                if ref is None or bytes(key.id) != ref.object_id:
                    continue
                scheduled = _latest(schedules.get(ref.label, []))
                info = VersionInfo(ref, _state_of(key, scheduled), _fingerprint(key))
                rings.setdefault(ref.key_ring, {})[ref.version] = _Record(info, key, _distrust(key))
            tombstones = self._session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: TOMBSTONE_APPLICATION}
            )
            for obj in tombstones:
                ref = parse_label(obj[Attribute.LABEL])
                if ref is None:
                    continue
                versions = rings.setdefault(ref.key_ring, {})
                old = versions.get(ref.version)
                if old is not None and old.key is not None:
                    log.warning("finishing the interrupted destruction of %s", ref)
                    old.key.destroy()
                for record in schedules.get(ref.label, []):
                    record.destroy()
                fingerprint = bytes(obj[Attribute.VALUE]).decode("ascii", "replace")
                versions[ref.version] = _Record(
                    VersionInfo(ref, VersionState.DESTROYED, fingerprint), None
                )
        self._rings = rings
        self._publish()

    def _publish(self) -> None:
        self.snapshot = tuple(rec.info for ring in self._rings.values() for rec in ring.values())

    def versions(self, key_ring: str) -> list[VersionInfo]:
        """Every version of the KeyRing; KEY_NOT_TRUSTED if any of them is not our key."""
        ring = self._rings.get(key_ring, {})
        for v in sorted(ring):
            self._trusted(ring[v])
        return [ring[v].info for v in sorted(ring)]

    def primary(self, key_ring: str) -> int | None:
        ring = self._rings.get(key_ring, {})
        return primary_version({v: rec.info.state for v, rec in ring.items()})

    def resolve(self, key_ring: str, version: int | None) -> KeyVersionRef:
        """``version``, or the primary version when None."""
        if version is not None:
            return KeyVersionRef(key_ring, version)
        primary = self.primary(key_ring)
        if primary is None:
            raise HsmError(Reason.NO_PRIMARY_VERSION, f"KeyRing {key_ring} has no ENABLED version")
        return KeyVersionRef(key_ring, primary)

    def info(self, ref: KeyVersionRef) -> VersionInfo:
        return self._trusted(self._record(ref)).info

    def _record(self, ref: KeyVersionRef) -> _Record:
        rec = self._rings.get(ref.key_ring, {}).get(ref.version)
        if rec is None:
            raise HsmError(Reason.VERSION_NOT_FOUND, f"KEK version {ref} does not exist")
        return rec

    @staticmethod
    def _trusted(rec: _Record) -> _Record:
        if rec.untrusted is not None:
            raise _not_trusted(rec.info.ref, rec.untrusted)
        return rec

    def _usable_key(self, ref: KeyVersionRef) -> Any:
        rec = self._trusted(self._record(ref))
        if rec.info.state is VersionState.DESTROYED or rec.key is None:
            raise HsmError(Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed")
        if rec.info.state is VersionState.DISABLED:
            raise HsmError(Reason.VERSION_DISABLED, f"KEK version {ref} is disabled")
        if rec.info.state is VersionState.DESTROY_SCHEDULED:
            raise HsmError(
                Reason.VERSION_DISABLED,
                f"KEK version {ref} is disabled (its destruction is scheduled)",
            )
        return rec.key

    def _find_key(self, ref: KeyVersionRef) -> Any | None:
        found = list(
            self._session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: ref.object_id}
            )
        )
        if len(found) > 1:
            log.warning("token holds %d objects for %s; using the first", len(found), ref)
        return found[0] if found else None

    def _schedules(self, ref: KeyVersionRef | None) -> dict[str, list[Any]]:
        """Destroy-schedule records on the token by label (of ``ref`` only, or all)."""
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: SCHEDULE_APPLICATION,
        }
        if ref is not None:
            template[Attribute.LABEL] = ref.label
        found: dict[str, list[Any]] = {}
        for obj in self._session.get_objects(template):
            found.setdefault(str(obj[Attribute.LABEL]), []).append(obj)
        return found

    # -- lifecycle -------------------------------------------------------------------------

    def create(self, ref: KeyVersionRef) -> VersionInfo:
        """Create the version's KEK unless the token already has it (idempotent)."""
        thread.assert_on_thread()
        # An empty search on a vanished token looks like "no such key": check it answers.
        self._token.probe()
        with _pkcs11_errors(f"creating KEK version {ref}"):
            tomb = list(
                self._session.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.DATA,
                        Attribute.APPLICATION: TOMBSTONE_APPLICATION,
                        Attribute.LABEL: ref.label,
                    }
                )
            )
            if tomb:
                self.scan()
                raise HsmError(
                    Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed; use a new version"
                )
            key = self._find_key(ref)
            if key is None:
                key = self._session.generate_key(
                    KeyType.AES,
                    256,
                    id=ref.object_id,
                    label=ref.label,
                    store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.ENCRYPT: True,
                        Attribute.DECRYPT: True,
                        Attribute.SIGN: False,
                        Attribute.VERIFY: False,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
                log.info("created KEK version %s", ref)
            untrusted = _distrust(key)
            scheduled = _latest(self._schedules(ref).get(ref.label, []))
            info = VersionInfo(ref, _state_of(key, scheduled), _fingerprint(key))
        self._rings.setdefault(ref.key_ring, {})[ref.version] = _Record(info, key, untrusted)
        self._publish()
        if untrusted is not None:
            log.error("refusing to adopt the token object for %s: %s", ref, untrusted)
            raise _not_trusted(ref, untrusted)
        return info

    def set_state(self, ref: KeyVersionRef, state: VersionState) -> VersionInfo:
        """ENABLED or DISABLED (either cancels a scheduled destruction), or DESTROY_SCHEDULED
        (disables the key and records when; scheduling again keeps the first time)."""
        thread.assert_on_thread()
        allowed = (VersionState.ENABLED, VersionState.DISABLED, VersionState.DESTROY_SCHEDULED)
        if state not in allowed:
            raise HsmError(
                Reason.INVALID_ARGUMENT, "the state must be ENABLED, DISABLED or DESTROY_SCHEDULED"
            )
        rec = self._trusted(self._record(ref))
        if rec.key is None:
            raise HsmError(Reason.VERSION_DESTROYED, f"KEK version {ref} was destroyed")
        enabled = state is VersionState.ENABLED
        with _pkcs11_errors(f"setting {ref} {state}"):
            records = self._schedules(ref).get(ref.label, [])
            if state is not VersionState.DESTROY_SCHEDULED:
                for record in records:  # cancel first: half-done reads as DISABLED
                    record.destroy()
                records = []
            # Decrypt first when disabling, encrypt first when enabling: a half-done change is
            # read back as DISABLED either way.
            order = (Attribute.ENCRYPT, Attribute.DECRYPT)
            for attribute in order if enabled else reversed(order):
                rec.key[attribute] = enabled
            if state is VersionState.DESTROY_SCHEDULED and not records:
                records = [
                    self._session.create_object(
                        {
                            Attribute.CLASS: ObjectClass.DATA,
                            Attribute.TOKEN: True,
                            Attribute.PRIVATE: True,
                            Attribute.LABEL: ref.label,
                            Attribute.APPLICATION: SCHEDULE_APPLICATION,
                            Attribute.VALUE: str(int(time.time())).encode("ascii"),
                        }
                    )
                ]
            # python-pkcs11 picks a key object's methods (encrypt/decrypt) from its attributes
            # when it is fetched, so fetch it again after changing them.
            rec.key = self._find_key(ref) or rec.key
            actual = _state_of(rec.key, _latest(records))
            rec.untrusted = _distrust(rec.key)
        rec.info = VersionInfo(ref, actual, rec.info.fingerprint)
        self._publish()
        if actual is not state:
            raise HsmError(Reason.INTERNAL, f"the token did not record {ref} as {state}")
        log.info("KEK version %s is now %s", ref, state)
        return rec.info

    def destroy(self, ref: KeyVersionRef) -> VersionInfo:
        """Tombstone and delete the KEK; only once it has been DESTROY_SCHEDULED (as the token
        records) for at least :attr:`min_destroy_delay` seconds."""
        thread.assert_on_thread()
        rec = self._record(ref)
        if rec.info.state is VersionState.DESTROYED:
            return rec.info
        self._trusted(rec)
        if rec.info.state is VersionState.ENABLED:
            raise HsmError(
                Reason.VERSION_NOT_DISABLED,
                f"KEK version {ref} is ENABLED; schedule its destruction first",
            )
        with _pkcs11_errors(f"destroying {ref}"):
            records = self._schedules(ref).get(ref.label, [])
            self._check_due(ref, _latest(records))
            self._session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: ref.label,
                    Attribute.APPLICATION: TOMBSTONE_APPLICATION,
                    Attribute.VALUE: rec.info.fingerprint.encode("ascii"),
                }
            )
            assert rec.key is not None
            rec.key.destroy()
            for record in records:
                record.destroy()
        rec.key = None
        rec.info = VersionInfo(ref, VersionState.DESTROYED, rec.info.fingerprint)
        self._publish()
        log.info("destroyed KEK version %s", ref)
        return rec.info

    def _check_due(self, ref: KeyVersionRef, scheduled: float | None) -> None:
        wait = format_duration(dt.timedelta(seconds=self.min_destroy_delay))
        if scheduled is None:
            raise HsmError(
                Reason.DESTRUCTION_NOT_DUE,
                f"KEK version {ref} is not scheduled for destruction: set it DESTROY_SCHEDULED "
                f"and destroy it after the waiting period ({wait})",
            )
        due = scheduled + self.min_destroy_delay
        if time.time() < due:
            raise HsmError(
                Reason.DESTRUCTION_NOT_DUE,
                f"KEK version {ref} was scheduled for destruction at {_when(scheduled)}; it may "
                f"be destroyed from {_when(due)} (waiting period {wait})",
            )

    # -- crypto ----------------------------------------------------------------------------
    #
    # The batch paths call the primitives below once per item with no other per-item PKCS#11
    # work: the key handle is looked up once per version per batch (usable_key), and nonces
    # (and DEKs) for the whole batch come from one C_GenerateRandom (random), split into
    # disjoint slices, so every seal still gets its own 12 fresh bytes from the token RNG.

    def random(self, nbytes: int) -> bytes:
        """``nbytes`` from the token RNG (one C_GenerateRandom)."""
        with _pkcs11_errors("reading the token RNG"):
            return bytes(self._session.generate_random(nbytes * 8))

    def usable_key(self, ref: KeyVersionRef) -> Any:
        """The key object of an ENABLED version, or the HsmError saying why not."""
        return self._usable_key(ref)

    @staticmethod
    def encrypt(key: Any, ref: KeyVersionRef, plaintext: bytes, nonce: bytes, aad: bytes) -> bytes:
        """AES-256-GCM seal with a caller-supplied token-RNG nonce: ciphertext ‖ tag."""
        try:
            sealed: bytes = key.encrypt(
                plaintext, mechanism=_GCM, mechanism_param=GCMParams(nonce, aad, _TAG_BITS)
            )
        except p11.PKCS11Error as exc:
            raise _translate(exc, f"sealing under {ref}") from None
        return sealed

    def decrypt(
        self, key: Any, ref: KeyVersionRef, nonce: bytes, sealed: bytes, aad: bytes
    ) -> bytes:
        try:
            plaintext: bytes = key.decrypt(
                sealed, mechanism=_GCM, mechanism_param=GCMParams(nonce, aad, _TAG_BITS)
            )
        except _AUTH_FAILED:
            # SoftHSM2 reports a failed GCM tag as CKR_GENERAL_ERROR; make sure it was the tag
            # and not the token before calling it an authentication failure.
            self._token.probe()
            raise HsmError(
                Reason.AAD_MISMATCH,
                f"the wrapped key does not authenticate under {ref} for this binding "
                "(wrong namespace, name or encryptionContext, or altered ciphertext)",
            ) from None
        except p11.PKCS11Error as exc:
            raise _translate(exc, f"unsealing under {ref}") from None
        return plaintext

    def seal(self, ref: KeyVersionRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM in the token under ``ref``: (nonce, ciphertext ‖ tag)."""
        key = self._usable_key(ref)
        nonce = self.random(NONCE_BYTES)
        return nonce, self.encrypt(key, ref, plaintext, nonce, aad)


def _latest(records: list[Any]) -> float | None:
    """The latest scheduling time among a version's schedule records (normally one); None when
    there is none. An unreadable value counts as now: never due sooner than recorded."""
    times: list[float] = []
    for record in records:
        try:
            times.append(float(int(bytes(record[Attribute.VALUE]).decode("ascii"))))
        except (ValueError, UnicodeDecodeError, p11.PKCS11Error):
            times.append(time.time())
    return max(times, default=None)
