# The Mailio bridge for Postal: one image for the web process and the worker (compose.yaml runs both).
#
#   docker build -t mailio-bridge .
#
# Web (the default command; put the TLS proxy of postal_config/nginx.conf.example in front of it):
#   docker run -d --name bridge-web --restart unless-stopped -p 127.0.0.1:8080:8080 --env-file bridge.env \
#     -v bridge-data:/data mailio-bridge
#
# Worker (same image and environment, another command; it serves no HTTP, so no health check):
#   docker run -d --name bridge-worker --restart unless-stopped --env-file bridge.env -v bridge-data:/data \
#     --no-healthcheck mailio-bridge mailio-bridge worker
#
# bridge.env holds the settings (README, Settings): at least BRIDGE_DOMAIN, BRIDGE_PUBLIC_URL,
# BRIDGE_REDIS_URL (required here: the private Redis of `make run` is not started in a container),
# BRIDGE_STORAGE_URL (s3://... with AWS_* for the endpoint and keys) and BRIDGE_POSTAL_URL. The /data
# volume holds the server key (BRIDGE_SERVER_KEY_FILE, default /data/server.key), the spool key and,
# without BRIDGE_STORAGE_URL, the filesystem object store: mount the same volume into web and worker.
# Operator commands run in either container:
#   docker exec bridge-web mailio-bridge keys init
#   docker exec bridge-web mailio-bridge postal-setup
#   docker exec bridge-web mailio-bridge mailbox add jane@example.com --key-out /tmp/jane.key.json
#   docker cp bridge-web:/tmp/jane.key.json . && docker exec bridge-web rm /tmp/jane.key.json
# (a generated private key belongs to the mailbox owner, not next to the mail).

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user; /data is the only place it writes.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --create-home --home-dir /home/bridge bridge \
    && mkdir -p /data \
    && chown bridge:bridge /data

WORKDIR /app

# Runtime dependencies first (a layer that changes only with requirements.txt; no dev tools).
COPY requirements.txt ./
RUN pip install -r requirements.txt

# The package itself, for the console script /usr/local/bin/mailio-bridge (the same verbs as make run's).
COPY pyproject.toml ./
COPY bridge/ ./bridge/
RUN pip install --no-deps . && rm -rf build ./*.egg-info
COPY wsgi.py gunicorn.conf.py ./

ENV BRIDGE_DATA_DIR=/data \
    BRIDGE_LISTEN=0.0.0.0:8080 \
    BRIDGE_WEB_WORKERS=4

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080

# /healthz: the web process lives and answers (readiness, Redis and the store, is /readyz: a store
# outage must not get the container restarted). python because slim has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=8)\nexcept Exception as exc:\n    sys.exit(f'unhealthy: {exc}')"]

# gunicorn.conf.py reads BRIDGE_LISTEN, BRIDGE_WEB_WORKERS, BRIDGE_WEB_THREADS and BRIDGE_READ_TIMEOUT and
# says why each choice (threaded workers with a read deadline: slow clients cannot hold the process).
# exec form: gunicorn gets docker's SIGTERM and stops gracefully.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
