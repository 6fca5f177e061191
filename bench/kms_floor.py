"""The Python gRPC floor for a KMS v2 plugin: ``python bench/kms_floor.py SOCKET``.

A grpc.aio server for v2.KeyManagementService (Kustody's generated code, Kustody's server
options, a unix socket) whose handlers do no cryptography: Encrypt returns the plaintext with
28 bytes appended (what nonce and tag add) and a fixed key_id, Decrypt strips them. Whatever a
Python plugin does per call costs at least this; bench/kms.py drives it with the same client,
interleaved with the other two, so its ops/s bound what any Python gRPC front end could reach.
"""

from __future__ import annotations

import asyncio
import sys
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


async def serve(socket: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_KeyManagementServiceServicer_to_server(Floor(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
