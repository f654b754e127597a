# The selma job image: every phase runs `python -m jobs.run ...` in it.
# torch's CUDA wheels bundle the CUDA runtime, so a slim Python base is enough on GPU nodes
# (the NVIDIA container toolkit provides the driver).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY selma_core ./selma_core
COPY jobs ./jobs
COPY configs ./configs
COPY skills ./skills
RUN pip install --no-cache-dir ".[kubernetes]" \
    && useradd --create-home --uid 10001 selma \
    && mkdir -p /cache && chown selma /cache

USER 10001
ENTRYPOINT ["python", "-m", "jobs.run"]
CMD ["--help"]
