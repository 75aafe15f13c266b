#!/usr/bin/env bash
# Every GPU figure the README asks for, in one run (for a machine with CUDA, torch, timm and Triton).
# Usage: PYTHON=python3 bash benchmarks/gpu.sh [PARTS] 2>&1 | tee gpu.log
#   PARTS: which numbered parts below to run, e.g. "1 2 3 4" (about 5 minutes on one H100) or "5" (the
#   whole fine-tune, about 4 minutes); all of them by default. Split them where one command may run 10 minutes.
set -uo pipefail
PARTS=" ${*:-1 2 3 4 5} "
want() { [[ $PARTS == *" $1 "* ]]; }
PY=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
# 1. The compiled Triton kernels against the sort reference and the torch quantizers; grouped launches and
#    the tied gradient node; no host synchronization in a training step (set_sync_debug_mode("error")).
want 1 && timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_step_weights.py
# 2. Training step: ot / sign / fp32 (and ot built layer by layer, and channels-last) at the issue's sizes.
want 2 && timeout 360 $PY benchmarks/train_step.py --device cuda --amp --steps 12 --channels-last \
    --model resnet18:256:224,resnet50:128:224,vit_small_patch16_224:128:224
want 2 && timeout 120 $PY benchmarks/train_step.py --device cuda --steps 12 --model resnet50:64:224
# 3. The quantizer alone over whole models: wall time per call, and GPU time from a CUDA graph.
want 3 && timeout 180 $PY benchmarks/quantizer.py --device cuda --reps 10 --models resnet50,vit_small_patch16_224
# 4. Where a ViT step's time goes (fp32 against ot), and finetune --compile / --channels-last end to end.
want 4 && timeout 120 $PY benchmarks/train_step.py --device cuda --amp --steps 3 --profile --model vit_small_patch16_224:128:224
want 4 && timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_train.py -k "compile_and_channels_last or no_device_sync"
# 5. The whole fine-tune against a plain timm distillation loop (issue 27: at most 1.05x): resnet18 and
#    resnet50 at 224 under AMP, synthetic JPEGs on local disk, and the loader's share of a step.
want 5 && timeout 240 $PY benchmarks/finetune.py --device cuda --amp --data jpeg --img-size 224 --workers 8 \
    --epochs 3 --repeats 2 --model resnet18 --batch 128
want 5 && timeout 240 $PY benchmarks/finetune.py --device cuda --amp --data jpeg --img-size 224 --workers 8 \
    --epochs 3 --repeats 2 --model resnet50 --batch 64
