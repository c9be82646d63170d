#!/usr/bin/env bash
# On a machine with one CUDA GPU, from the repository root, in an environment that has
# torch, torchvision, accelerate and click (wandb optional): the test suite on CUDA, then
# the reference recipe eager and with CUDA-graph capture, then the benchmark. < 5 minutes.
#   bash bench/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

# Tests (the multi-process ones run CPU ranks over gloo and are covered by CI).
timeout 150 python -m pytest -q -x -m "not multiprocess" -p no:cacheprovider | tee "$OUT/tests.txt" | tail -3

# Reference recipe on the GPU: eager, bf16, and compiled with CUDA graphs.
for variant in "eager:" "bf16:--mixed-precision bf16" "cudagraphs:--compile reduce-overhead --no-check-finite"; do
    name=${variant%%:*}; args=${variant#*:}
    rm -rf "${OUT:?}/$name"  # a fresh run each time, not a resumed one
    # shellcheck disable=SC2086
    timeout 120 python -m mnist_dist.train --config configs/train/reference.yaml --no-cpu --tracker none \
        $args --output-dir "$OUT/$name" | tail -1
    python -c "import json,sys; m=json.load(open('$OUT/$name/metrics.json')); print('$name', m['device'], 'train_seconds', round(m['train_seconds'], 3), 'accuracy', m['test_accuracy'])" | tee -a "$OUT/summary.txt"
done

# Side by side with the naive pipeline and the floor, one round.
timeout 150 python bench/run.py --repeats 1 --only "compute floor" "naive baseline" "mnist-dist, 1 process" \
    --write "$OUT/RESULTS-gpu.md" | tail -8
