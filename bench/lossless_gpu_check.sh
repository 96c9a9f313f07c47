#!/usr/bin/env bash
# One device call for the GPU decoder: the tests on CUDA, then bench/lossless_gpu.py with its profile.
#
# Prepare here (once; see bench/lossless_gpu.py's docstring): .gpu/ holds a payload written by
# `bench/lossless_gpu.py --write-payload`, .whl/ the wheels the device lacks (zstandard; transformers when its
# own is older than pyproject.toml's pin). Then run on the device, carrying .gpu and .whl:
#     bash bench/lossless_gpu_check.sh
# Session 25 took about 9 minutes of device time for this in three calls (Triton compiles for about three of
# them); TEST_S and BENCH_S bound each half (seconds). NCU=1 adds ncu's stall reasons by source line for one
# rANS launch (about a minute). Results go to $OUT (the device tool's), else bench/results.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python3 -c "import numba, triton, transformers, torch; print('numba', numba.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__, 'torch', torch.__version__)"
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")  # (a hung test, named)
UNWEIGHT_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout "${TEST_S:-300}" python3 -m pytest -v -p no:cacheprovider \
  $per_test --durations=8 tests/test_lossless_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -v "^tests.*PASSED" | tail -30
timeout "${BENCH_S:-240}" python3 bench/lossless_gpu.py --payload .gpu/*.safetensors --rechunk 262144,65536 --profile \
  --synthetic 16x2048 --batch-mb 256 --out "$OUT/lossless_gpu.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/bench.log"
if [ "${NCU:-0}" = 1 ]; then
  timeout 120 ncu --profile-from-start off --kernel-name regex:_decode_chunks --launch-count 1 --import-source yes \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section Occupancy \
    python3 bench/lossless_gpu.py --payload .gpu/*.safetensors --profiled-once > "$OUT/ncu.txt" 2>&1
  grep -A30 "Warp State" "$OUT/ncu.txt" | head -40
fi
