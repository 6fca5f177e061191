"""The HSM sidecar: the only code that imports PKCS#11, and the gRPC services it serves."""
