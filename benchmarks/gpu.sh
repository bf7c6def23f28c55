#!/usr/bin/env bash
# `jax-resnet bench` on a CUDA GPU, in one command, from anywhere in the clone:
#
#     benchmarks/gpu.sh                                # all workloads -> benchmarks/gpu.json, benchmarks/gpu.md
#     benchmarks/gpu.sh --workload resnet20 --rounds 30
#
# The first time, it makes a virtual environment ($VENV, default
# ~/.cache/jax-resnet/venv-gpu, outside the clone) with jax[cuda12] in it (the
# pip wheels bring CUDA and cuDNN; the machine needs an NVIDIA driver for
# CUDA 12, i.e. a working `nvidia-smi`, and Python >= 3.10). Every run
# installs this clone into it (editable; jax and its CUDA wheels stay as they are),
# checks that JAX sees a GPU, and runs the benchmark with the same workloads,
# sizes, rounds and report as on the CPU; further arguments go to
# `jax-resnet bench`. The Markdown file is the table the README's "Benchmark"
# section shows; paste it beside the CPU one. $OUT (default benchmarks/gpu)
# names the two files.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/jax-resnet/venv-gpu}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/gpu}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found: no NVIDIA driver here, so JAX has no CUDA GPU to use" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "gpu.sh: installing jax-resnet and jax[cuda12] into $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e . "jax[cuda12]"
fi
"$VENV/bin/python" -m pip install --quiet -e .  # this clone (and any new dependency), also when the venv served another
"$VENV/bin/python" - <<'PY'
import sys

import jax

if jax.default_backend() != "gpu":
    sys.exit(
        f"gpu.sh: jax {jax.__version__} sees no GPU (backend {jax.default_backend()!r}); "
        "see nvidia-smi, then reinstall: pip install -U 'jax[cuda12]'"
    )
print(f"gpu.sh: {jax.devices()[0].device_kind}, jax {jax.__version__}", file=sys.stderr)
PY
"$VENV/bin/jax-resnet" bench --json "$OUT.json" --markdown "$OUT.md" "$@"
echo "gpu.sh: wrote $OUT.json and $OUT.md" >&2
