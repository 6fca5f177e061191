"""Test helpers for Kustody and for people testing their own workloads against it.

- :mod:`kustody.testing.fakes` — in-memory fakes of the Kubernetes API, the HSM sidecar's
  KeyService, Events and the clock, and :class:`~kustody.testing.fakes.FakeOperator`, a
  reconciler runtime wired to them: a reconciler pass runs in milliseconds, no cluster or
  token needed (docs/development.md, "Fast reconciler tests").
- The pytest plugin (``kustody.testing.plugin``, registered as the ``kustody`` pytest11 entry
  point) provides session-scoped ``kube`` and ``softhsm_token`` fixtures for tests against
  the real control plane and a real token.
- :mod:`kustody.testing.faults` — fault injection and measurement for reliability tests.
"""
