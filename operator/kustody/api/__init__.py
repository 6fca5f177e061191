"""Contracts between Kustody's processes: the KeyService protos and its typed client, reasons
and errors, the token configuration, the PIN file, the sidecar ⇄ PKCS#11 worker frames."""
