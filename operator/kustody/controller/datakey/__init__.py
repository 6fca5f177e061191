"""DataKey reconciliation: generations of the DEK, re-wrap, and the Secret that publishes
them, wrapped."""
