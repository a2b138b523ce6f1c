# syntax=docker/dockerfile:1
#
# Airflow 3 with the automixer package (CPU torch): the image every service of
# docker-compose.yml runs (api-server, scheduler, dag-processor, triggerer, init).
# It extends the official image the way its docs recommend ("Extending the image"):
# pip runs as the `airflow` user and pins apache-airflow==${AIRFLOW_VERSION} next to
# what it installs, so the base image's Airflow is never up- or downgraded.
#
# Build context: the repository root.
#   docker compose build
#   docker build -f docker/airflow.Dockerfile -t automixer-airflow:0.1.0 .
#
# The Airflow version (the tag below) and the Python version must match
# pyproject.toml (the `airflow` extra) and constraints.txt; tests/test_docker.py checks.
FROM apache/airflow:3.3.2-python3.11

# torch comes first and alone, from PyTorch's CPU index (as `make` installs TORCH first):
# the project's dependency on torch is a range, and this keeps the CUDA build out.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The run layout inside the containers (docker-compose.yml mounts the host's directories
# here): configs/ and data/ read-only, runs/ read-write, hf_home/ the Hugging Face cache.
# Relative paths in a config resolve against the config's own directory, so
# /opt/automixer/configs/demo.yaml reads ../data and writes ../runs as it does on a laptop.
# DL3064 (secrets in ENV) misfires on TOKENIZERS_PARALLELISM; nothing here is secret.
# hadolint ignore=DL3064
ENV AUTOMIXER_HOME=/opt/automixer \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/opt/automixer/hf_home \
    TOKENIZERS_PARALLELISM=true

USER root
# Group 0 owns and may write everything, as in the official image, so that any
# AIRFLOW_UID (with group 0) can write runs/ and the cache.
RUN mkdir -p /opt/automixer/configs /opt/automixer/data /opt/automixer/runs \
        /opt/automixer/hf_home /opt/automixer/src \
    && chown -R airflow:0 /opt/automixer \
    && chmod -R g+rwX /opt/automixer

USER airflow
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Only what building the package needs (pyproject's readme is README.md); .dockerignore
# keeps everything else, .env included, out of the build context.
COPY --chown=airflow:0 constraints.txt pyproject.toml README.md /opt/automixer/src/
COPY --chown=airflow:0 automixer_ops/ /opt/automixer/src/automixer_ops/
RUN pip install --no-cache-dir -c /opt/automixer/src/constraints.txt \
        "apache-airflow==${AIRFLOW_VERSION}" /opt/automixer/src \
    && rm -rf /opt/automixer/src/build /opt/automixer/src/*.egg-info \
    && automixer --version \
    && python -c "import torch, airflow; print('torch', torch.__version__, 'airflow', airflow.__version__)"

# DAGs and plugins where the official image looks for them ([core] dags_folder,
# [core] plugins_folder under AIRFLOW_HOME=/opt/airflow).
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
