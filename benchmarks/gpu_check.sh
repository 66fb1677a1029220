#!/usr/bin/env bash
# The accelerator checks of issue 7 as one prepared run (a lent GPU has ~15 minutes in all):
# the estimator benchmark sized for the backend, the multi-device benchmark, and the test
# suite under TF32 matmuls (the default precision of float32 matmuls on recent NVIDIA GPUs).
#
#   bash benchmarks/gpu_check.sh fetch   # here, with package-registry access: wheels the
#                                        # GPU image lacks, into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh         # there, from the repository root, .whl carried;
#                                        # everything it prints also lands in $OUT
#
# The GPU image has jax, flax, optax, orbax, scipy, pytest-xdist and pytest-benchmark but not
# pydantic or mlxtend. pytest-benchmark with xdist emits a warning that filterwarnings=error
# turns into an INTERNALERROR, hence -p no:benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "fetch" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
              typing-inspection==0.4.5 mlxtend==0.25.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$spec" || exit 1
  done
  ls -l .whl
  exit 0
fi

out="${OUT:-/tmp/jaxsens-gpu-check}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tee "$out/devices.txt"
timeout 180 python3 benchmarks/bench_estimators.py 2>&1 | tee "$out/bench_estimators.txt"
timeout 90 python3 benchmarks/bench_devices.py 2>&1 | tee "$out/bench_devices.txt"
# The suite with float32 matmuls in TF32 (where jaxsens claims exactness it sets the
# precision itself); notebooks and the docs build are CPU-side checks and stay in CI.
JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 timeout 330 python3 -m pytest -q -p no:benchmark \
  -p no:cacheprovider -n 8 --durations=15 tests 2>&1 | tee "$out/pytest_tf32.txt"
