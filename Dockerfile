# The DICOM AI node: DICOM listener on 11112, web viewer and HTTP API on 8000, runtime data in /data.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch first, from the CPU index, so that nothing installed after it pulls a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The project itself; the source is built from /tmp and removed, the installed package is what runs.
COPY pyproject.toml /tmp/src/
COPY dicom_node /tmp/src/dicom_node
COPY inference /tmp/src/inference
COPY web /tmp/src/web
RUN pip install /tmp/src && rm -rf /tmp/src

WORKDIR /app
COPY config.yaml /app/config.yaml
# The model cards and weights config.yaml names (relative to /app): without them the node stops at start.
COPY models /app/models

RUN groupadd --system --gid 10001 dicomnode \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dicomnode \
    && mkdir /data && chown 10001:10001 /data
VOLUME /data

ENV DICOM_NODE_WEB__HOST=0.0.0.0 \
    DICOM_NODE_STORAGE__ROOT=/data

USER 10001:10001
EXPOSE 11112 8000
# `serve` runs the whole node; a cluster's services give other commands (docker-compose.cluster.yml).
ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/app/config.yaml"]
