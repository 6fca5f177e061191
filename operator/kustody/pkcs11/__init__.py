"""The PKCS#11 worker process (and the one-shot token ceremonies and probe): the only code that
loads a PKCS#11 module."""
