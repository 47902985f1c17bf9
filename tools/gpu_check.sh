#!/usr/bin/env bash
# GPU check (one call on a CUDA machine, ≤ 8 minutes): ResNet-50 AMP step times (also channels_last) and C-SWAP's
# engines on ResNet-18
# first (alone on the GPU, so the timings are clean), then the CUDA tests, then the overhead benchmark on CUDA with
# set_sync_debug_mode("error") around the measured steps. Every part has its own time limit and writes its whole log
# as it goes, so a part that runs long loses only itself.
# Results land in $OUT (or ./gpu_check_out): one log per part, the JSON lines, nvidia-smi.
#   bash tools/gpu_check.sh            (PYTHON=python3 bash tools/gpu_check.sh where `python` is not the right one)
# A bare GPU machine lacks grad-cam, ttach, torch-pruning and zennit: `bash tools/gpu_wheels.sh` builds their wheels
# into .whl here, to carry (its header says how to install them there).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
py="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$out/torch.txt"
status=0
timeout 240 "$py" benchmarks/gpu_timing.py --device cuda 2>&1 | tee "$out/gpu_timing.log" | grep '^{' || status=1
# the tests in parallel where pytest-xdist is installed: they are small models, launch-bound, and independent
par=$("$py" -c "import xdist" 2>/dev/null && echo "-n 4" || true)
# shellcheck disable=SC2086
timeout 100 "$py" -m pytest -q -p no:cacheprovider -o addopts="" $par -m cuda tests/test_cuda.py -rA 2>&1 \
    | tee "$out/pytest_cuda.log" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 "$py" benchmarks/overhead.py --device cuda --sync-debug --steps 6 --rounds 2 --defaults-only 2>&1 \
    | tee "$out/overhead_cuda.log" | grep '^{' || status=1
exit $status
