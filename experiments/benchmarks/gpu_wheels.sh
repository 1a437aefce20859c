#!/usr/bin/env bash
# Fill .gpu_wheels/ (repo root) with the wheels that gpu_checks.sh installs on the lent GPU
# machine, which has Python 3.12 and jax/jaxlib/numpy but no network. Run it here, on a
# networked machine, from the repository root:
#
#   bash experiments/benchmarks/gpu_wheels.sh [--plot] [PYTHON]   # PYTHON: one with pip
#
# then carry `.gpu_wheels` to the device (the device tool's `carry`, at most 64 MiB in all).
# The list is the closure, beyond jax/jaxlib/numpy/scipy/ml_dtypes/opt_einsum, of what the
# kernels' GPU tests, the benchmark (its _timing helper imports jaxcompress.checkpoint, hence
# Orbax) and the NNX conversion import: flax, optax, orbax-checkpoint, chex, tqdm, pytest,
# hypothesis and their runtime dependencies: 33 wheels, about 31 MiB. `--plot` adds matplotlib
# and its dependencies (10 wheels, +27 MiB, 58 MiB in all: close to the carry limit); without
# it the benchmark records the missing figure as a failure and the figure is drawn here
# afterwards: `python experiments/benchmarks/nm_kernels.py --replot OUT_DIR/nm_kernels`.
# The pins are a set known to work together with jax 0.11.1-0.12 (flax 0.12.12 needs jax
# >= 0.11.1).
# `--no-deps`: every dependency is listed here, so the download is exactly this list.
set -euo pipefail
plot=0
if [ "${1:-}" = "--plot" ]; then
    plot=1
    shift
fi
python="${1:-}"
if [ -z "$python" ]; then
    for candidate in python3.12 python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -m pip --version >/dev/null 2>&1; then
            python="$candidate"
            break
        fi
    done
fi
[ -n "$python" ] || { echo "gpu_wheels.sh: no python with pip found; pass one" >&2; exit 2; }
dest=.gpu_wheels
mkdir -p "$dest"

packages=(
    # Flax NNX and what it imports
    flax==0.12.12 msgpack==1.2.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
    Pygments==2.21.0 treescope==0.1.10 PyYAML==6.0.4 typing_extensions==4.16.0
    # optax / chex
    optax==0.2.8 absl-py==2.5.1 chex==0.1.92 toolz==1.2.0
    # Orbax (jaxcompress.checkpoint; flax depends on it)
    orbax-checkpoint==0.12.8 tensorstore==0.1.86 etils==1.15.0 fsspec==2026.9.0
    importlib_resources==7.1.0 zipp==4.1.2 prometheus_client==0.26.0 aiofiles==25.1.0
    protobuf==7.36.2 humanize==4.17.0 simplejson==4.3.0 psutil==7.2.2 uvloop==0.23.0
    # jaxcompress itself
    tqdm==4.70.1
    # the tests
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 hypothesis==6.170.27
    sortedcontainers==2.4.0
)
if [ "$plot" -eq 1 ]; then
    packages+=(
        matplotlib==3.11.2 contourpy==1.4.0 cycler==0.12.1 fonttools==4.69.1 kiwisolver==1.5.1
        pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0 tzdata==2026.6
    )
fi

# manylinux_2_27/2_28 too: some current wheels (tensorstore, pillow) are built only for them;
# the device image (CUDA 12/13, Python 3.12) has a newer glibc. Stale wheels of another list
# are removed first, so the folder holds exactly this list.
rm -f "$dest"/*.whl
"$python" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$dest" "${packages[@]}"

count=$(find "$dest" -name '*.whl' | wc -l)
bytes=$(du -sb "$dest" | cut -f1)
echo "gpu_wheels.sh: $count wheels, $((bytes / 1048576)) MiB in $dest"
if [ "$bytes" -gt $((60 * 1048576)) ]; then
    echo "gpu_wheels.sh: more than 60 MiB; the device tool carries at most 64 MiB" >&2
    exit 1
fi
