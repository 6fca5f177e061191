"""KeyRing reconciliation: provisioning, integrity, rotation, lifecycle (retire, disable,
destroy), escrow and deletion, one module per concern."""
