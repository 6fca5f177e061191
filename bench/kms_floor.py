"""The Python gRPC floor for a KMS v2 plugin: ``python bench/kms_floor.py SOCKET [--sync N]``.

A grpc.aio server for v2.KeyManagementService (Kustody's generated code, Kustody's server
options, a unix socket) whose handlers do no cryptography: Encrypt returns the plaintext with
28 bytes appended (what nonce and tag add) and a fixed key_id, Decrypt strips them. Whatever a
Python plugin does per call costs at least this; bench/kms.py drives it with the same client,
interleaved with the other two, so its ops/s bound what any Python gRPC front end could reach.

``--sync N``: the same handlers on the synchronous ``grpc.server`` with N threads instead of
grpc.aio (Kustody's front end is grpc.aio), to show what the other Python server costs.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent import futures
from typing import Any

import grpc.aio
from kustody.api._proto import kms_v2_pb2 as pb
from kustody.api._proto import kms_v2_pb2_grpc as pb_grpc

OVERHEAD = b"\0" * 28
KEY_ID = "floor"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # as the sidecar's servers


class Floor(pb_grpc.KeyManagementServiceServicer):
    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return pb.StatusResponse(version="v2", healthz="ok", key_id=KEY_ID)

    async def Encrypt(self, request: pb.EncryptRequest, context: Any) -> pb.EncryptResponse:
        return pb.EncryptResponse(ciphertext=request.plaintext + OVERHEAD, key_id=KEY_ID)

    async def Decrypt(self, request: pb.DecryptRequest, context: Any) -> pb.DecryptResponse:
        return pb.DecryptResponse(plaintext=request.ciphertext[: -len(OVERHEAD)])


OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class SyncFloor(pb_grpc.KeyManagementServiceServicer):
    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return pb.StatusResponse(version="v2", healthz="ok", key_id=KEY_ID)

    def Encrypt(self, request: pb.EncryptRequest, context: Any) -> pb.EncryptResponse:
        return pb.EncryptResponse(ciphertext=request.plaintext + OVERHEAD, key_id=KEY_ID)

    def Decrypt(self, request: pb.DecryptRequest, context: Any) -> pb.DecryptResponse:
        return pb.DecryptResponse(plaintext=request.ciphertext[: -len(OVERHEAD)])


def serve_sync(socket: str, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(threads), options=OPTIONS)
    pb_grpc.add_KeyManagementServiceServicer_to_server(SyncFloor(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    server.wait_for_termination()


async def serve(socket: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    pb_grpc.add_KeyManagementServiceServicer_to_server(Floor(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--sync":
        serve_sync(sys.argv[1], int(sys.argv[3]))
    else:
        asyncio.run(serve(sys.argv[1]))
