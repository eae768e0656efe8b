# syntax=docker/dockerfile:1
# signing-proxy container image.
#
#   docker build -t signing-proxy .
#
# Stage 1 builds the project wheel and the wheels of everything it needs; the final stage installs
# them with --no-index, so it never talks to a package index and carries no compiler or build tool.
# Nothing secret is baked in: the CDP key and any inbound token are mounted or injected at run time.

FROM python:3.13-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# .dockerignore keeps .git, virtualenvs, caches and key files out of this context.
COPY . .
# CPython 3.13 and the uvloop extra: what measured fastest (docs/benchmarks.md has the figures).
RUN pip wheel --wheel-dir /wheels ".[uvloop]"


FROM python:3.13-slim

LABEL org.opencontainers.image.title="signing-proxy" \
      org.opencontainers.image.description="Authenticating forward proxy that signs requests to Coinbase APIs"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install from the wheels of stage 1 through a bind mount, so the wheel files add no layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/signing_proxy-*.whl /wheels/uvloop-*.whl

# Default config: loopback proxy, admin on 0.0.0.0:9090 (health + metrics only, no secrets), one CDP
# key expected at /secrets/cdp/cdp_api_key.json. Kubernetes mounts its ConfigMap over this directory.
COPY deploy/config.yaml /etc/signing-proxy/config.yaml

# Numeric IDs so Kubernetes' runAsNonRoot can verify the user without an /etc/passwd entry.
USER 10001:10001

# 8080: the proxy; 9090: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9090

# For plain `docker run`; Kubernetes ignores HEALTHCHECK and uses the probes in deploy/.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["signing-proxy", "wait", "--admin", "http://127.0.0.1:9090", "--timeout", "2"]

ENTRYPOINT ["signing-proxy"]
CMD ["serve", "--config", "/etc/signing-proxy/config.yaml"]
