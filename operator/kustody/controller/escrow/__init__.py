"""EscrowAgent reconciliation, and the escrow step of an escrowed KeyRing."""
