"""Developer tooling: the local control plane (built from the Kubernetes Go modules) and
SoftHSM2 tokens."""
