# syntax=docker/dockerfile:1
# chatd image: docs/DEPLOY.md §4. Linted in CI (hadolint) and kept in step with pyproject.toml
# (tests/integration/test_docker.py).
#
#   docker build -t chatd .
#   docker run -p 8080:8080 --stop-timeout 40 -v chatd-data:/var/lib/chatd chatd
#       embedded PostgreSQL + Valkey in the volume, a generated JWT secret: one container
#   docker run -p 8080:8080 --stop-timeout 40 -e DATABASE_URL=... -e REDIS_URL=... -e JWT_SECRET=... chatd
#       external PostgreSQL (with pgvector) and Redis/Valkey: any number of containers (compose.yaml)
#
# --stop-timeout 40: Docker's default of 10 s would SIGKILL chatd in the middle of its
# 30 s graceful shutdown (server.shutdown_grace_s).

ARG PYTHON_VERSION=3.11

# -- builder: wheels of chatd and every dependency ------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatd ./chatd
COPY sql ./sql
COPY config/chatd.toml ./config/chatd.toml
RUN pip wheel --wheel-dir /wheels .

# -- runtime: the wheels installed, nothing else --------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
# CHATD_AUTH_JWT_SECRET_FILE names a file in the volume, it is not a secret:
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHATD_SERVER_HOST=0.0.0.0 \
    CHATD_STORAGE_DATA_DIR=/var/lib/chatd \
    CHATD_AUTH_JWT_SECRET_FILE=/var/lib/chatd/jwt_secret
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/chatd --create-home --shell /usr/sbin/nologin chatd
# Only the wheels built above (--no-index): the versions are those the builder resolved.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels chatd
USER 10001:10001
WORKDIR /var/lib/chatd
VOLUME ["/var/lib/chatd"]
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness, not readiness: a Postgres outage must not get every container restarted.
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["chatd"]
CMD ["serve"]
