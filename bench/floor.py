"""The compute floor: a bare PyTorch loop over preloaded float tensors, reference recipe.

No DataLoader, no Accelerate: what the model's arithmetic alone costs on this machine.
Prints one JSON line (accuracy, train_seconds, its warm-up, the steady time per step,
eval_seconds). The warm-up is the first steps, timed as a training run times them
(``mnist_dist.training.meters``): the device synchronised after each.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mnist_dist.data.idx import load_split
from mnist_dist.data.sources import ensure_dataset
from mnist_dist.model import MLP
from mnist_dist.training.meters import WARMUP_STEPS, synchronize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args()
    raw = ensure_dataset(args.data_dir, "mnist")
    train_x, train_y = load_split(raw, "mnist", "train")
    test_x, test_y = load_split(raw, "mnist", "test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, xt = train_x.float().div(255).to(device), test_x.float().div(255).to(device)
    train_y, test_y = train_y.to(device), test_y.to(device)

    torch.manual_seed(0)
    model = MLP().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    start, steps, warmup_seconds = time.perf_counter(), 0, 0.0
    for _ in range(args.epochs):
        for i in range(0, len(x), args.batch_size):
            loss = F.cross_entropy(model(x[i : i + args.batch_size]), train_y[i : i + args.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps <= WARMUP_STEPS:
                synchronize(device)
                warmup_seconds = time.perf_counter() - start
    synchronize(device)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        correct = int((model(xt).argmax(1) == test_y).sum())
    eval_seconds = time.perf_counter() - start
    steady = (train_seconds - warmup_seconds) / (steps - WARMUP_STEPS) if steps > WARMUP_STEPS else None
    figures = {"accuracy": correct / len(test_y), "train_seconds": train_seconds, "warmup_seconds": warmup_seconds}
    print(json.dumps({**figures, "steady_step_seconds": steady, "eval_seconds": eval_seconds}))


if __name__ == "__main__":
    main()
