"""Kopf handlers: thin functions that parse, call domain logic and the hsm/kube layers."""
