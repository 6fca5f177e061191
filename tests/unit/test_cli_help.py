"""The kustody command without a cluster: help texts, reports and their schemas, the
doctor's verdicts, the context flag, shell completion."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kustody.cli import build_parser, certificate, doctor, keyrings, main, output, report, target
from kustody.cli.finding import Finding, Options

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parents[2]


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str]]:
    yield path, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


HELP = dict(_walk(build_parser(), "kustody"))


@pytest.mark.parametrize("command", sorted(HELP))
def test_every_help_text_is_plain_text(command: str) -> None:
    assert not re.findall(r"``[^`]*``|:\w+:`[^`]*`", HELP[command]), HELP[command]


def test_top_level_help_describes_the_product_and_its_output() -> None:
    text = HELP["kustody"]
    assert text.startswith("usage: kustody ")
    assert "Kustody keeps encryption keys in your custody" in text
    assert "kustody.io/cli/v1" in text
    for command in ("status", "rotate", "rewrap", "restore", "doctor", "completion"):
        assert re.search(rf"^\s+{command}\b", text, re.MULTILINE), command


def test_kubectl_plugin_names_itself_as_kubectl_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"], prog="kubectl kustody")
    assert capsys.readouterr().out.startswith("usage: kubectl kustody ")


def test_read_commands_take_every_output_format() -> None:
    for command in ("status", "doctor"):
        assert "-o {table,wide,json,yaml}" in HELP[f"kustody {command}"]


def test_operator_listens_where_told() -> None:
    parser = build_parser()
    assert parser.parse_args(["operator"]).metrics_address == "127.0.0.1"
    everywhere = "0.0.0.0"  # noqa: S104 - what the chart passes, so Prometheus can scrape it
    args = parser.parse_args(["operator", "--metrics-address", everywhere])
    assert args.metrics_address == everywhere


# -- status ----------------------------------------------------------------------------------


def _keyring(name: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"rotationPolicyRef": {"name": "quarterly"}},
        "status": {
            "primaryVersion": 2,
            "nextRotationAt": "2027-03-01T02:00:00Z",
            "lastRotationAt": "2026-12-01T02:00:00Z",
            "versions": [
                {"version": 1, "state": "Enabled", "fingerprint": "dd341c", "dataKeys": 0},
                {"version": 2, "state": "Enabled", "fingerprint": "4106b6", "dataKeys": 2},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": ""}],
            **status,
        },
    }


def _datakey(ns: str, name: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "keyRingRef": {"name": "payments"},
            "secretName": f"{name}-dek",
            "consumers": ["api"],
        },
        "status": {
            "keyRingVersion": 2,
            "dekGeneration": 1,
            "secretRef": {"name": f"{name}-dek"},
            "wrappedKey": "kustody:v1:not-for-output",
            "conditions": [
                {
                    "type": "Ready",
                    "status": str(ready),
                    "reason": "Ready" if ready else "X",
                    "message": "",
                }
            ],
        },
    }


EVENTS = [
    {
        "involvedObject": {"kind": "DataKey", "namespace": "payments", "name": "ledger"},
        "type": "Normal",
        "reason": "Created",
        "message": "generated",
        "lastTimestamp": "2026-12-01T11:00:00Z",
    },
    {
        "involvedObject": {"kind": "DataKey", "namespace": "payments", "name": "ledger"},
        "type": "Normal",
        "reason": "Rewrapped",
        "message": "re-wrapped from v1 to v2",
        "lastTimestamp": "2026-12-01T11:58:00Z",
    },
]


def test_status_report_of_a_namespace_follows_its_schema() -> None:
    data = report.build_status(
        report.Scope(namespace="payments"),
        [_keyring("payments"), _keyring("unused")],
        [_datakey("payments", "ledger"), _datakey("payments", "card-vault", ready=False)],
        EVENTS,
        NOW,
    )
    jsonschema.validate(data, output.schema("StatusReport"))
    assert [k["name"] for k in data["keyRings"]] == ["payments"]
    assert [d["name"] for d in data["dataKeys"]] == ["card-vault", "ledger"]
    ledger = data["dataKeys"][1]
    assert ledger["lastEvent"]["reason"] == "Rewrapped"
    assert ledger["consumers"] == ["api"]
    assert data["keyRings"][0]["dataKeys"] == {"total": 2, "notReady": 1}
    assert "not-for-output" not in json.dumps(data)

    text = report.render_status(data, NOW)
    assert text.splitlines()[0].split() == [
        "NAME", "READY", "KEYRING", "VERSION", "GENERATION", "SECRET", "CONSUMERS", "LAST",
        "EVENT",
    ]  # fmt: skip
    assert "ledger       True    payments" in text
    assert "Rewrapped (2m ago)" in text
    as_yaml = output.render(data, "yaml", lambda wide: "")
    assert yaml.safe_load(as_yaml) == data


def test_status_overview_lists_keyrings_only() -> None:
    data = report.build_status(
        report.Scope(), [_keyring("payments")], [_datakey("payments", "ledger")], [], NOW
    )
    jsonschema.validate(data, output.schema("StatusReport"))
    assert data["dataKeys"] == []
    text = report.render_status(data, NOW)
    assert text.splitlines()[0] == (
        "KeyRing payments: Ready=True (Ready), primary v2, next rotation "
        "2027-03-01T02:00:00Z (in 89d)"
    )
    assert "  v2    Enabled           fingerprint 4106b6  2 DataKey(s)" in text
    assert "  DataKeys: 1, not Ready: 0" in text


def test_status_marks_an_overdue_rotation() -> None:
    late = _keyring("payments", nextRotationAt="2026-12-01T11:00:00Z")
    data = report.build_status(report.Scope(), [late], [], [], NOW)
    assert data["keyRings"][0]["rotationOverdue"] is True
    assert "(overdue by 1h)" in report.render_status(data, NOW)


# -- doctor ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "code"),
    [(["ok", "skipped"], 0), (["ok", "warning"], 1), (["warning", "error", "ok"], 2), ([], 0)],
)
def test_doctor_exit_code_is_the_worst_finding(statuses: list[str], code: int) -> None:
    findings = [Finding("x", s, "m") for s in statuses]
    data = doctor.build_report(findings, NOW)
    jsonschema.validate(data, output.schema("DoctorReport"))
    assert data["exitCode"] == code
    assert f"(exit {code})" in doctor.render(data)


def test_doctor_keyring_findings() -> None:
    scheduled = _keyring(
        "payments",
        versions=[
            {
                "version": 1,
                "state": "DestroyScheduled",
                "fingerprint": "a",
                "destroyAt": "2026-12-04T12:00:00Z",
            },
            {
                "version": 2,
                "state": "DestroyScheduled",
                "fingerprint": "b",
                "destroyAt": "2027-01-30T12:00:00Z",
            },
        ],
        destructionImpact=[{"version": 1, "dataKeys": 3, "secrets": 3}],
        conditions=[{"type": "Ready", "status": "False", "reason": "NoPrimary", "message": "m"}],
        nextRotationAt="2026-11-30T00:00:00Z",
    )
    found = keyrings.check_keyrings([scheduled], Options(now=NOW))
    by_check = {f.check: f for f in found}
    assert by_check["keyrings"].status == "error"
    assert by_check["keyrings"].message == "KeyRing payments is not Ready: NoPrimary: m"
    destruction = [f for f in found if f.check == "destruction"]
    assert len(destruction) == 1  # v2 is 60 days away
    assert destruction[0].message == (
        "KeyRing payments v1 will be destroyed in 3d (2026-12-04T12:00:00Z); it would make "
        "3 DataKey(s) and 3 Secret(s) unreadable"
    )
    assert by_check["rotation"].status == "warning"
    assert keyrings.check_keyrings([_keyring("fine")], Options(now=NOW))[0].status == "ok"


def _cert(tmp_path: Path, names: list[str], days: float) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unwrap")])
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=365))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"cert-{days}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    ("names", "days", "wanted", "statuses", "text"),
    [
        (["unwrap.kustody-system.svc"], 90, ["unwrap.kustody-system.svc"], ["ok"], "valid until"),
        (["unwrap.kustody-system.svc"], -1, [], ["error"], "certificate expired"),
        (["unwrap.kustody-system.svc"], 10, [], ["warning"], "expires"),
        (["*.kustody-system.svc"], 90, ["unwrap.kustody-system.svc"], ["ok"], "valid until"),
        (["other.svc"], 90, ["unwrap.kustody-system.svc"], ["error"], "not unwrap.kustody"),
        (["127.0.0.1"], 90, ["127.0.0.1"], ["ok"], "names 127.0.0.1"),
    ],
)
def test_doctor_certificate_check(
    tmp_path: Path, names: list[str], days: float, wanted: list[str], statuses: list[str], text: str
) -> None:
    opts = Options(unwrap_cert=_cert(tmp_path, names, days), unwrap_names=wanted, now=NOW)
    found = certificate.check_certificate(opts)
    assert [f.status for f in found] == statuses
    assert text in found[0].message


def test_doctor_without_an_unwrap_endpoint_says_how_to_check_it() -> None:
    (found,) = certificate.check_certificate(Options(now=NOW))
    assert found.status == "skipped"
    assert "--unwrap-endpoint" in (found.fix or "")


# -- the cluster flags -----------------------------------------------------------------------


def test_context_is_chosen_without_copying_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("users: [{name: admin, user: {token: very-secret}}]\n")
    with target._with_context(str(config), "staging") as paths:
        assert paths is not None
        first, extra = paths.split(":")
        assert first == str(config)
        written = Path(extra).read_text()
        assert yaml.safe_load(written)["current-context"] == "staging"
        assert "very-secret" not in written
    assert not Path(extra).exists()
    with target._with_context(str(config), None) as paths:
        assert paths == str(config)


# -- shell completion ------------------------------------------------------------------------


def _script(shell: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "kustody", "completion", shell],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout


def test_bash_completion_completes_commands_and_flags(tmp_path: Path) -> None:
    script = tmp_path / "kustody.bash"
    script.write_text(_script("bash"))

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        probe = (
            f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
            f"COMP_CWORD={len(words) - 1}; COMP_LINE={line!r}; COMP_POINT={len(line)}; "
            "_shtab_kustody; printf '%s\\n' \"${COMPREPLY[@]}\""
        )
        result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
        return result.stdout.split()

    assert {"status", "rotate", "rewrap", "restore", "doctor"} <= set(complete("kustody "))
    assert "doctor" in complete("kustody do")
    assert {"--output", "--all-namespaces", "--context"} <= set(complete("kustody status --"))
    assert {"json", "yaml", "wide", "table"} <= set(complete("kustody status -o "))


def test_zsh_completion_is_a_compdef_script() -> None:
    script = _script("zsh")
    assert script.startswith("#compdef kustody")
    assert "doctor" in script
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n", "-c", script], check=True)


def test_krew_manifest_names_the_plugin_and_this_version() -> None:
    from kustody import __version__

    manifest = yaml.safe_load((ROOT / "plugins" / "krew" / "kustody.yaml").read_text())
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    assert manifest["metadata"]["name"] == "kustody"  # what `kubectl kustody` looks up
    spec = manifest["spec"]
    assert spec["version"] == f"v{__version__}"
    assert 0 < len(spec["shortDescription"]) < 80
    for platform in spec["platforms"]:
        assert platform["bin"] == "kubectl-kustody"
        assert re.fullmatch(r"[0-9a-f]{64}", platform["sha256"])
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'kubectl-kustody = "kustody.cli:kubectl_main"' in scripts


def test_last_event_within_one_second_is_the_later_write() -> None:
    def event(reason: str, rv: str) -> dict[str, Any]:
        return {
            "metadata": {"resourceVersion": rv},
            "involvedObject": {"kind": "DataKey", "namespace": "p", "name": "ledger"},
            "reason": reason,
            "lastTimestamp": "2026-12-01T11:00:00Z",
        }

    events = [event("Created", "120"), event("KeyRingNotFound", "101"), event("Waiting", "99")]
    assert report.last_events(events)[("p", "ledger")]["reason"] == "Created"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["sta"], ["status"]),
        (["status", "--all"], ["--all-namespaces"]),
        (["status", "-n", "payments", "-o", "j"], ["json"]),
        (["rotate", "payments", "--wa"], ["--wait"]),
        (["completion", ""], ["bash", "zsh"]),
    ],
)
def test_kubectl_plugin_completion_candidates(words: list[str], expected: list[str]) -> None:
    from kustody.cli.completion import candidates

    assert candidates(words) == expected


def test_doctor_wide_output_names_what_each_finding_is_about() -> None:
    findings = [
        Finding(
            "keyrings", "error", "KeyRing a is not Ready: X: y", "kubectl describe", "keyring/a"
        ),
        Finding("crds", "ok", "3 CRDs Established"),
    ]
    data = doctor.build_report(findings, NOW)
    wide = doctor.render(data, wide=True)
    assert "ERROR    keyrings     KeyRing a is not Ready: X: y  [keyring/a]" in wide
    assert "                      fix: kubectl describe" in wide
    assert "[keyring/a]" not in doctor.render(data)
