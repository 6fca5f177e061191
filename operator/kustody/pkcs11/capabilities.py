"""What a token can do — asked, not assumed — and the profile the worker runs with.

At every (re)connect the PKCS#11 worker calls :func:`probe` on its logged-in session, and
``kustody hsm probe`` prints the same report. The probes use ``C_GetMechanismInfo`` and a
scratch *session* key made with the KEK template (``CKA_TOKEN`` false: nothing is left on the
token if the process dies half-way), plus one scratch data object on the token (created and
deleted) because tombstones and destruction schedules are token data objects.

The profile has three choices:

``iv`` — where AES-GCM nonces come from
    ``caller``: 12 bytes from ``C_GenerateRandom`` passed in ``CK_GCM_PARAMS`` (SoftHSM2,
    Kryoptic). ``token``: the token generates them — PKCS#11 3.0 message-based encryption
    (``C_MessageEncryptInit``/``C_EncryptMessage`` with ``CK_GCM_MESSAGE_PARAMS.ivGenerator =
    CKG_GENERATE_RANDOM``), which the token answers with the IV it chose. FIPS 140-3 modules
    commonly refuse caller IVs for encryption (SP 800-38D §8.2); ``--gcm-iv token`` (policy
    ``fips``) insists on this path and refuses to serve where it is not available. Both produce
    the same AES-256-GCM (96-bit IV, 128-bit tag), so envelopes written under one profile open
    under the other and on any token holding the same keys: decryption always takes the IV
    from the envelope.

    There is deliberately no non-GCM fallback: a token without AES-GCM (e.g. Debian's
    opencryptoki 3.8 soft token, which has AES-CBC and HMAC but no GCM) is reported as
    unusable. Composing CBC + HMAC would need a second key per version and a second envelope
    algorithm that every other token then has to support; AES-GCM is in every HSM listed in
    docs/hsm.md.

``disable`` — how a version is disabled
    ``attributes``: ``CKA_ENCRYPT``/``CKA_DECRYPT`` set false with ``C_SetAttributeValue`` and
    the token itself refuses the key (probed: flip on the scratch key, check the token refuses
    to encrypt, flip back). ``record``: tokens where those attributes are read-only after
    creation; a state data object (``CKA_APPLICATION`` ``kustody-disabled``) on the token
    records it and the sidecar refuses to use the key.

``fingerprint`` — how the key check value is computed
    ``check-value``: ``CKA_CHECK_VALUE`` (PKCS#11 3.0). ``aes-ecb``: the same value computed,
    the first 3 bytes of AES-ECB(K, 0^128); since that needs ``CKA_ENCRYPT``, the value is
    also kept in a data object (``kustody-fingerprint``) so a disabled key still shows it.
    Both give the same value for the same key, so fingerprints agree across tokens.

Thread-confined like the rest of the worker (the PKCS#11 thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams

from kustody.api.pin import Pin
from kustody.api.token import IvPolicy
from kustody.pkcs11.templates import KEK_TEMPLATE

NONCE_BYTES = 12
TAG_BYTES = 16
_PROBE_LABEL = "kustody-probe"
_CKG_GENERATE_RANDOM = 3
_CKM_AES_GCM = 0x1087
_CKR_OK = 0


class IvSource(enum.StrEnum):
    CALLER = "caller"
    TOKEN = "token"  # noqa: S105 (a mode, not a secret)


class DisableBy(enum.StrEnum):
    ATTRIBUTES = "attributes"
    RECORD = "record"


class FingerprintBy(enum.StrEnum):
    CHECK_VALUE = "check-value"
    AES_ECB = "aes-ecb"
    NONE = "none"


@dataclass(frozen=True)
class Profile:
    iv: IvSource
    disable: DisableBy
    fingerprint: FingerprintBy

    def __str__(self) -> str:
        return f"gcm-iv={self.iv} disable={self.disable} fingerprint={self.fingerprint}"


DEFAULT_PROFILE = Profile(IvSource.CALLER, DisableBy.ATTRIBUTES, FingerprintBy.CHECK_VALUE)


@dataclass(frozen=True)
class ProbeResult:
    name: str
    ok: bool
    detail: str
    required: bool = False


@dataclass
class Report:
    module: str
    library: dict[str, str] = field(default_factory=dict)
    token: dict[str, str] = field(default_factory=dict)
    mechanisms: list[dict[str, Any]] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    policy: str = IvPolicy.AUTO.value
    profile: Profile | None = None
    thread_model: str = ""
    verdict: str = ""

    @property
    def ok(self) -> bool:
        return self.profile is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = (
            None
            if self.profile is None
            else {
                "iv": str(self.profile.iv),
                "disable": str(self.profile.disable),
                "fingerprint": str(self.profile.fingerprint),
            }
        )
        data["ok"] = self.ok
        return data

    def add(self, name: str, ok: bool, detail: str, *, required: bool = False) -> bool:
        self.probes.append(ProbeResult(name, ok, detail, required))
        return ok

    def result(self, name: str) -> bool:
        return any(p.ok for p in self.probes if p.name == name)


THREAD_MODEL = (
    "one PKCS#11 worker process per sidecar; every call on its single PKCS#11 thread with one "
    "logged-in R/W session (python-pkcs11 calls C_Initialize without locking callbacks, so "
    "the module is never called concurrently)"
)

# Mechanisms Kustody uses: (mechanism, what for, required flags, required?).
_MECHANISMS = (
    (Mechanism.AES_KEY_GEN, "KEK generation (AES-256, in the token)", MechanismFlag.GENERATE,
     True),
    (Mechanism.AES_GCM, "sealing DEKs and KMS seeds (AES-256-GCM)",
     MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT, True),
    (Mechanism.AES_ECB, "key check value when CKA_CHECK_VALUE is missing",
     MechanismFlag.ENCRYPT, False),
)  # fmt: skip


def _err(exc: BaseException) -> str:
    return type(exc).__name__


def describe_library(lib: Any, report: Report) -> None:
    report.library = {
        "manufacturer": str(lib.manufacturer_id).strip(),
        "description": str(lib.library_description).strip(),
        "library_version": ".".join(str(v) for v in lib.library_version),
        "cryptoki_version": ".".join(str(v) for v in lib.cryptoki_version),
    }


def describe_token(token: Any, report: Report) -> None:
    report.token = {
        "label": str(token.label).strip(),
        "manufacturer": str(token.manufacturer_id).strip(),
        "model": str(token.model).strip(),
        "serial": str(token.serial.decode() if isinstance(token.serial, bytes)
                      else token.serial).strip(),
        "flags": f"0x{int(token.flags):x}",
    }  # fmt: skip


def _mechanisms(slot: Any, report: Report) -> None:
    try:
        available = set(slot.get_mechanisms())
    except p11.PKCS11Error as exc:
        report.add("C_GetMechanismList", False, _err(exc), required=True)
        available = set()
    for mech, purpose, flags, required in _MECHANISMS:
        entry: dict[str, Any] = {"mechanism": f"CKM_{mech.name}", "purpose": purpose,
                                 "required": required}  # fmt: skip
        ok = False
        if mech in available:
            try:
                info = slot.get_mechanism_info(mech)
                entry["flags"] = str(info.flags)
                entry["key_sizes"] = [info.min_key_length, info.max_key_length]
                ok = (info.flags & flags) == flags
                if mech is Mechanism.AES_KEY_GEN:
                    # AES sizes are in bytes (some modules report bits).
                    ok = ok and (
                        info.min_key_length <= 32 <= info.max_key_length
                        or info.min_key_length <= 256 <= info.max_key_length
                    )
            except p11.PKCS11Error as exc:
                entry["error"] = _err(exc)
        else:
            entry["error"] = "not in C_GetMechanismList"
        entry["ok"] = ok
        report.mechanisms.append(entry)
        report.add(f"mechanism CKM_{mech.name}", ok,
                   purpose if ok else f"{purpose}: {entry.get('error', 'flags missing')}",
                   required=required)  # fmt: skip


# -- PKCS#11 3.0 message-based AES-GCM with a token-generated IV (ctypes) ---------------------


class _Mech(ctypes.Structure):
    _fields_ = [("mechanism", ctypes.c_ulong), ("pParameter", ctypes.c_void_p),
                ("ulParameterLen", ctypes.c_ulong)]  # fmt: skip


class _GcmMessageParams(ctypes.Structure):
    _fields_ = [
        ("pIv", ctypes.c_void_p), ("ulIvLen", ctypes.c_ulong), ("ulIvFixedBits", ctypes.c_ulong),
        ("ivGenerator", ctypes.c_ulong), ("pTag", ctypes.c_void_p), ("ulTagBits", ctypes.c_ulong),
    ]  # fmt: skip


# CK_FUNCTION_LIST_3_0: CK_VERSION, the 68 functions of 2.40 (C_Initialize ... C_WaitForSlotEvent),
# then C_GetInterfaceList, C_GetInterface, C_LoginUser, C_SessionCancel, C_MessageEncryptInit,
# C_EncryptMessage, C_EncryptMessageBegin, C_EncryptMessageNext, C_MessageEncryptFinal, ...
_V2_FUNCTIONS = 68
_MESSAGE_ENCRYPT_INIT = 72
_ENCRYPT_MESSAGE = 73
_MESSAGE_ENCRYPT_FINAL = 76
_ulong = ctypes.c_ulong
_INIT = ctypes.CFUNCTYPE(_ulong, _ulong, ctypes.c_void_p, _ulong)
_ENCRYPT = ctypes.CFUNCTYPE(
    _ulong, _ulong, ctypes.c_void_p, _ulong, ctypes.c_char_p, _ulong, ctypes.c_char_p, _ulong,
    ctypes.c_void_p, ctypes.POINTER(_ulong),
)  # fmt: skip
_FINAL = ctypes.CFUNCTYPE(_ulong, _ulong)


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _Interface(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("functions", ctypes.c_void_p), ("flags", _ulong)]


def _functions_3_0(lib: ctypes.CDLL) -> Any:
    """The module's CK_FUNCTION_LIST_3_0 as an array of function pointers, or None."""
    get_interface = getattr(lib, "C_GetInterface", None)
    if get_interface is None:
        return None
    get_interface.restype = _ulong
    interface = ctypes.POINTER(_Interface)()
    version = _Version(3, 0)
    rv = get_interface(b"PKCS 11", ctypes.byref(version), ctypes.byref(interface), _ulong(0))
    if rv != _CKR_OK or not interface or not interface.contents.functions:
        return None
    base = int(interface.contents.functions)
    if ctypes.cast(base, ctypes.POINTER(_Version)).contents.major < 3:
        return None
    pointers = ctypes.cast(base + ctypes.sizeof(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p))
    # Check the layout: the 2.40 part must be the module's CK_FUNCTION_LIST, and the 3.0 part
    # filled in up to C_MessageEncryptFinal.
    get_list = getattr(lib, "C_GetFunctionList", None)
    table = ctypes.c_void_p()
    if get_list is None:
        return None
    get_list.restype = _ulong
    if get_list(ctypes.byref(table)) != _CKR_OK or not table.value:
        return None
    plain = ctypes.cast(
        table.value + ctypes.sizeof(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)
    )
    if any(pointers[i] != plain[i] for i in range(_V2_FUNCTIONS)):
        return None
    if not all(pointers[i] for i in range(_V2_FUNCTIONS, _MESSAGE_ENCRYPT_FINAL + 1)):
        return None
    return pointers


class TokenIvUnsupported(Exception):
    """The module has no PKCS#11 3.0 message-based encryption."""


class MessageGcm:
    """AES-GCM encryption where the token chooses the IV (C_EncryptMessage, PKCS#11 3.0).

    Calls the module's PKCS#11 3.0 functions — from its ``C_GetInterface("PKCS 11", 3.0)``
    function list (Kryoptic exports only C_GetFunctionList/C_GetInterface*), else exported
    symbols — on python-pkcs11's own session and key handles (the same loaded library, so the
    same state). Each :meth:`encrypt` is one C_MessageEncryptInit, C_EncryptMessage,
    C_MessageEncryptFinal: no message operation stays open on a key between calls (a key
    disabled later is never used through an open one)."""

    def __init__(self, module: str) -> None:
        try:
            lib = ctypes.CDLL(module)
        except OSError as exc:
            raise TokenIvUnsupported(f"the module cannot be loaded ({_err(exc)})") from None
        functions = _functions_3_0(lib)
        if functions is None:
            raise TokenIvUnsupported("no PKCS#11 3.0 interface (C_GetInterface) in the module")
        self._init = _INIT(functions[_MESSAGE_ENCRYPT_INIT])
        self._encrypt = _ENCRYPT(functions[_ENCRYPT_MESSAGE])
        self._final = _FINAL(functions[_MESSAGE_ENCRYPT_FINAL])

    def encrypt(self, session: Any, key: Any, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """(the 12-byte IV the token chose, ciphertext ‖ 16-byte tag)."""
        handle = ctypes.c_ulong(int(session.handle))
        mech = _Mech(_CKM_AES_GCM, None, 0)
        rv = self._init(handle, ctypes.byref(mech), ctypes.c_ulong(int(key.handle)))
        if rv != _CKR_OK:
            raise _ckr(rv, "C_MessageEncryptInit")
        try:
            iv = ctypes.create_string_buffer(NONCE_BYTES)
            tag = ctypes.create_string_buffer(TAG_BYTES)
            params = _GcmMessageParams(
                ctypes.cast(iv, ctypes.c_void_p), NONCE_BYTES, 0, _CKG_GENERATE_RANDOM,
                ctypes.cast(tag, ctypes.c_void_p), TAG_BYTES * 8,
            )  # fmt: skip
            out = ctypes.create_string_buffer(max(len(plaintext), 1))
            out_len = ctypes.c_ulong(len(out))
            rv = self._encrypt(
                handle, ctypes.byref(params), ctypes.c_ulong(ctypes.sizeof(params)),
                aad, ctypes.c_ulong(len(aad)), plaintext, ctypes.c_ulong(len(plaintext)),
                out, ctypes.byref(out_len),
            )  # fmt: skip
            if rv != _CKR_OK:
                raise _ckr(rv, "C_EncryptMessage")
            return iv.raw, out.raw[: out_len.value] + tag.raw
        finally:
            self._final(handle)


_CKR = {
    0x02: p11.HostMemory,
    0x06: p11.FunctionFailed,
    0x07: p11.ArgumentsBad,
    0x30: p11.DeviceError,
    0x31: p11.DeviceMemory,
    0x32: p11.DeviceRemoved,
    0x54: p11.FunctionNotSupported,
    0x60: p11.KeyHandleInvalid,
    0x70: p11.MechanismInvalid,
    0x71: p11.MechanismParamInvalid,
    0x90: p11.OperationActive,
    0xB3: p11.SessionHandleInvalid,
    0x101: p11.UserNotLoggedIn,
}


def _ckr(rv: int, call: str) -> p11.PKCS11Error:
    """The python-pkcs11 exception type for a CK_RV, so callers classify it like any other."""
    return _CKR.get(rv, p11.GeneralError)(f"{call}: CKR 0x{rv:x}")


# -- probes on a scratch session key ---------------------------------------------------------


def _scratch_key(session: Any) -> Any:
    return session.generate_key(
        KeyType.AES,
        256,
        label=_PROBE_LABEL,
        store=False,
        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        template={**KEK_TEMPLATE, Attribute.TOKEN: False},  # a session object
    )


def _find(session: Any, key: Any) -> Any:
    # python-pkcs11 fixes a key object's methods when fetched: fetch it again after a change.
    return next(
        iter(
            session.get_objects(
                {Attribute.LABEL: _PROBE_LABEL, Attribute.CLASS: ObjectClass.SECRET_KEY}
            )
        ),
        key,
    )


def _gcm_roundtrip(key: Any, nonce: bytes, sealed: bytes, plaintext: bytes, aad: bytes) -> str:
    """'' when ``sealed`` opens to ``plaintext`` and a changed AAD is refused, else why not."""
    params = GCMParams(nonce, aad, TAG_BYTES * 8)
    if key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params) != plaintext:
        return "decryption returned other bytes"
    try:
        key.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad + b"x", TAG_BYTES * 8))  # fmt: skip
    except p11.PKCS11Error:
        return ""
    return "a changed AAD was not refused"


def probe(
    lib: Any, token: Any, session: Any, module: str, policy: IvPolicy = IvPolicy.AUTO
) -> Report:
    """Every probe on the logged-in ``session`` of ``token`` and the profile chosen."""
    report = Report(module=module, policy=str(policy), thread_model=THREAD_MODEL)
    describe_library(lib, report)
    describe_token(token, report)
    _mechanisms(token.slot, report)
    try:
        rnd = bytes(session.generate_random(NONCE_BYTES * 8))
        report.add("C_GenerateRandom", len(rnd) == NONCE_BYTES, "12 bytes for a nonce",
                   required=True)  # fmt: skip
    except p11.PKCS11Error as exc:
        report.add("C_GenerateRandom", False, _err(exc), required=True)
        rnd = bytes(NONCE_BYTES)
    _data_object(session, report)
    key = None
    try:
        key = _scratch_key(session)
        report.add("C_GenerateKey AES-256 (KEK template)", True,
                   "sensitive, non-extractable, encrypt/decrypt only", required=True)  # fmt: skip
    except p11.PKCS11Error as exc:
        report.add("C_GenerateKey AES-256 (KEK template)", False, _err(exc), required=True)
    if key is not None:
        try:
            _key_probes(session, key, module, rnd, report)
        finally:
            with contextlib.suppress(p11.PKCS11Error):
                key.destroy()
    choose(report, policy)
    return report


def _data_object(session: Any, report: Report) -> None:
    try:
        obj = session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.LABEL: _PROBE_LABEL, Attribute.APPLICATION: "kustody-probe",
            Attribute.VALUE: b"probe",
        })  # fmt: skip
        obj.destroy()
        report.add("token data objects (create, delete)", True,
                   "tombstones and destruction schedules", required=True)  # fmt: skip
    except p11.PKCS11Error as exc:
        report.add("token data objects (create, delete)", False, _err(exc), required=True)


def _key_probes(session: Any, key: Any, module: str, nonce: bytes, report: Report) -> None:
    dek, aad = bytes(range(32)), b"kustody-probe-aad"
    # GCM with a caller-supplied IV.
    try:
        sealed = key.encrypt(dek, mechanism=Mechanism.AES_GCM,
                             mechanism_param=GCMParams(nonce, aad, TAG_BYTES * 8))  # fmt: skip
        why = _gcm_roundtrip(key, nonce, bytes(sealed), dek, aad)
        report.add("AES-GCM, caller IV (C_Encrypt)", not why,
                   why or "12-byte IV from C_GenerateRandom, 128-bit tag")  # fmt: skip
    except p11.PKCS11Error as exc:
        report.add("AES-GCM, caller IV (C_Encrypt)", False, f"refused ({_err(exc)})")
    # GCM with a token-generated IV (PKCS#11 3.0 message API).
    try:
        gcm = MessageGcm(module)
        iv, sealed2 = gcm.encrypt(session, key, dek, aad)
        iv2, _ = gcm.encrypt(session, key, dek, aad)
        why = _gcm_roundtrip(key, iv, sealed2, dek, aad)
        if not why and iv == iv2:
            why = "the token returned the same IV twice"
        report.add("AES-GCM, token-generated IV (C_EncryptMessage)", not why,
                   why or "CKG_GENERATE_RANDOM, 96-bit IV returned by the token")  # fmt: skip
    except TokenIvUnsupported as exc:
        report.add("AES-GCM, token-generated IV (C_EncryptMessage)", False, str(exc))
    except p11.PKCS11Error as exc:
        report.add("AES-GCM, token-generated IV (C_EncryptMessage)", False,
                   f"refused ({_err(exc)})")  # fmt: skip
    # Key check value.
    ecb = ""
    try:
        ecb = bytes(key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)[:3]).hex()
        report.add("AES-ECB of a zero block", True, "fingerprint fallback")
    except p11.PKCS11Error as exc:
        report.add("AES-ECB of a zero block", False, _err(exc))
    try:
        kcv = bytes(key[Attribute.CHECK_VALUE]).hex()
        ok = len(kcv) == 6 and (not ecb or kcv == ecb)
        report.add("CKA_CHECK_VALUE", ok,
                   "3 bytes" + (", equal to AES-ECB(K, 0)" if ecb else "") if ok
                   else f"unexpected value of {len(kcv) // 2} bytes")  # fmt: skip
    except p11.PKCS11Error as exc:
        report.add("CKA_CHECK_VALUE", False, f"not readable ({_err(exc)})")
    # Disabling by attributes: the token must refuse the key afterwards.
    try:
        key[Attribute.ENCRYPT] = False
        key[Attribute.DECRYPT] = False
        off = _find(session, key)
        try:
            off.encrypt(dek, mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, TAG_BYTES * 8))  # fmt: skip
            refused = False
        except (p11.PKCS11Error, AttributeError, NotImplementedError):
            refused = True
        off[Attribute.ENCRYPT] = True
        off[Attribute.DECRYPT] = True
        report.add("disable by CKA_ENCRYPT/CKA_DECRYPT", refused,
                   "C_SetAttributeValue accepted; the token refuses the disabled key"
                   if refused else "accepted, but the token still used the key")  # fmt: skip
    except p11.PKCS11Error as exc:
        report.add("disable by CKA_ENCRYPT/CKA_DECRYPT", False,
                   f"C_SetAttributeValue refused ({_err(exc)})")  # fmt: skip


def choose(report: Report, policy: IvPolicy) -> None:
    """Pick the profile from the probe results (or none, with the verdict saying why)."""
    missing = [p.name for p in report.probes if p.required and not p.ok]
    caller = report.result("AES-GCM, caller IV (C_Encrypt)")
    tokeniv = report.result("AES-GCM, token-generated IV (C_EncryptMessage)")
    if missing:
        report.verdict = f"NOT USABLE: required probe(s) failed: {', '.join(missing)}"
        return
    if policy is IvPolicy.TOKEN:
        iv = IvSource.TOKEN if tokeniv else None
        if iv is None:
            report.verdict = ("NOT USABLE under --gcm-iv token: the token does not generate "
                              "AES-GCM IVs (no PKCS#11 3.0 C_EncryptMessage)")  # fmt: skip
            return
    elif caller:
        iv = IvSource.CALLER
    elif tokeniv:
        iv = IvSource.TOKEN
    else:
        report.verdict = "NOT USABLE: AES-GCM works neither with caller nor with token IVs"
        return
    disable = (DisableBy.ATTRIBUTES if report.result("disable by CKA_ENCRYPT/CKA_DECRYPT")
               else DisableBy.RECORD)  # fmt: skip
    if report.result("CKA_CHECK_VALUE"):
        fingerprint = FingerprintBy.CHECK_VALUE
    elif report.result("AES-ECB of a zero block"):
        fingerprint = FingerprintBy.AES_ECB
    else:
        fingerprint = FingerprintBy.NONE
    report.profile = Profile(iv, disable, fingerprint)
    report.verdict = f"OK: Kustody can run on this token ({report.profile})"


def open_and_probe(module: str, label: str, pin: Pin, policy: IvPolicy) -> Report:
    """For ``kustody hsm probe``: load, find the token, log in, probe, log out."""
    report = Report(module=module, policy=str(policy), thread_model=THREAD_MODEL)
    if "/" in module and not Path(module).exists():
        report.verdict = f"NOT USABLE: the module {module} does not exist"
        return report
    try:
        lib = pkcs11.lib(module)
    except (p11.PKCS11Error, OSError) as exc:
        # The loader's own words (dlerror: a path, a missing symbol), never token data.
        report.verdict = f"NOT USABLE: {module} is not a loadable PKCS#11 module: {exc}"
        return report
    describe_library(lib, report)
    try:
        token = lib.get_token(token_label=label)
    except p11.PKCS11Error as exc:
        report.verdict = f"NOT USABLE: no single token labelled {label!r} ({_err(exc)})"
        return report
    try:
        session = token.open(user_pin=pin.reveal(), rw=True)
    except p11.PKCS11Error as exc:
        describe_token(token, report)
        report.verdict = f"NOT USABLE: login to {label!r} failed ({_err(exc)})"
        return report
    try:
        return probe(lib, token, session, module, policy)
    finally:
        session.close()


def format_text(report: Report) -> str:
    """The report as ``kustody hsm probe`` prints it."""
    lines = [f"module      {report.module}"]
    lib = report.library
    if lib:
        lines.append(
            f"library     {lib['manufacturer']} / {lib['description']} {lib['library_version']} "
            f"(Cryptoki {lib['cryptoki_version']})"
        )
    tok = report.token
    if tok:
        lines.append(
            f"token       {tok['label']!r}: {tok['manufacturer']} {tok['model']}, "
            f"serial {tok['serial']}, flags {tok['flags']}"
        )
    if report.mechanisms:
        lines.append("mechanisms")
        for m in report.mechanisms:
            state = "ok" if m["ok"] else ("MISSING" if m["required"] else "missing")
            sizes = m.get("key_sizes")
            extra = f" (key sizes {sizes[0]}-{sizes[1]})" if sizes else ""
            lines.append(f"  {state:8} {m['mechanism']:18} {m['purpose']}{extra}")
    if report.probes:
        lines.append("probes")
        for p in report.probes:
            if p.name.startswith("mechanism "):
                continue  # listed above
            state = "ok" if p.ok else ("FAIL" if p.required else "no")
            lines.append(f"  {state:8} {p.name}: {p.detail}")
    lines.append(f"policy      --gcm-iv {report.policy}")
    lines.append(f"profile     {report.profile if report.profile else '-'}")
    lines.append(f"threads     {report.thread_model}")
    lines.append(f"verdict     {report.verdict}")
    return "\n".join(lines)
