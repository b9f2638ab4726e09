"""Entry point for gunicorn: ``gunicorn wsgi:app``."""

import sys

from bridge import create_app
from bridge.settings import SettingsError

try:
    app = create_app()
except SettingsError as exc:
    sys.exit(f"mailio-bridge: {exc}")
