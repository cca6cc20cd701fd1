# syntax=docker/dockerfile:1
# FlashTune worker: claims queued jobs and trains them on an NVIDIA GPU ((Q)LoRA; bitsandbytes for 4-bit). The
# same image serves the API on a GPU (compose.yaml's "gpu" profile: NF4 base + adapters, CUDA graph decoding).
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t flashtune-worker:0.1.0 .
# Run with a GPU (NVIDIA Container Toolkit on the host): docker run --gpus all ... ; see docs/operations.md.
#
# The torch wheel brings its own CUDA 13.0 libraries, so the CUDA "base" flavour is enough here: it adds the
# driver hooks the NVIDIA runtime needs, not a second copy of the libraries. The host driver must support
# CUDA 13.0 (R580 or newer); for an older driver build with a matching PyTorch index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLASHTUNE_DATA_DIR=/data \
    HF_HOME=/data/hf

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's python3 (3.12 on 24.04). The base image tag pins the release; exact .deb versions are not pinned
# because the Ubuntu archive drops superseded versions, which would break every rebuild after an update.
# gcc, libc6-dev and python3-dev: Triton (Liger's fused kernels) compiles a small C launcher against Python's
# headers the first time a kernel runs; without them every fused kernel fails to warm up and the CUDA plan falls
# back to torch's own layers (slower; the job's "fallback" event says so).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The same uid/gid as the API image, so both can write the shared data volume.
RUN groupadd --system --gid 10001 flashtune \
    && useradd --system --uid 10001 --gid flashtune --create-home --home-dir /home/flashtune flashtune \
    && install -d -o flashtune -g flashtune /data

# The CUDA build of torch, pinned; bitsandbytes (4-bit NF4 quantization), liger-kernel (the cuda extra: fused
# kernels) and the rest come pinned from docker/constraints.txt through the project's dependencies.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY service service
COPY workers workers
RUN pip install --no-cache-dir --constraint docker/constraints.txt ".[postgres,cuda]" \
    && python -c "import bitsandbytes, peft, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && python -c "import sysconfig, os, shutil; assert shutil.which('gcc') and os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')"
COPY docker/healthcheck.py /usr/local/bin/flashtune-healthcheck

USER 10001:10001
VOLUME ["/data"]
# Alive = the worker process runs and the database answers (the worker has no port to ask).
HEALTHCHECK --interval=30s --timeout=20s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/flashtune-healthcheck", "worker"]
# On SIGTERM the running job checkpoints and is requeued; give it time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["flashtune", "worker"]
