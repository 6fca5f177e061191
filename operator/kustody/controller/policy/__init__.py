"""RotationPolicy reconciliation: validity and usage."""
