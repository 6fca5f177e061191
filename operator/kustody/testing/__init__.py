"""Test helpers for Kustody and for people testing their own workloads against it.

The pytest plugin (``kustody.testing.plugin``, registered as the ``kustody`` pytest11 entry
point) provides session-scoped ``kube`` and ``softhsm_token`` fixtures.
"""
