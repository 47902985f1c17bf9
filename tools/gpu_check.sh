#!/usr/bin/env bash
# GPU check (one call on a CUDA machine, ≤ 8 minutes): the CUDA tests, the overhead benchmark on CUDA with
# set_sync_debug_mode("error") around the measured steps, ResNet-50 AMP step times and C-SWAP's engines on ResNet-18.
# Results land in $OUT (or ./gpu_check_out): pytest log, one JSON line per benchmark, nvidia-smi.
#   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$out/torch.txt"
status=0
timeout 240 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -n 40 | tee "$out/pytest_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 python benchmarks/overhead.py --device cuda --sync-debug --steps 6 --rounds 2 2>&1 | tail -n 1 | tee "$out/overhead_cuda.json"
timeout 180 python benchmarks/gpu_timing.py --device cuda 2>&1 | tail -n 1 | tee "$out/gpu_timing.json"
exit $status
