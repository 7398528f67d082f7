# The fine-tuning job's image: the GPU job by default, or its CPU variant for CI and laptops.
#   make image        ->  docker build -t finetune-job:gpu .
#   make image-cpu    ->  docker build --build-arg VARIANT=cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#                           --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU index> -t finetune-job:cpu .
#   docker run --gpus all --env-file .env --read-only --tmpfs /tmp:exec -v scratch:/scratch finetune-job:gpu
# It writes only under /tmp and /scratch, so it runs with a read-only root filesystem, as uid 10001.

# The OS the job runs on. The GPU default is NVIDIA's minimal image of CUDA 13.0, the CUDA of the lock's torch
# 2.11.0: torch's wheels carry the CUDA libraries; the base adds the driver requirement (NVIDIA_REQUIRE_CUDA: an R580
# driver, or R535 to R575 on a data-center GPU) and cuda-compat-13-0 for the latter (README: GPU drivers). Any Debian
# or Ubuntu with Python 3.11+ works (docs/image.md: a build on Ubuntu 24.04 made with debootstrap).
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Which locked dependency set to install: gpu (requirements/gpu.txt) or cpu (requirements/cpu.txt).
ARG VARIANT=gpu

ENV DEBIAN_FRONTEND=noninteractive
# A C compiler and the Python headers stay: Triton compiles its launchers when training starts.
# tini is PID 1, so SIGTERM reaches Python and children are reaped. Not version-pinned (DL3008): the base
# image's tag fixes the release, and its archive's security updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Where pip finds what PyPI lacks (the CPU build of torch): an extra index, or a folder of wheels
# bind-mounted for the build; and a CA bundle for a proxy. Build-time only.
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
# pip compiles the packages' bytecode here, as the job's is below: the root filesystem is read-only when the job
# runs, where each start would otherwise compile every module it imports (torch, transformers, TRL, PEFT and
# datasets alone: 8.5 s instead of 3.2 s on CPU).
COPY requirements/${VARIANT}.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The job's code last: a code change rebuilds only this layer.
WORKDIR /app
COPY entrypoint.py ./
COPY job/ job/
RUN python3 -m compileall -q entrypoint.py job \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin job \
    && mkdir -p /scratch && chmod 1777 /scratch

# Recorded in each run's manifest.json (make image passes `git describe`).
ARG IMAGE_VERSION=dev
# Every cache and compile folder under /tmp or /scratch, so a read-only root filesystem is enough. The compiled
# kernels (Triton's, unsloth's) go to /scratch, so that the next attempt on the same volume reuses them; unsloth
# drops TORCHINDUCTOR_CACHE_DIR and Inductor keeps its cache under the temp dir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMAGE_VERSION=${IMAGE_VERSION} \
    HOME=/tmp \
    SCRATCH_DIR=/scratch \
    HF_HOME=/scratch/hf \
    TRITON_CACHE_DIR=/scratch/.cache/triton \
    UNSLOTH_COMPILE_LOCATION=/scratch/.cache/unsloth_compiled_cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    CUDA_CACHE_PATH=/tmp/.nv
USER 10001
ENTRYPOINT ["/usr/bin/tini", "--", "python", "/app/entrypoint.py"]
