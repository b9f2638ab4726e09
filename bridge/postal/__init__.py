"""Postal's world; knows nothing of Flask.

signatures.py checks that a request body really comes from Postal (RSA signatures), with the keys that
keys.py loads (PEM, DNS p= values, JWKS documents) and jwks.py fetches (Postal's JWKS, the last good one
shared between processes through Redis: the only state this package keeps outside the process).
payloads.py turns a verified body into one InboundMessage, with encoding.py (errors, strict base64),
fields.py (JSON/FormData field access) and rebuild.py (Hash -> MIME). client.py calls Postal's send API
(send/raw) and message API, and says of every call whether Postal accepted it, refused it for good,
provably did not get it (safe to retry) or may hold it (never resent blindly). None of these modules touches the
web framework or the object store: the web layer calls them with bytes and headers and maps their
exceptions to HTTP status codes.

ingress.py is the one exception: Postal's ingress, the steps before Postal gets its 2xx (resolve the
mailbox, check DKIM, seal, store, queue filing), so it uses the bridge's stores; it too knows no Flask.
"""
