"""The workload unwrap service: ServiceAccount-token authentication (TokenReview),
authorisation by DataKey ``spec.consumers``, rate limits, audit and metrics, served by the HSM
sidecar process next to its key service. Above both ``kustody.kube`` and the key service."""
