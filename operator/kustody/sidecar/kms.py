"""Kubernetes KMS v2 plugin (``v2.KeyManagementService``) backed by one KeyRing.

kube-apiserver sends 32-byte seeds; each is sealed under the KeyRing's primary KEK version as a
binary Kustody envelope (~80 bytes, well under the 1 kB limit) with the key_id as associated
data. key_id = ``<keyring>:v<version>:<fingerprint>``: it changes when the primary version
changes, which tells kube-apiserver to re-encrypt. Older versions keep decrypting while they
are ENABLED.
"""

from __future__ import annotations

from kustody.api._proto import kms_v2_pb2 as pb
from kustody.api._proto import kms_v2_pb2_grpc as pb_grpc
from kustody.api.errors import HsmError, Reason
from kustody.api.rpcerror import Context
from kustody.domain.aad import KmsBinding
from kustody.domain.envelope import Envelope
from kustody.domain.keyversion import VersionInfo, VersionState
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.metrics import Metrics
from kustody.sidecar.rpccall import observed

API_VERSION = "v2"


def key_id(info: VersionInfo) -> str:
    return info.ref.kms_key_id(info.fingerprint)


class KmsServicer(pb_grpc.KeyManagementServiceServicer):
    def __init__(
        self, service: KeyService, metrics: Metrics, key_ring: str, version: int | None = None
    ) -> None:
        self._service = service
        self._metrics = metrics
        self.key_ring = key_ring
        self.version = version  # None: follow the primary version
        self._last_key_id = ""

    async def current_key_id(self) -> str:
        info = await self._service.version_info(self.key_ring, self.version)
        if info.state is not VersionState.ENABLED:
            raise HsmError(Reason.VERSION_DISABLED, f"KEK version {info.ref} is {info.state}")
        self._last_key_id = key_id(info)
        return self._last_key_id

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        async def work() -> pb.StatusResponse:
            health = await self._service.health()
            if not health.serving:
                healthz = f"{health.reason}: {health.message}"
                return pb.StatusResponse(
                    version=API_VERSION, healthz=healthz, key_id=self._last_key_id
                )
            try:
                current = await self.current_key_id()
            except HsmError as exc:
                return pb.StatusResponse(
                    version=API_VERSION, healthz=str(exc), key_id=self._last_key_id
                )
            return pb.StatusResponse(version=API_VERSION, healthz="ok", key_id=current)

        return await observed(self._metrics, "kms.Status", context, work)

    async def Encrypt(self, request: pb.EncryptRequest, context: Context) -> pb.EncryptResponse:
        async def work() -> pb.EncryptResponse:
            envelope, info = await self._service.seal_kms(
                self.key_ring, self.version, request.plaintext
            )
            self._last_key_id = key_id(info)
            return pb.EncryptResponse(ciphertext=envelope.to_bytes(), key_id=self._last_key_id)

        return await observed(self._metrics, "kms.Encrypt", context, work)

    async def Decrypt(self, request: pb.DecryptRequest, context: Context) -> pb.DecryptResponse:
        async def work() -> pb.DecryptResponse:
            envelope = Envelope.from_bytes(request.ciphertext)
            if envelope.key.key_ring != self.key_ring:
                raise HsmError(
                    Reason.INVALID_ARGUMENT,
                    f"this KMS plugin serves KeyRing {self.key_ring}, not {envelope.key.key_ring}",
                )
            binding = KmsBinding(request.key_id)
            return pb.DecryptResponse(plaintext=await self._service.decrypt(envelope, binding))

        return await observed(self._metrics, "kms.Decrypt", context, work)
