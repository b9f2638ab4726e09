"""``GET /api/v1/openapi.json``: the owner API's OpenAPI document, for client generators and for testing.

The document is a static file beside this module (``openapi.json``), written by hand from the views in
bridge/web/api.py and bridge/web/send.py; tests/test_openapi.py runs schemathesis against a live bridge
with it, so a view that answers outside the document (a status or a field it does not list) fails there.
It is public (no token): it says what the API accepts, nothing about any mailbox.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

blueprint = Blueprint("openapi", __name__, url_prefix="/api/v1")

DOCUMENT = Path(__file__).with_name("openapi.json")
_text = DOCUMENT.read_bytes()  # read once at import: a missing file stops start-up, not a request


@blueprint.get("/openapi.json")
def openapi_document() -> Response:
    return Response(_text, mimetype="application/json")
