"""How the capability profile follows from the probe results (no token needed)."""

from __future__ import annotations

import pytest
from kustody.api.token import IvPolicy
from kustody.pkcs11.capabilities import (
    DisableBy,
    FingerprintBy,
    IvSource,
    Profile,
    Report,
    choose,
    format_text,
)

CALLER = "AES-GCM, caller IV (C_Encrypt)"
TOKEN = "AES-GCM, token-generated IV (C_EncryptMessage)"
DISABLE = "disable by CKA_ENCRYPT/CKA_DECRYPT"
KCV = "CKA_CHECK_VALUE"
ECB = "AES-ECB of a zero block"


def report(**results: bool) -> Report:
    r = Report(module="m.so")
    r.add("C_GenerateRandom", results.pop("random", True), "", required=True)
    names = {"caller": CALLER, "token": TOKEN, "disable": DISABLE, "kcv": KCV, "ecb": ECB}
    for key, ok in results.items():
        r.add(names[key], ok, "")
    return r


@pytest.mark.parametrize(
    ("results", "policy", "expected"),
    [
        (
            {"caller": True, "token": False, "disable": True, "kcv": True, "ecb": True},
            IvPolicy.AUTO,
            Profile(IvSource.CALLER, DisableBy.ATTRIBUTES, FingerprintBy.CHECK_VALUE),
        ),
        (  # Kryoptic: both IV sources, no CKA_CHECK_VALUE
            {"caller": True, "token": True, "disable": True, "kcv": False, "ecb": True},
            IvPolicy.AUTO,
            Profile(IvSource.CALLER, DisableBy.ATTRIBUTES, FingerprintBy.AES_ECB),
        ),
        (
            {"caller": True, "token": True, "disable": True, "kcv": False, "ecb": True},
            IvPolicy.TOKEN,
            Profile(IvSource.TOKEN, DisableBy.ATTRIBUTES, FingerprintBy.AES_ECB),
        ),
        (  # a FIPS-mode token that refuses caller IVs: token IVs even under auto
            {"caller": False, "token": True, "disable": False, "kcv": True, "ecb": False},
            IvPolicy.AUTO,
            Profile(IvSource.TOKEN, DisableBy.RECORD, FingerprintBy.CHECK_VALUE),
        ),
        (
            {"caller": True, "token": True, "disable": True, "kcv": False, "ecb": False},
            IvPolicy.AUTO,
            Profile(IvSource.CALLER, DisableBy.ATTRIBUTES, FingerprintBy.NONE),
        ),
    ],
)
def test_profile_follows_the_probes(
    results: dict[str, bool], policy: IvPolicy, expected: Profile
) -> None:
    r = report(**results)
    choose(r, policy)
    assert r.profile == expected
    assert r.ok
    assert r.verdict == f"OK: Kustody can run on this token ({expected})"


def test_token_policy_without_token_ivs_is_refused() -> None:
    r = report(caller=True, token=False, disable=True, kcv=True, ecb=True)
    choose(r, IvPolicy.TOKEN)
    assert r.profile is None
    assert not r.ok
    assert r.verdict.startswith("NOT USABLE under --gcm-iv token")


def test_no_gcm_at_all_is_refused_there_is_no_fallback() -> None:
    r = report(caller=False, token=False, disable=True, kcv=True, ecb=True)
    choose(r, IvPolicy.AUTO)
    assert r.profile is None
    assert r.verdict == "NOT USABLE: AES-GCM works neither with caller nor with token IVs"


def test_a_failed_required_probe_is_named_in_the_verdict() -> None:
    r = report(random=False, caller=True, token=True, disable=True, kcv=True, ecb=True)
    choose(r, IvPolicy.AUTO)
    assert r.profile is None
    assert r.verdict == "NOT USABLE: required probe(s) failed: C_GenerateRandom"
    text = format_text(r)
    assert text.splitlines()[-1] == f"verdict     {r.verdict}"
    assert "  FAIL     C_GenerateRandom" in text
    assert r.to_json()["ok"] is False
