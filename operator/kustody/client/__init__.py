"""Workload client for Kustody: unwrap a DataKey's wrapped key at run time.

Depends only on grpcio, protobuf and the standard library (an import-linter contract keeps it
so). See docs/unwrap.md.
"""

from __future__ import annotations

from kustody.client.errors import Reason, UnwrapError
from kustody.client.secretdir import WrappedKey, read_secret_dir
from kustody.client.unwrapper import UnwrapClient, Unwrapped, default_client, unwrap

__all__ = [
    "Reason",
    "UnwrapClient",
    "UnwrapError",
    "Unwrapped",
    "WrappedKey",
    "default_client",
    "read_secret_dir",
    "unwrap",
]
