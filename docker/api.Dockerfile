# syntax=docker/dockerfile:1
# FlashTune API: CPU-only image. It serves the REST API and /analyze (scoring on CPU); training runs in the
# worker image. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t flashtune-api:0.1.0 .
# It refuses to start without FLASHTUNE_API_KEY (it listens on 0.0.0.0); see docs/operations.md.
FROM python:3.11.14-slim-bookworm

# torch is pinned here, everything else in docker/constraints.txt (the versions CI tested).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLASHTUNE_DATA_DIR=/data \
    FLASHTUNE_PORT=8000 \
    FLASHTUNE_DEVICE=cpu \
    HF_HOME=/data/hf

# The same uid/gid as the worker image, so both can write the shared data volume.
RUN groupadd --system --gid 10001 flashtune \
    && useradd --system --uid 10001 --gid flashtune --create-home --home-dir /home/flashtune flashtune \
    && install -d -o flashtune -g flashtune /data

# torch first and from the CPU index: a plain 'torch' from PyPI brings several GB of CUDA libraries.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu"

WORKDIR /app
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY service service
COPY workers workers
RUN pip install --no-cache-dir --constraint docker/constraints.txt ".[postgres]"
COPY docker/healthcheck.py /usr/local/bin/flashtune-healthcheck

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/bin/flashtune-healthcheck", "api"]
CMD ["flashtune", "serve", "--host", "0.0.0.0", "--port", "8000"]
