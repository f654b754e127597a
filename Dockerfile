# The selma job image: every phase runs `python -m jobs.run ...` (or `torchrun ... -m jobs.run ...`
# for multi-GPU training) in it; the controller (`python -m jobs.submit`) can run in it too.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t selma-job .
#
# CUDA: torch's CUDA wheels bring their own CUDA libraries (cuBLAS, cuDNN, NCCL, ...) as pip
# packages, so the base only needs what the NVIDIA container toolkit expects (the driver is the
# node's). The `base` flavour of the CUDA image is therefore enough; a `cudnn-runtime` base would add
# a second copy of those libraries (gigabytes). torch 2.13.0's own Linux build is CUDA 13.0 (driver
# >= 580); for older drivers pass e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (if that torch build exists there)
# Both stages must use the same CUDA_IMAGE: the venv's python is the base's /usr/bin/python3.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# --- builder: a venv at /opt/venv with torch and the pinned dependencies ---------------------------
# selma itself is not installed into it: the runtime runs the code from /app (first on PYTHONPATH),
# so the venv, gigabytes of CUDA wheels, stays one cached layer that a code change does not touch.
FROM ${CUDA_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base tag pins the Ubuntu release; exact apt versions vanish from the archive and break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CUDA wheel index, pinned; the constraint keeps the later installs from
# replacing it with another build.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt

# The dependencies, read from pyproject.toml (dependencies + the kubernetes extra) at the exact
# versions of constraints.txt (what the tests ran with); copied alone, so a code change does not
# reinstall them.
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['kubernetes']))" > /tmp/requirements.txt \
    && cat constraints.txt >> /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt

# --- runtime ---------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="selma-job" \
      org.opencontainers.image.description="SELMA pipeline jobs: python -m jobs.run --phase P --config FILE" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.selma.torch-version="${TORCH_VERSION}"

# Same python3 as the builder's (the venv links to it). gcc, libc6-dev and python3-dev: torch.compile
# (train.compile and images.compile default to auto, which compiles on CUDA) has Triton build its
# launcher with a C compiler against Python.h at run time; without them every GPU job would fail
# at its first compiled step.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 selma \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin selma \
    && mkdir -p /cache/huggingface \
    && chown -R 10001:10001 /cache

COPY --from=builder /opt/venv /opt/venv

# /cache and /tmp are the only paths written at run time: with readOnlyRootFilesystem the pod mounts
# an emptyDir (or a cache volume) on each (`docker run --read-only --tmpfs /tmp --tmpfs /cache ...`).
# HOME is /tmp, as the Job templates set it: what libraries write to ~ is per pod, never put in a
# cache volume that pods may share.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib

# The code again under /app (first on PYTHONPATH, so it is the copy that runs) beside what it reads:
# configs, skills and k8s/ (the controller reads the Job templates under k8s/jobs/).
WORKDIR /app
COPY --chown=root:root pyproject.toml README.md ./
COPY --chown=root:root selma_core ./selma_core
COPY --chown=root:root jobs ./jobs
COPY --chown=root:root configs ./configs
COPY --chown=root:root skills ./skills
COPY --chown=root:root k8s ./k8s
RUN python -m compileall -q selma_core jobs

# Last: a build argument invalidates the cache of every RUN after its ARG, so the commit, new at
# every build, comes after them all.
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.revision="${GIT_COMMIT}"
ENV SELMA_GIT_COMMIT=${GIT_COMMIT}

USER 10001:10001

# Jobs have no use for a HEALTHCHECK: Kubernetes ignores it and a Job's health is its exit code.
# The Kubernetes executor sets `command:` itself (python -m jobs.run ... or torchrun ... -m jobs.run).
ENTRYPOINT ["python", "-m", "jobs.run"]
CMD ["--help"]
