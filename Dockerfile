# syntax=docker/dockerfile:1
#
# plcsense edge worker image: serving only (LiteRT runtime, no TensorFlow), for linux/amd64 and linux/arm64.
#   deploy/build-image.sh registry.example/plcsense             # both platforms, pushed (docker buildx)
#   docker build -t plcsense:local .                            # this machine's platform only
#
# Base pinned by the digest of its multi-platform index (python:3.11-slim-bookworm, Python 3.11.16, 2026-08-25).
# To move to a newer base: docker buildx imagetools inspect python:3.11-slim-bookworm
# and put the "Digest:" it prints here and in the base.digest label below.
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="plcsense" \
      org.opencontainers.image.description="plcsense edge worker: model inference on PLC data over MQTT (LiteRT)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm" \
      org.opencontainers.image.base.digest="sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Fixed, numeric uid/gid so Kubernetes runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 plcsense \
 && useradd --system --uid 10001 --gid plcsense --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin plcsense \
 && mkdir -p /etc/plcsense /models

# Dependencies first, in a layer of their own that a source change does not rebuild: the lock pins every
# package with the hashes of its published wheels (deploy/image/update-lock.sh), for every platform.
COPY deploy/image/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY deploy/image/healthcheck.py /usr/local/lib/plcsense/healthcheck.py

# The package itself, without dependencies (all in the lock) and built with the base's own setuptools.
COPY pyproject.toml README.md LICENSE /tmp/src/
COPY plcsense /tmp/src/plcsense
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
 && pip check \
 && rm -rf /tmp/src

WORKDIR /
USER 10001:10001

# Prometheus metrics, /healthz and /readyz (metrics.port in the config).
EXPOSE 9108

# Liveness (/healthz) on the host and port of the worker's own config and PLCSENSE_METRICS__* overrides.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/plcsense/healthcheck.py"]

# SIGTERM drains in-flight messages and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["plcsense"]
CMD ["serve", "--config", "/etc/plcsense/config.yaml"]
