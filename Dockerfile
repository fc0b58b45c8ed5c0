# One image for Kubernetes, SageMaker, RunPod and `docker run --gpus all` (docs/deploy.md).
#
#   docker build -t qlora-job .
#
# Build arguments:
#   BASE_IMAGE       CUDA base. Only the `base` flavour (no CUDA libraries): the torch wheel brings
#                    its own CUDA runtime, cuBLAS, cuDNN and NCCL as pip packages, so a `runtime` or
#                    `cudnn` base would ship a second copy (about 3 GB) that nothing loads. The host
#                    driver must support CUDA 12.8 (driver >= 570).
#   TORCH_INDEX_URL  where torch comes from; TORCH_VERSION which one (a CUDA 12.8 build by default).
#                    scripts/image-check.sh builds this same file on a Debian base with a CPU torch.
#   VERSION, REVISION, CREATED   OCI labels, set by CI (e.g. --build-arg REVISION=$(git rev-parse HEAD)).
#   JOB_EXTRAS       optional dependency groups of the job installed too; default `gpu` (liger-kernel,
#                    whose Triton kernels train.liger: auto uses on CUDA; it needs triton, which the
#                    CUDA torch wheel already brings). Empty: without them.
#
# No HEALTHCHECK on purpose: this is a batch job, not a service. It is "healthy" while it runs and
# reports through its exit code (0, 1, 2, 3, 75); a health probe could only kill a long step.
#checkov:skip=CKV_DOCKER_2:Batch job, not a service: health is the exit code; a HEALTHCHECK could only kill a long training step.
#checkov:skip=CKV_DOCKER_7:FROM uses the BASE_IMAGE build argument, whose default is a pinned tag (nvidia/cuda:12.8.1-base-ubuntu24.04); checkov does not resolve build arguments.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# builder: a virtualenv in /opt/venv with torch and the job. pip, its caches and the source tree
# stay here; the runtime stage copies only the virtualenv.
FROM ${BASE_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.11.0
ARG JOB_EXTRAS=gpu

# pip settings for builds behind a package mirror or a TLS-inspecting proxy; unset: pip's defaults.
# They exist in this stage only: nothing of them reaches the runtime image.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Versions come from the base image's release (Ubuntu 24.04: Python 3.12); pinning Debian/Ubuntu
# package versions would break on every point release of the base and on the Debian check base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and alone: it is most of the image (a CUDA build is several GB), and this layer stays
# cached while the job's code and other dependencies change.
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The job and its dependencies, at the exact versions the test suite ran with (the constraints),
# from PyPI. torch is already satisfied and is not touched.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints.txt ./
COPY job ./job
RUN /opt/venv/bin/pip install --constraint constraints.txt ".${JOB_EXTRAS:+[$JOB_EXTRAS]}" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/job --version

# ---------------------------------------------------------------------------------------------
# runtime: the base image, Python, tini, the virtualenv and the entry point; nothing else.
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BASE_IMAGE

LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="Fine-tunes a causal LM with QLoRA (NF4 base + LoRA): format -> train -> merge -> evaluate, resumable from object storage." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV DEBIAN_FRONTEND=noninteractive

# python3: the virtualenv's interpreter is the base image's (/usr/bin/python3, same release as in
# the builder). tini: PID 1 that forwards SIGTERM to the job and reaps data-loader processes; without
# it a SIGTERM before the job installs its handler would be ignored (PID 1 has no default actions).
# ca-certificates: TLS to S3 and other endpoints. Versions: see the builder stage (DL3008).
# The user: fixed numeric UID/GID 10001 (above any host's ordinary users) so that Kubernetes'
# runAsNonRoot can check it and files on mounted folders belong to a predictable owner. Its home is
# also writable by group 0, for platforms that run images under an arbitrary UID in group 0.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 job \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/job --shell /usr/sbin/nologin job \
    && mkdir -p /home/job/.cache \
    && chown -R 10001:0 /home/job \
    && chmod -R g=u /home/job

COPY --from=builder /opt/venv /opt/venv
COPY entrypoint.sh /usr/local/bin/entrypoint.sh

# Caches live under the user's home: Hugging Face (HF_HOME defaults to $XDG_CACHE_HOME/huggingface),
# pip, matplotlib, and the job's own model downloads (~/.cache/qlora-job, or $JOB_CACHE_DIR). None is
# set explicitly, so the entry point can move them to /workspace on RunPod. With a read-only root
# filesystem (Kubernetes), mount a writable volume on /home/job and on /tmp (k8s/base does).
# PYTHONDONTWRITEBYTECODE: bytecode was compiled at install time; nothing is written next to code.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/job \
    XDG_CACHE_HOME=/home/job/.cache \
    MPLCONFIGDIR=/home/job/.cache/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

USER 10001:10001
WORKDIR /home/job

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["run"]
