#!/usr/bin/env bash
# GPU checks for the N:M kernels, in one command on a CUDA machine (repo root):
#
#   bash experiments/benchmarks/gpu_checks.sh OUT_DIR [benchmark args...]
#
# 1. prints the device and the versions of the packages the kernels use;
# 2. runs the GPU-only tests (`pytest -m gpu tests/test_kernels.py`);
# 3. runs experiments/benchmarks/nm_kernels.py with the given arguments (default: the
#    full grid) and writes its CSV/JSON/PNG/policy into OUT_DIR/nm_kernels;
# 4. runs the SPDY DP's oracle tests on the GPU (tests/test_spdy_dp.py);
# 5. when $JAXCOMPRESS_DATA_DIR/spdy_timings exists (carry a copy: the machine has no
#    ../shared), the DP benchmark on every shipped table -> OUT_DIR/spdy_dp.json.
#
# It runs from the source tree (PYTHONPATH=.), so a machine whose image already holds
# jax/flax/optax/orbax needs no install. Every step runs even if an earlier one fails;
# the exit status is that of the first failing step.
set -u -o pipefail
out="${1:?usage: gpu_checks.sh OUT_DIR [benchmark args...]}"
shift
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
status=0

nvidia-smi -L || status=$?
python3 - <<'EOF' || status=$?
import importlib
import jax
print("devices:", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "chex", "orbax.checkpoint", "numpy", "triton"):
    try:
        print(f"{name:18s}", getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as err:
        print(f"{name:18s} missing ({err})")
EOF

python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 \
    | tee "$out/gpu_tests.log"
rc=$?; [ "$status" -eq 0 ] && status=$rc

python3 experiments/benchmarks/nm_kernels.py --out "$out/nm_kernels" "$@" 2>&1 \
    | tee "$out/nm_kernels.log"
rc=$?; [ "$status" -eq 0 ] && status=$rc

python3 -m pytest -q tests/test_spdy_dp.py -p no:cacheprovider 2>&1 | tee "$out/spdy_dp_tests.log"
rc=$?; [ "$status" -eq 0 ] && status=$rc

if [ -d "${JAXCOMPRESS_DATA_DIR:-/nonexistent}/spdy_timings" ]; then
    python3 experiments/benchmarks/spdy_dp.py --data "$JAXCOMPRESS_DATA_DIR" --repeats 9 \
        --out "$out/spdy_dp.json" 2>&1 | tee "$out/spdy_dp.log"
    rc=$?; [ "$status" -eq 0 ] && status=$rc
fi
exit "$status"
