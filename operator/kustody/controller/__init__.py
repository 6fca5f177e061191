"""The operator process: watches fill the stores, a work queue feeds one reconciler per kind,
and each reconciler is a short sequence of concerns."""
