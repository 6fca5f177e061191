"""``kustody escrow``: the escrow ceremonies and the hand-over of packages.

* ``admit`` — the Security Officer imports an agent's public key into the token as a trusted
  wrapping key (SO PIN from a file; run locally or as the chart's one-shot Job).
* ``keygen`` — the agent generates its key pair inside its own token (the private half never
  leaves it) and gets the public key PEM for its EscrowAgent.
* ``recover`` — the agent unwraps packages inside the token holding its private key, into KEK
  objects with the original labels, IDs and check values.
* ``export`` — the platform team copies a KeyRing's packages (Secrets in the operator
  namespace) to files for the hand-over.

The token ceremonies run in :mod:`kustody.pkcs11.ceremonies`, imported only when one runs
(the CLI itself never loads PKCS#11). docs/runbooks/escrow.md has the whole procedure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kustody.cli import target
from kustody.errors import UserError

if TYPE_CHECKING:
    from kustody.kube.api import Kube

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _ceremony(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module("kustody.pkcs11.ceremonies")
        result: int = getattr(module, name)(args)
        return result

    return run


def _token_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--module",
        default=env("KUSTODY_HSM_MODULE", DEFAULT_MODULE),
        help="PKCS#11 module ($KUSTODY_HSM_MODULE; default: %(default)s)",
    )
    p.add_argument(
        "--token-label",
        default=env("KUSTODY_HSM_TOKEN_LABEL", "kustody"),
        help="token label ($KUSTODY_HSM_TOKEN_LABEL; default: %(default)s)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "escrow",
        help="key escrow: admit an agent (SO), generate an agent key, recover, export packages",
        description=(
            "Key escrow to trusted third parties (docs/runbooks/escrow.md). admit: the "
            "Security Officer makes an agent's public key a trusted wrapping key in the token. "
            "keygen: an agent's key pair inside the agent's token. recover: unwrap packages "
            "inside the token holding the agent's private key. export: write a KeyRing's "
            "packages to files for the hand-over."
        ),
    )
    verbs = p.add_subparsers(dest="escrow_command", required=True, metavar="VERB")

    admit = verbs.add_parser(
        "admit",
        help="import an agent's public key as a trusted wrapping key (needs the SO PIN)",
        description=(
            "Log in to the token as its Security Officer (PIN read from --so-pin-file) and "
            "import the agent's RSA public key (at least 3072 bits) as a public key object "
            "with CKA_WRAP and CKA_TRUSTED: from then on the token wraps escrowed KEK versions "
            "under it, and under no other key. Idempotent. The SO PIN is never an argument or "
            "an environment value; the operator and the sidecar never hold it."
        ),
    )
    _token_flags(admit)
    admit.add_argument("--so-pin-file", required=True, help="file holding the SO PIN")
    admit.add_argument(
        "public_key", metavar="PEM", help="the agent's public key (file, '-' for stdin)"
    )
    admit.set_defaults(func=_ceremony("run_admit"))

    keygen = verbs.add_parser(
        "keygen",
        help="generate an escrow agent's key pair inside the agent's token",
        description=(
            "Generate an RSA key pair inside the agent's own token (user PIN from --pin-file); "
            "the private key is sensitive, never extractable and may only unwrap. Writes the "
            "public key as PEM, for the EscrowAgent's spec.publicKey."
        ),
    )
    _token_flags(keygen)
    keygen.add_argument("--pin-file", required=True, help="file holding the token's user PIN")
    keygen.add_argument("--label", required=True, help="label (and ID) of the key pair")
    keygen.add_argument("--bits", type=int, default=3072, choices=[3072, 4096])
    keygen.add_argument("-o", "--output", default="-", help="PEM file ('-': stdout)")
    keygen.set_defaults(func=_ceremony("run_keygen"))

    recover = verbs.add_parser(
        "recover",
        help="unwrap escrow packages inside the token holding the agent's private key",
        description=(
            "For each package, find the agent's private key in the token (by the package's "
            "agent fingerprint), unwrap the KEK with C_UnwrapKey into an object with the "
            "original label and ID, and check that its check value is the package's (else it "
            "is removed again). The KEK never exists outside a token. Start the sidecar on "
            "this token afterwards: the operator adopts the versions (fingerprints match)."
        ),
    )
    _token_flags(recover)
    recover.add_argument("--pin-file", required=True, help="file holding the token's user PIN")
    recover.add_argument("packages", nargs="+", metavar="PACKAGE", help="package files")
    recover.set_defaults(func=_ceremony("run_recover"))

    export = verbs.add_parser(
        "export",
        help="write a KeyRing's escrow packages to files for the hand-over",
        description=(
            "Copy the escrow packages of a KeyRing (Secrets labelled kustody.io/escrow-package "
            "in the operator namespace) to DIR/<keyring>-v<version>-<agent>.json. Packages "
            "hold the KEK only wrapped under the agent's public key."
        ),
    )
    export.add_argument("keyring", help="the KeyRing")
    export.add_argument("-d", "--directory", required=True, help="directory to write to")
    export.add_argument("--agent", help="only this agent's packages")
    export.add_argument(
        "--operator-namespace",
        default="kustody-system",
        help="namespace of the operator (default: %(default)s)",
    )
    target.add_cluster_flags(export, namespaces=False)
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    async def body(kube: Kube) -> list[dict[str, Any]]:
        from kustody.kube.errors import KubeError
        from kustody.kube.resources import SECRETS

        selector = f"kustody.io/escrow-package=true,kustody.io/keyring={args.keyring}"
        if args.agent:
            selector += f",kustody.io/escrow-agent={args.agent}"
        try:
            return await kube.list(SECRETS, args.operator_namespace, label_selector=selector)
        except KubeError as exc:
            raise UserError(f"cannot list escrow packages: {exc}") from None

    kube = target.connect(args)
    try:
        secrets = asyncio.run(body(kube))
    finally:
        kube.close()
    if not secrets:
        raise UserError(f"no escrow packages of KeyRing {args.keyring}")
    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    for s in sorted(secrets, key=lambda s: s["metadata"]["name"]):
        labels = s["metadata"].get("labels") or {}
        name = (
            f"{args.keyring}-v{labels.get('kustody.io/keyring-version')}-"
            f"{labels.get('kustody.io/escrow-agent')}.json"
        )
        data = base64.b64decode((s.get("data") or {}).get("package.json") or "")
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        print(path)
    print(f"exported {len(secrets)} package(s) of {args.keyring}", file=sys.stderr)
    return 0
