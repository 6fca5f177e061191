"""Which token to open: the configuration the sidecar hands its PKCS#11 worker (as arguments;
the PIN as a file path), and the command-line options that name it, shared by ``kustody hsm``
and ``kustody hsm probe``."""

from __future__ import annotations

import argparse
import enum
import os
from dataclasses import dataclass
from pathlib import Path

from kustody.api.pin import PIN_FILE_ENV

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class IvPolicy(enum.StrEnum):
    """``auto``: caller IVs where the token takes them, else token IVs. ``token``: token IVs
    only (a FIPS-style deployment); the sidecar refuses to serve where they are missing."""

    AUTO = "auto"
    TOKEN = "token"  # noqa: S105 (a policy, not a secret)


@dataclass(frozen=True)
class TokenConfig:
    """Which token the worker opens: passed to it as arguments (the PIN as a file path)."""

    module: Path
    label: str
    pin_file: Path | None
    # Where AES-GCM IVs may come from: "auto" (caller IVs where the token takes them) or
    # "token" (only token-generated IVs, a FIPS-style deployment); see capabilities.py.
    gcm_iv: str = "auto"


def add_token_arguments(group: argparse._ActionsContainer) -> None:
    """--module, --token-label, --pin-file and --gcm-iv, with their environment defaults."""
    env = os.environ.get
    group.add_argument(
        "--module",
        default=env("KUSTODY_HSM_MODULE", DEFAULT_MODULE),
        help="PKCS#11 module path ($KUSTODY_HSM_MODULE; default: %(default)s)",
    )
    group.add_argument(
        "--token-label",
        default=env("KUSTODY_HSM_TOKEN_LABEL", "kustody"),
        help="label of the token to use ($KUSTODY_HSM_TOKEN_LABEL; default: %(default)s)",
    )
    group.add_argument(
        "--pin-file",
        metavar="PATH",
        help=f"file holding the user PIN (default: the file named by ${PIN_FILE_ENV})",
    )
    group.add_argument(
        "--gcm-iv",
        choices=[p.value for p in IvPolicy],
        default=os.environ.get("KUSTODY_HSM_GCM_IV", "auto"),
        help=(
            "where AES-GCM IVs come from: auto (caller IVs from the token RNG where the token "
            "takes them, else token-generated) or token (token-generated only, as FIPS-mode "
            "HSMs require; refuse to serve without) ($KUSTODY_HSM_GCM_IV; default: %(default)s)"
        ),
    )
