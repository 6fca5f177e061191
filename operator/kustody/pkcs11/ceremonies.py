"""The token ceremonies of escrow, as one-shot commands (``kustody escrow admit|keygen|recover``).

Each opens the token directly (not through the sidecar), does one thing and exits; PINs are
read from files, never from arguments or the environment's values. ``admit`` is the Security
Officer's (SO PIN); ``keygen`` and ``recover`` are the agent's, in the agent's own token (its
user PIN). Arguments are declared in :mod:`kustody.cli.escrow`; this module is imported only
when a ceremony runs, so the CLI never loads PKCS#11 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11

from kustody.api.errors import HsmError
from kustody.api.pin import read_pin
from kustody.domain.escrow import AgentKey, EscrowError, Package, parse_public_key
from kustody.errors import UserError
from kustody.pkcs11 import escrow


@contextmanager
def _session(module: str, label: str, pin_file: Path, *, so: bool) -> Iterator[Any]:
    try:
        pin = read_pin(pin_file)
    except HsmError as exc:
        raise UserError(exc.message) from None
    try:
        token = pkcs11.lib(module).get_token(token_label=label)
    except (p11.PKCS11Error, RuntimeError) as exc:
        raise UserError(f"token {label!r} in {module}: {type(exc).__name__}") from None
    try:
        if so:
            session = token.open(so_pin=pin.reveal(), rw=True)
        else:
            session = token.open(user_pin=pin.reveal(), rw=True)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked):
        who = "Security Officer" if so else "user"
        raise UserError(f"login to token {label!r} failed: the {who} PIN is not accepted") from None
    except p11.PKCS11Error as exc:
        raise UserError(f"opening a session on {label!r} failed ({type(exc).__name__})") from None
    try:
        yield session
    finally:
        session.close()


def run_admit(args: argparse.Namespace) -> int:
    """The Security Officer imports the agent's public key as a trusted wrapping key."""
    agent = _agent_from(args.public_key)
    with _session(args.module, args.token_label, Path(args.so_pin_file), so=True) as session:
        try:
            created = escrow.admit(session, agent)
        except p11.PKCS11Error as exc:
            raise UserError(f"the token refused the agent key ({type(exc).__name__})") from None
    verb = "admitted" if created else "already admitted"
    print(f"{verb}: escrow agent key {agent.fingerprint} ({agent.bits} bits) is a trusted "
          f"wrapping key in token {args.token_label!r}")  # fmt: skip
    return 0


def _agent_from(path: str) -> AgentKey:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_public_key(data)
    except EscrowError as exc:
        raise UserError(f"{path}: {exc}") from None


def run_keygen(args: argparse.Namespace) -> int:
    """The agent's key pair, generated inside the agent's token; writes the public PEM."""
    with _session(args.module, args.token_label, Path(args.pin_file), so=False) as session:
        agent = escrow.generate_agent_key(session, args.label, args.bits)
    pem = escrow.public_key_pem(agent)
    if args.output == "-":
        sys.stdout.write(pem)
    else:
        Path(args.output).write_text(pem)
    print(f"generated escrow agent key {agent.fingerprint} ({agent.bits} bits) in token "
          f"{args.token_label!r}; the private key stays there", file=sys.stderr)  # fmt: skip
    return 0


def run_recover(args: argparse.Namespace) -> int:
    """Unwrap escrow packages inside the token that holds the agent's private key."""
    packages: list[tuple[str, Package]] = []
    for path in args.packages:
        try:
            packages.append((path, Package.from_json(Path(path).read_bytes())))
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        except EscrowError as exc:
            raise UserError(f"{path}: {exc}") from None
    failed = 0
    with _session(args.module, args.token_label, Path(args.pin_file), so=False) as session:
        for path, package in packages:
            try:
                done = escrow.recover(session, package)
            except HsmError as exc:
                failed += 1
                print(f"not recovered {path}: {exc.message}", file=sys.stderr)
                continue
            verb = "recovered" if done.created else "already present"
            print(f"{verb} KEK version {done.ref} (check value {done.check_value})")
    return 1 if failed else 0
