#!/usr/bin/env bash
# The whole GPU run in one command, from a clone of this repository on a Linux machine with an
# NVIDIA GPU and driver, Python >= 3.10 (with venv and pip) and PyPI reachable:
#
#     bash benchmarks/gpu.sh [RESULTS_DIR]     # RESULTS_DIR: default $OUT, else gpu-results
#
# Steps, each logged to RESULTS_DIR/STEP.log:
#   install  a virtualenv ($VENV, default ${TMPDIR:-/tmp}/jbackprop-gpu-venv) with CUDA JAX
#            from PyPI (pip install -U "jax[$JAX_CUDA]"; JAX_CUDA defaults to cuda12, cuda13
#            needs a driver for CUDA 13) and this project with its test extra
#   devices  nvidia-smi and jax.devices(); fails if JAX's default backend is not the GPU
#   tests    the module tests (pytest)
#   check    jbackprop check             -> RESULTS_DIR/check.json
#   bench    jbackprop bench             -> RESULTS_DIR/bench.json, RESULTS_DIR/bench.md
# A failing step does not stop the next ones; the script exits 1 at the end if any step failed.
# RESULTS_DIR/summary.txt lists each step's exit status and seconds.
#
# JAX_DEFAULT_MATMUL_PRECISION=highest: on Ampere and Hopper GPUs JAX multiplies float32
# matrices in TF32 by default, whose round-off (~4.9e-4) exceeds float32 test tolerances.
# XLA_PYTHON_CLIENT_PREALLOCATE=false: jbackprop check runs its cases in several processes,
# which cannot each take JAX's default 75 % of the GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."

results=${1:-${OUT:-gpu-results}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
venv=${VENV:-${TMPDIR:-/tmp}/jbackprop-gpu-venv}
py="$venv/bin/python"
export JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false
: > "$results/summary.txt"
failed=()

step() {   # step NAME COMMAND...: run COMMAND, its output to the terminal and NAME.log
    local name=$1 status=0 start=$SECONDS
    shift
    echo "== $name: $*" | tee "$results/$name.log"
    "$@" 2>&1 | tee -a "$results/$name.log" || status=$?
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$results/summary.txt"
    if [ "$status" -ne 0 ]; then
        failed+=("$name")
    fi
}

install() {
    "${PYTHON:-python3}" -m venv "$venv" &&
        "$py" -m pip install --disable-pip-version-check -U pip &&
        "$py" -m pip install --disable-pip-version-check -U "jax[${JAX_CUDA:-cuda12}]" &&
        "$py" -m pip install --disable-pip-version-check -e ".[test]" &&
        "$py" -m pip freeze > "$results/pip-freeze.txt"
}

devices() {
    nvidia-smi
    local smi=$?
    "$py" -c '
import jax
print("jax", jax.__version__, "backend", jax.default_backend())
print(jax.devices())
assert jax.default_backend() == "gpu", "JAX does not use the GPU: see the install log"
' && return "$smi"
}

step install install
step devices devices
step tests "$py" -m pytest -q -p no:cacheprovider tests/test_registry.py \
    tests/test_dtype_contract.py tests/test_linear.py tests/test_activations.py \
    tests/test_normalisation.py tests/test_convolution.py tests/test_losses.py tests/test_models.py
step check "$py" -m jbackprop check --json "$results/check.json"
step bench "$py" -m jbackprop bench --json "$results/bench.json" --markdown "$results/bench.md"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (logs in $results)"
    exit 1
fi
echo "all steps passed; results in $results"
