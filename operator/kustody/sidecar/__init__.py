"""The HSM sidecar's front-end process: gRPC KeyService, KMS v2 plugin and workload unwrap. It
never touches PKCS#11; its worker process (:mod:`kustody.pkcs11.worker`) does."""
