"""The only code that talks to the Kubernetes API (Secrets, status, Events, restarts)."""
