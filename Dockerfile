# The stn-pipeline image: the `stn-pipeline` CLI (run, watch, serve, ...) and the training
# worker entry points, installed from the project's pinned constraints.
#
#   docker build -t stn-pipeline:0.1.0 .                                     # CPU
#   docker build --build-arg TF_EXTRAS=and-cuda -t stn-pipeline:0.1.0-gpu .  # CUDA workers
#
# Runs as the non-root user 1000 with a read-only root filesystem in k8s/: everything it
# writes goes to mounted volumes (/stn/home) or to /tmp.

FROM python:3.11.11-slim-bookworm AS build
# tfx 1.16.0 declares Requires-Python <3.11 although its whole stack ships cp311 wheels.
ENV PIP_IGNORE_REQUIRES_PYTHON=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Empty for the CPU image; "and-cuda" adds TensorFlow's CUDA libraries (pinned in constraints.txt).
ARG TF_EXTRAS=""
# g++ builds the native CPU sampler (stn_model/native); the runtime stage needs only libstdc++,
# which TensorFlow needs too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY stn_model/ stn_model/
COPY components/ components/
COPY pipeline/ pipeline/
# -P: build next to the installed package in site-packages, not next to /src/stn_model.
RUN /opt/venv/bin/pip install -c constraints.txt "pip<26" setuptools wheel \
 && /opt/venv/bin/pip install -c constraints.txt . ${TF_EXTRAS:+"tensorflow[${TF_EXTRAS}]"} \
 && /opt/venv/bin/python -P -m stn_model.native.build

FROM python:3.11.11-slim-bookworm
RUN groupadd --gid 1000 stn \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin stn \
 && mkdir /stn && chown 1000:1000 /stn
COPY --from=build /opt/venv /opt/venv
# TF 2.16 does not find the pip-installed CUDA libraries by itself (tensorflow/tensorflow#63362);
# the paths are harmless in the CPU image, where they do not exist.
ENV PATH=/opt/venv/bin:$PATH \
    TF_USE_LEGACY_KERAS=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cuda_cupti/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cufft/lib:/opt/venv/lib/python3.11/site-packages/nvidia/curand/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cusolver/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cusparse/lib:/opt/venv/lib/python3.11/site-packages/nvidia/nccl/lib:/opt/venv/lib/python3.11/site-packages/nvidia/nvjitlink/lib
USER 1000:1000
WORKDIR /stn
ENTRYPOINT ["stn-pipeline"]
CMD ["--help"]
