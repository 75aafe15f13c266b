#!/usr/bin/env bash
# Every GPU figure the README asks for, in one run (for a machine with CUDA, torch, timm and Triton).
# Usage: PYTHON=python3 bash benchmarks/gpu.sh > gpu.log 2>&1   (about 5-8 minutes on one H100)
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
# 1. Exactness of the compiled Triton kernel against the sort reference, and no host sync in a step.
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py
# 2. Training step: ot / sign / fp32 with AMP at the issue's batch sizes.
timeout 600 $PY benchmarks/train_step.py --device cuda --amp --steps 12 \
    --model resnet18:256:224,resnet50:128:224,vit_small_patch16_224:128:224
# 3. The quantizer alone over whole models.
timeout 300 $PY benchmarks/quantizer.py --device cuda --reps 10 --models resnet50,vit_small_patch16_224
