"""The naive pipeline, faithful to the source document's script: torchvision MNIST with a
per-sample ``ToTensor`` (PIL) transform, a DataLoader with 4 workers, per-step copies to
the device, 10 epochs of batch 64 at lr 0.5 without shuffling, evaluation with batch 1.

Prints one JSON line (accuracy, train_seconds, eval_seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnist_dist.model import MLP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    to_tensor = transforms.ToTensor()
    train = datasets.MNIST(args.data_dir, train=True, download=False, transform=to_tensor)
    test = datasets.MNIST(args.data_dir, train=False, download=False, transform=to_tensor)
    train_loader = DataLoader(train, batch_size=64, shuffle=False, num_workers=4)
    test_loader = DataLoader(test, batch_size=1, shuffle=False)

    torch.manual_seed(0)
    model = MLP().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int(model(x.to(device)).argmax(1).item() == y.item())
    eval_seconds = time.perf_counter() - start
    print(json.dumps({"accuracy": correct / len(test), "train_seconds": train_seconds, "eval_seconds": eval_seconds}))


if __name__ == "__main__":
    main()
