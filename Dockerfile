# The selma job image: every phase runs `python -m jobs.run ...` in it.
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t selma-job .
# torch's CUDA wheels bundle the CUDA runtime, so a slim Python base is enough on GPU nodes
# (the NVIDIA container toolkit provides the driver).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG GIT_COMMIT=unknown

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    SELMA_GIT_COMMIT=${GIT_COMMIT}

WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Dependencies first, from pyproject.toml alone: a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['kubernetes']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

COPY README.md ./
COPY selma_core ./selma_core
COPY jobs ./jobs
COPY configs ./configs
COPY skills ./skills
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 selma \
    && mkdir -p /cache && chown selma /cache

USER 10001
ENTRYPOINT ["python", "-m", "jobs.run"]
CMD ["--help"]
