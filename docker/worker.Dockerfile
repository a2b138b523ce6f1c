# syntax=docker/dockerfile:1
#
# GPU worker for scoring pods (Kubernetes) and Slurm jobs: CUDA 12.8, Python 3.11,
# torch from PyTorch's cu128 index and the automixer package. No Airflow inside. The
# entrypoint is the `automixer` CLI, so a container's arguments are one pipeline step:
#   docker run --rm --gpus all -v "$PWD/configs:/opt/automixer/configs:ro" \
#       -v "$PWD/data:/opt/automixer/data:ro" -v "$PWD/runs:/opt/automixer/runs" \
#       automixer-gpu:0.1.0 evaluate -c /opt/automixer/configs/demo.yaml
#
# Build context: the repository root.
#   docker build -f docker/worker.Dockerfile -t automixer-gpu:0.1.0 .
#   docker compose --profile gpu build automixer-worker
#
# The cu128 torch wheels bring their own CUDA runtime libraries (nvidia-* wheels), so
# the `base` flavour of the CUDA image is enough: it supplies the CUDA compat package
# and the NVIDIA_* variables the NVIDIA container runtime needs to mount the driver.
# Ubuntu 22.04 is the newest Ubuntu whose own archive has Python 3.11
# (pyproject.toml: requires-python >=3.11,<3.12).
FROM nvidia/cuda:12.8.1-base-ubuntu22.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# DL3064 (secrets in ENV) misfires on TOKENIZERS_PARALLELISM; nothing here is secret.
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AUTOMIXER_HOME=/opt/automixer \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/opt/automixer/hf_home \
    TOKENIZERS_PARALLELISM=true

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY constraints.txt pyproject.toml README.md /opt/automixer/src/
COPY automixer_ops/ /opt/automixer/src/automixer_ops/
RUN pip install -c /opt/automixer/src/constraints.txt /opt/automixer/src \
    && rm -rf /opt/automixer/src/build /opt/automixer/src/*.egg-info \
    && automixer --version \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The same layout as the Airflow image (configs/, data/, runs/ under /opt/automixer), so
# a config path that works in an Airflow task works in a scoring pod. Group 0 may write,
# for clusters that run pods under an arbitrary uid with group 0.
RUN useradd --create-home --uid 1000 --gid 0 automixer \
    && mkdir -p /opt/automixer/configs /opt/automixer/data /opt/automixer/runs /opt/automixer/hf_home \
    && chown -R 1000:0 /opt/automixer \
    && chmod -R g+rwX /opt/automixer

USER 1000:0
WORKDIR /opt/automixer
ENTRYPOINT ["automixer"]
CMD ["--help"]
