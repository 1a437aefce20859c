#!/usr/bin/env bash
# GPU checks for the N:M kernels in one command on the lent machine (repo root; Python 3.12
# with jax >= 0.11 preinstalled, no network):
#
#   bash experiments/benchmarks/gpu_checks.sh OUT_DIR [benchmark args...]
#
# 1. installs what the image lacks (flax, optax, orbax-checkpoint, chex, tqdm, pytest,
#    hypothesis, and matplotlib when its wheels were carried) from the wheels carried in
#    .gpu_wheels/ (filled here by experiments/benchmarks/gpu_wheels.sh); nothing when all
#    import already;
# 2. prints the device and the versions of the packages the kernels use;
# 3. runs the GPU tests: pytest -m gpu tests/test_kernels.py tests/test_kernels_nnx.py;
# 4. runs experiments/benchmarks/nm_kernels.py with the given arguments into
#    OUT_DIR/nm_kernels (results.json/csv, speedup.png, nm_policy.json);
# 5. experiments/benchmarks/lm_decode.py into OUT_DIR/lm_decode: greedy decoding of a 2-block
#    2:4 GPT of width 4096, dense vs packed (dispatch, kernel, batch-aware conversion), with the
#    key/value cache, at batch 1 and 16, dispatching with the policy of step 4 (LM_MIN_S
#    seconds are kept for it, default 75);
# 6. with the time left: the SPDY DP tests (tests/test_spdy_dp.py) and, when
#    $JAXCOMPRESS_DATA_DIR/spdy_timings exists (carry a copy), the DP benchmark.
#
# Time: the whole script stops within GPU_CHECKS_BUDGET_S seconds (default 460, under the
# 8 minutes of the issue). Every step runs under `timeout`; the tests may not eat the
# benchmark's minimum (BENCH_MIN_S, default 210 s); the benchmark's own --budget-s (where its
# optional --sweep stops) is set from the time it gets, unless given in the arguments. A step
# that fails, times out (status 124) or is skipped for lack of time (125) does not stop the
# others; the exit status is that of the first failing step. OUT_DIR/summary.txt lists every step with its status and seconds,
# OUT_DIR/<step>.log its output. Environment: PYTHON (default python3), JAX_PLATFORMS
# (default cuda), GPU_CHECKS_BUDGET_S, BENCH_MIN_S, TESTS_MAX_S (default 150), LM_MIN_S.
set -u -o pipefail
out="${1:?usage: gpu_checks.sh OUT_DIR [benchmark args...]}"
shift
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INPUT=1
start=$(date +%s)
deadline=$((start + ${GPU_CHECKS_BUDGET_S:-460}))
bench_min=${BENCH_MIN_S:-210}
lm_min=${LM_MIN_S:-75}
status=0
: >"$out/summary.txt"

left() { echo $((deadline - $(date +%s))); }

# step NAME SECONDS CMD...: run CMD under `timeout SECONDS`, log to OUT_DIR/NAME.log, record it.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, ${limit}s left (status 125)" | tee -a "$out/summary.txt"
        [ "$status" -eq 0 ] && status=125
        return 0
    fi
    echo "== $name (limit ${limit}s, t=$((t0 - start))s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name: status $rc, $(($(date +%s) - t0)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 124 ] && echo "$name: timed out after ${limit}s" | tee -a "$out/summary.txt"
    [ "$status" -eq 0 ] && status=$rc
    return 0
}
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# 1. install from the carried wheels what does not import
install() {
    local missing
    missing=$("$py" - <<'EOF'
import glob
import importlib

need = {"flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
        "chex": "chex", "tqdm": "tqdm", "pytest": "pytest", "hypothesis": "hypothesis"}
if glob.glob(".gpu_wheels/matplotlib-*.whl"):
    need["matplotlib"] = "matplotlib"
missing = []
for module, requirement in need.items():
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(requirement)
print(" ".join(missing))
EOF
    ) || return 1
    if [ -z "$missing" ]; then
        echo "all packages import; nothing to install"
        return 0
    fi
    echo "missing: $missing"
    if [ ! -d .gpu_wheels ]; then
        echo "no .gpu_wheels/ folder: run experiments/benchmarks/gpu_wheels.sh and carry it" >&2
        return 1
    fi
    # shellcheck disable=SC2086  # $missing is a list of requirement names
    "$py" -m pip install -q --no-index --find-links .gpu_wheels $missing && return 0
    # shellcheck disable=SC2086
    "$py" -m pip install -q --user --no-index --find-links .gpu_wheels $missing && return 0
    echo "pip install failed; installing every carried wheel into .gpu_site (--no-deps)" >&2
    "$py" -m pip install -q --no-deps --target .gpu_site .gpu_wheels/*.whl
}
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"; fi
step install "$(min 120 "$(left)")" bash -c "$(declare -f install); py='$py'; install"
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"; fi

# 2. device and versions
step versions "$(min 60 "$(left)")" "$py" - <<'EOF'
import importlib.metadata
import platform
import subprocess

import jax

try:
    subprocess.run(["nvidia-smi", "-L"], check=False)
except OSError as e:
    print("nvidia-smi:", e)
print("python", platform.python_version())
print("devices:", jax.devices())
d = jax.devices()[0]
print("device_kind:", d.device_kind, "compute_capability:", getattr(d, "compute_capability", None))
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "numpy", "flax",
             "optax", "orbax-checkpoint", "pytest", "hypothesis", "matplotlib"):
    try:
        print(f"{name:20s} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name:20s} missing")
EOF

# 3. GPU tests, leaving the benchmarks at least $bench_min + $lm_min seconds
step gpu_tests "$(min "${TESTS_MAX_S:-150}" $(($(left) - bench_min - lm_min)))" \
    "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_kernels_nnx.py

# 4. the benchmark (its sweep, if asked for, stops 60 s before its time runs out)
bench_limit=$(min 330 $(($(left) - lm_min)))
step nm_kernels "$bench_limit" "$py" experiments/benchmarks/nm_kernels.py \
    --out "$out/nm_kernels" --budget-s $((bench_limit - 60)) "$@"

# 5. LM decoding, dense vs packed, dispatching with the policy step 4 just measured
if [ -f "$out/nm_kernels/nm_policy.json" ]; then
    export JAXCOMPRESS_NM_POLICY="$PWD/$out/nm_kernels/nm_policy.json"
    case "$out" in /*) export JAXCOMPRESS_NM_POLICY="$out/nm_kernels/nm_policy.json" ;; esac
fi
step lm_decode "$(min 180 "$(left)")" "$py" experiments/benchmarks/lm_decode.py \
    --out "$out/lm_decode" --layers 2 --reps 3 --prompt-len 4 --steps 124 \
    --variants dense_cached packed_cached packed_for_batch packed_mosaic

# 6. the SPDY DP checks, only with the time left
if [ "$(left)" -ge 90 ]; then
    step spdy_dp_tests $(($(left) - 5)) "$py" -m pytest -q -p no:cacheprovider tests/test_spdy_dp.py
fi
if [ -d "${JAXCOMPRESS_DATA_DIR:-/nonexistent}/spdy_timings" ] && [ "$(left)" -ge 60 ]; then
    step spdy_dp $(($(left) - 5)) "$py" experiments/benchmarks/spdy_dp.py \
        --data "$JAXCOMPRESS_DATA_DIR" --repeats 9 --out "$out/spdy_dp.json"
fi
echo "gpu_checks.sh: status $status after $(($(date +%s) - start)) s" | tee -a "$out/summary.txt"
exit "$status"
