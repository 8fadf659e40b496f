"""Sealing: streaming AEAD for large files and signed, encrypted model packages."""
