"""Mailio's world: identity, handshakes, later discovery and MTP.
Knows nothing of Flask, Redis or S3."""
