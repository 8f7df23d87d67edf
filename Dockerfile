# The DICOM AI node: DICOM listener on 11112, web viewer and HTTP API on 8000, runtime data in /data.
# Built by `make containers` (scripts/build-containers.sh), with BuildKit: the build's CA bundle and pip settings
# arrive as the secrets `ca_bundle` and `pip_conf`, mounted only while pip runs, so that the image keeps neither.
ARG BASE_IMAGE=debian:bookworm-slim

# --- build: Debian's Python 3.11, a virtual environment with torch (CPU) and the node ---------------------------
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned as in the Makefile: the CPU wheel of docker/wheels (its dependencies from the index), else
# the CPU index, so that nothing installed after it pulls a CUDA build. Then the node's dependencies, from
# pyproject.toml alone (the readme it names is an empty stand-in here), so that this layer is built again only
# when they change.
COPY pyproject.toml /src/
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=secret,id=pip_conf \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi; \
    set -e; \
    if ls /wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
        pip install --find-links /wheels torch==2.13.0+cpu; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    fi; \
    touch /src/README.md; \
    pip install "setuptools>=77" /src

# The node itself, offline: its dependencies and build backend are installed.
COPY README.md /src/
COPY dicom_node /src/dicom_node
COPY inference /src/inference
COPY web /src/web
RUN pip install --no-index --no-deps --no-build-isolation --force-reinstall /src

# --- the image: the virtual environment, the config, the demo weights and their cards; no compiler, no pip cache -
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DICOM_NODE_WEB__HOST=0.0.0.0 \
    DICOM_NODE_STORAGE__ROOT=/data

WORKDIR /app
COPY config.yaml /app/config.yaml
# The model cards and weights config.yaml names (relative to /app): without them the node stops at start.
COPY models /app/models

RUN groupadd --system --gid 10001 dicomnode \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dicomnode \
    && mkdir /data && chown 10001:10001 /data
VOLUME /data
USER 10001:10001

EXPOSE 11112 8000
# 200 from the node's own /health, on the web port its settings give (every role serves it).
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "dicom_node.probe", "--config", "/app/config.yaml"]
# `serve` runs the whole node; a cluster's services give other commands (docker-compose.cluster.yml).
ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/app/config.yaml"]
