"""``kustody hsm probe``: load a PKCS#11 module in this process and report what Kustody would
use there. It is a PKCS#11 program, so it lives here, beside the worker, not in the sidecar's
front end (which never loads a module); it adds itself to ``kustody hsm``'s subcommands."""

from __future__ import annotations

import argparse
import json

from kustody.api.errors import HsmError
from kustody.api.pin import PIN_FILE_ENV, pin_file_from, read_pin
from kustody.api.token import IvPolicy, add_token_arguments
from kustody.pkcs11 import capabilities


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.choices.get("hsm")
    if parser is None:  # the sidecar layer is not installed
        return
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    probe = commands.add_parser(
        "probe",
        help="check a PKCS#11 module and token: what Kustody would use there, and whether it can",
        description=(
            "Load the module, log in to the token, probe what Kustody needs (mechanisms, "
            "AES-GCM with caller or token IVs, disabling keys, key check values, data objects; "
            "on a scratch session key) and print the profile the sidecar would choose. Exits 0 "
            "when Kustody can run there, 1 when it cannot."
        ),
        allow_abbrev=False,
    )
    add_token_arguments(probe)
    probe.add_argument("-o", "--output", choices=["text", "json"], default="text")
    probe.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    """``kustody hsm probe``: the compatibility report; exit 1 when Kustody cannot run there."""
    policy = IvPolicy(args.gcm_iv)
    pin_file = pin_file_from(args.pin_file)
    report: capabilities.Report
    if pin_file is None:
        report = capabilities.Report(module=args.module, policy=str(policy))
        report.verdict = f"NOT USABLE: no PIN file: pass --pin-file PATH or set ${PIN_FILE_ENV}"
    else:
        try:
            pin = read_pin(pin_file)
        except HsmError as exc:
            report = capabilities.Report(module=args.module, policy=str(policy))
            report.verdict = f"NOT USABLE: {exc.message}"
        else:
            report = capabilities.open_and_probe(args.module, args.token_label, pin, policy)
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(capabilities.format_text(report))
    return 0 if report.ok else 1
