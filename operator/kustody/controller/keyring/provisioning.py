"""Provisioning and integrity: the KEK versions exist in the token, as the status recorded.

One DescribeKey per pass: a KeyRing without versions creates version 1 or adopts what the
token already holds for its name; one with versions checks every live version is there with
the fingerprint recorded at creation, and puts the token's state back where it drifted.
"""

from __future__ import annotations

from kustody.api.client import VersionState
from kustody.controller.keyring.state import (
    REACHABLE,
    TOKEN_STATE,
    WANT_TOKEN,
    IntegrityError,
    KeyRingPass,
)
from kustody.domain.keyversion import KeyDescription
from kustody.domain.lifecycle import State, Version
from kustody.domain.timestamps import format_time


async def describe(p: KeyRingPass) -> KeyDescription:
    return await p.rt.call_hsm("DescribeKey", p.rt.hsm.describe_key(p.name))


async def provision(p: KeyRingPass, described: KeyDescription) -> None:
    """Create version 1, or adopt the versions the token already holds for this name."""
    if described.versions:
        versions = [
            Version(i.ref.version, TOKEN_STATE[i.state], p.now, i.fingerprint)
            for i in described.versions
        ]
        reason = "Adopted"
        message = (
            f"adopted {len(versions)} existing version(s) from the HSM "
            f"(deletionPolicy Retain of an earlier KeyRing {p.name})"
        )
    else:
        info = await p.rt.call_hsm(
            "CreateKeyVersion", p.rt.hsm.create_key_version(p.name, 1, escrow=p.escrow)
        )
        versions = [Version(1, State.ENABLED, p.now, info.fingerprint)]
        reason, message = "Created", f"created KEK version 1 (fingerprint {info.fingerprint})"
    enabled = [v.version for v in versions if v.state is State.ENABLED]
    p.set_versions(versions)
    p.status["primaryVersion"] = max(enabled) if enabled else None
    p.status["lastRotationAt"] = format_time(p.now)
    p.conditions.append(REACHABLE)
    await p.save()
    await p.rt.events.normal(p.obj, reason, message)


async def check_token(p: KeyRingPass, described: KeyDescription) -> None:
    """The token must hold every live version with the fingerprint recorded at creation."""
    token = {i.ref.version: i for i in described.versions}
    for v in p.versions:
        if v.state is State.DESTROYED:
            continue
        info = token.get(v.version)
        if info is None or info.state is VersionState.DESTROYED:
            raise IntegrityError(
                "KeyMaterialMissing",
                f"version {v.version} is not in the HSM token (was the token replaced?); "
                "nothing is rotated, disabled or destroyed until it is back",
            )
        if v.fingerprint and info.fingerprint != v.fingerprint:
            raise IntegrityError(
                "FingerprintMismatch",
                f"version {v.version} in the HSM has fingerprint {info.fingerprint}, "
                f"expected {v.fingerprint}; nothing is changed until this is resolved",
            )
        want = WANT_TOKEN[v.state]
        if info.state is not want:
            await p.rt.call_hsm(
                "SetVersionState", p.rt.hsm.set_version_state(p.name, v.version, want)
            )
    p.conditions.append(REACHABLE)
