# The Mailio bridge for Postal: one image for the web process and the worker.
#
#   docker build -t mailio-bridge .
#
# Web (the default command; put the TLS proxy of postal_config/nginx.conf.example in front of it):
#   docker run -d --name bridge-web -p 127.0.0.1:8080:8080 \
#     -e BRIDGE_DOMAIN=example.com -e BRIDGE_REDIS_URL=redis://redis:6379/0 \
#     -e BRIDGE_STORAGE_URL=s3://mail-bucket -e BRIDGE_POSTAL_URL=https://postal.example.com \
#     -e AWS_ENDPOINT_URL=... -e AWS_ACCESS_KEY_ID=... -e AWS_SECRET_ACCESS_KEY=... mailio-bridge
#
# Worker (same image and the same environment, another command; it serves no HTTP, so turn the
# health check off):
#   docker run -d --name bridge-worker --no-healthcheck <same -e options> mailio-bridge python -m bridge worker
#   (docker compose: `command: ["python", "-m", "bridge", "worker"]` and `healthcheck: {disable: true}`)
#
# In a container BRIDGE_REDIS_URL is required: the private Redis of `make run` is not started here.
# With the filesystem object store (no BRIDGE_STORAGE_URL), mount one volume at /data into the web
# and the worker containers alike. Operator commands run in the same way; a generated private key
# belongs to the mailbox owner, not next to the mail: copy it out and delete it from the container.
#   docker exec bridge-web python -m bridge mailbox add jane@example.com --key-out /tmp/jane.key.json
#   docker cp bridge-web:/tmp/jane.key.json . && docker exec bridge-web rm /tmp/jane.key.json
# Every BRIDGE_* setting is listed in bridge/settings.py.

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

# Runtime dependencies only (requirements-dev.txt stays out of the image).
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY bridge/ ./bridge/
COPY wsgi.py gunicorn.conf.py ./

ENV BRIDGE_DATA_DIR=/data \
    BRIDGE_LISTEN=0.0.0.0:8080 \
    BRIDGE_WEB_WORKERS=4

USER bridge
VOLUME ["/data"]
EXPOSE 8080

# 200 when Redis and the object store answer, 503 otherwise; python because slim has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=8)\nexcept Exception as exc:\n    sys.exit(f'unhealthy: {exc}')"]

# gunicorn.conf.py reads BRIDGE_LISTEN, BRIDGE_WEB_WORKERS, BRIDGE_WEB_THREADS and BRIDGE_READ_TIMEOUT and
# says why each choice (threaded workers with a read deadline: slow clients cannot hold the process).
# exec form: gunicorn gets docker's SIGTERM and stops gracefully.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
