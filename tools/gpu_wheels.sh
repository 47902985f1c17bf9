#!/usr/bin/env bash
# Wheels of this project's dependencies that a bare GPU machine lacks (its image has torch, torchvision, lightning,
# scikit-learn, scipy, safetensors, matplotlib, tensorboard, pytest-xdist; not grad-cam, ttach, torch-pruning,
# zennit), built here into ./.whl (pure-Python wheels: grad-cam ships only a source archive). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   PYTHON=python3 bash tools/gpu_check.sh
# (carry `.whl`; add `/.whl/` to .git/info/exclude so that git ignores it).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
versions=$("$py" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("grad-cam", "ttach", "torch-pruning", "zennit")))
PY
)
# shellcheck disable=SC2086
"$py" -m pip wheel -q --no-deps -w .whl $versions
ls -l .whl
