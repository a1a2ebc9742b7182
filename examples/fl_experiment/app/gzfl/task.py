"""Data, model and training for the experiment (scikit-learn's digits, a small BN CNN)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TEST_FRACTION = 0.3  # 540 of the 1797 digits: one test sample is 0.19 percentage points
SPLIT_SEED = 0
MIN_CLIENT_EXAMPLES = 40


class Net(nn.Module):
    """Three 3x3 conv + BatchNorm blocks and a two-layer head, for 1x8x8 digits (~90k weights)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 4x4 -> 2x2
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def digits_split() -> dict[str, np.ndarray]:
    """scikit-learn's digits as 1x8x8 images in [0, 1], split into train and test (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                                        stratify=y)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def load_split(data_file: str = "") -> dict[str, np.ndarray]:
    """The split from the .npz that run.py writes (quick to load), else straight from sklearn."""
    if data_file:
        with np.load(data_file) as data:
            return {key: data[key] for key in data.files}
    return digits_split()


def test_set(data_file: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    split = load_split(data_file)
    return torch.from_numpy(split["x_test"]), torch.from_numpy(split["y_test"])


def partition(partition_id: int, num_partitions: int, alpha: float, seed: int,
              data_file: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """One client's non-IID share of the training set: per class, Dirichlet(alpha) proportions."""
    split = load_split(data_file)
    x_train, y_train = split["x_train"], split["y_train"]
    rng = np.random.default_rng(seed)
    while True:  # redraw until every client has enough examples
        shares = [[] for _ in range(num_partitions)]
        for label in range(10):
            idx = np.flatnonzero(y_train == label)
            rng.shuffle(idx)
            proportions = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(proportions) * len(idx)).astype(int)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shares[client].extend(part.tolist())
        if min(len(s) for s in shares) >= MIN_CLIENT_EXAMPLES:
            break
    mine = np.sort(np.array(shares[partition_id], dtype=np.int64))
    return torch.from_numpy(x_train[mine]), torch.from_numpy(y_train[mine])


def train(model: Net, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2:  # batch norm needs two samples
                continue
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = float(F.cross_entropy(logits, y))
    accuracy = float((logits.argmax(1) == y).float().mean())
    return loss, accuracy


def load_arrays(model: Net, arrays: dict[str, np.ndarray]) -> None:
    state = OrderedDict((name, torch.from_numpy(np.array(value, copy=True))) for name, value in arrays.items())
    model.load_state_dict(state, strict=True)
