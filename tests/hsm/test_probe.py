"""``kustody hsm probe`` on both PKCS#11 implementations, and on modules that are not PKCS#11.

These tests make their own tokens of each kind (whatever ``KUSTODY_TEST_TOKEN`` says), so the
probe is checked on SoftHSM2 and on Kryoptic in every run.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kustody.dev.tokens import KINDS, DevToken, create_token, kind_of
from kustody.errors import UserError

TOKEN_IV = "AES-GCM, token-generated IV (C_EncryptMessage)"
CALLER_IV = "AES-GCM, caller IV (C_Encrypt)"


@pytest.fixture(scope="module", params=KINDS)
def any_token(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DevToken:
    kind = request.param
    try:
        return create_token(tmp_path_factory.mktemp(f"probe-{kind}"), "probe", kind=kind)
    except UserError as exc:
        if os.environ.get("KUSTODY_SKIP_KRYOPTIC") == "1" and kind == "kryoptic":
            pytest.skip(f"KUSTODY_SKIP_KRYOPTIC=1: {exc}")
        raise


def probe(
    module: Path | str, label: str, pin_file: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kustody", "hsm", "probe", "--module", str(module)]
    command += ["--token-label", label, "--pin-file", str(pin_file)]
    # Explicit, whatever $KUSTODY_HSM_GCM_IV says (make test sets it for the Kryoptic run).
    command += [*args] if "--gcm-iv" in args else ["--gcm-iv", "auto", *args]
    return subprocess.run(
        command,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def probe_token(token: DevToken, *args: str) -> subprocess.CompletedProcess[str]:
    return probe(token.module, token.label, token.pin_file, *args, env=token.env)


def test_probe_reports_library_token_mechanisms_and_the_profile(any_token: DevToken) -> None:
    result = probe_token(any_token, "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    kind = kind_of(any_token)
    assert report["ok"] is True
    assert report["verdict"].startswith("OK: Kustody can run on this token")
    assert report["library"]["manufacturer"]
    assert report["token"]["label"] == "probe"
    usable = {m["mechanism"] for m in report["mechanisms"] if m["ok"]}
    assert {"CKM_AES_KEY_GEN", "CKM_AES_GCM", "CKM_AES_ECB"} <= usable
    probes = {p["name"]: p for p in report["probes"]}
    assert all(p["ok"] for p in report["probes"] if p["required"]), probes
    assert probes[CALLER_IV]["ok"] is True
    assert probes["disable by CKA_ENCRYPT/CKA_DECRYPT"]["ok"] is True
    # What differs between the two implementations, as the probes find it:
    # SoftHSM2 2.6 is PKCS#11 2.40 (no message-based encryption) and has CKA_CHECK_VALUE;
    # Kryoptic is PKCS#11 3.x (C_EncryptMessage with CKG_GENERATE_RANDOM) and ignores
    # CKA_CHECK_VALUE on secret keys, so the fingerprint is computed with AES-ECB.
    assert probes[TOKEN_IV]["ok"] is (kind == "kryoptic"), probes[TOKEN_IV]
    assert probes["CKA_CHECK_VALUE"]["ok"] is (kind == "softhsm2"), probes["CKA_CHECK_VALUE"]
    assert report["profile"] == {
        "iv": "caller",
        "disable": "attributes",
        "fingerprint": "check-value" if kind == "softhsm2" else "aes-ecb",
    }
    assert "single PKCS#11 thread" in report["thread_model"]

    text = probe_token(any_token)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "verdict     OK: Kustody can run on this token" in text.stdout
    assert "profile     gcm-iv=caller disable=attributes" in text.stdout
    assert any_token.pin_file.read_text().strip() not in text.stdout + text.stderr


def test_probe_under_the_token_iv_policy(any_token: DevToken) -> None:
    """``--gcm-iv token`` (a FIPS-style deployment): usable only where the token makes IVs."""
    result = probe_token(any_token, "--gcm-iv", "token", "-o", "json")
    report = json.loads(result.stdout)
    if kind_of(any_token) == "kryoptic":
        assert result.returncode == 0, result.stdout
        assert report["profile"]["iv"] == "token"
    else:
        assert result.returncode == 1, result.stdout
        assert report["ok"] is False
        assert report["profile"] is None
        assert "--gcm-iv token" in report["verdict"]
        assert "C_EncryptMessage" in report["verdict"]


def test_probe_with_a_wrong_pin_fails(any_token: DevToken, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("not-the-pin-0000")
    result = probe(any_token.module, any_token.label, wrong, env=any_token.env)
    assert result.returncode == 1, result.stdout
    assert "verdict     NOT USABLE: login to 'probe' failed" in result.stdout


def test_probe_fails_clearly_on_a_module_that_is_not_pkcs11(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234")
    text_file = tmp_path / "not-a-module.so"
    text_file.write_text("this is not a shared library\n")
    libz = ctypes.util.find_library("z")
    assert libz is not None
    cases = {
        libz: "undefined symbol: C_GetFunctionList",  # a real shared library, not PKCS#11
        str(text_file): "is not a loadable PKCS#11 module",
        str(tmp_path / "missing.so"): "does not exist",
    }
    for module, says in cases.items():
        result = probe(module, "any", pin)
        assert result.returncode == 1, (module, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        verdict = result.stdout.strip().splitlines()[-1]
        assert verdict.startswith("verdict     NOT USABLE:"), result.stdout
        assert says in result.stdout, (module, result.stdout)
        as_json = probe(module, "any", pin, "-o", "json")
        assert as_json.returncode == 1
        assert json.loads(as_json.stdout)["ok"] is False


def test_probe_without_a_readable_pin_file_says_so(tmp_path: Path) -> None:
    result = probe("/no/such/module.so", "any", tmp_path / "absent.pin")
    assert result.returncode == 1
    assert "PIN file" in result.stdout
