# syntax=docker/dockerfile:1
#
# plcsense edge worker image: serving only (LiteRT runtime, no TensorFlow).
# Build from the repository root:  docker build -t plcsense:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Fixed, numeric uid/gid so Kubernetes runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 plcsense \
 && useradd --system --uid 10001 --gid plcsense --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin plcsense \
 && mkdir -p /etc/plcsense /models

# Base install only; `.[train]` would pull in TensorFlow.
COPY pyproject.toml README.md /tmp/src/
COPY plcsense /tmp/src/plcsense
RUN pip install --no-cache-dir /tmp/src \
 && rm -rf /tmp/src

WORKDIR /
USER 10001:10001

# Prometheus metrics, /healthz and /readyz.
EXPOSE 9108

# Liveness only (/healthz); readiness (/readyz) is for the orchestrator to decide on traffic.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PLCSENSE_METRICS__PORT', '9108'), timeout=4)"]

# SIGTERM drains in-flight messages and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["plcsense"]
CMD ["serve", "--config", "/etc/plcsense/config.yaml"]
