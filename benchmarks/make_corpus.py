#!/usr/bin/env python
"""Generate a corpus of federated-learning model updates for gradzip.

Simulates FedAvg on one machine and dumps, for ONE client, the update it sends
each round: (local parameters after local training) - (global parameters at the
start of the round), one safetensors file per round.

Single sequence:
    python benchmarks/make_corpus.py --model cnn3bn --split noniid --local-steps 30 \
        --clients 4 --rounds 10 --client 0 --seed 0 --out /tmp/seq

Predefined suites:
    python benchmarks/make_corpus.py --suite bench   # -> benchmarks/corpus/<sequence>/
    python benchmarks/make_corpus.py --suite sample  # -> sample_data/

Data comes only from installed packages (scikit-learn's digits, the Python
standard library's own source files), so no network access is needed.
Results are deterministic for a given --seed, torch version and thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import sklearn
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save as safetensors_dumps
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

REPO_ROOT = Path(__file__).resolve().parent.parent
# Fixed by default because the thread count can change float reduction order and
# thus the output bits. On a busy machine --threads 1 avoids OpenMP threads
# waiting on each other and is much faster.
DEFAULT_THREADS = 2

# The digits train/test split is fixed independently of --seed so that test
# accuracies are comparable across sequences.
DIGITS_SPLIT_SEED = 0

# Character-level LM data: newline + printable ASCII = 96 symbols.
VOCAB = "\n" + "".join(chr(code) for code in range(32, 127))
UNKNOWN_CHAR = "?"
TEXT_CHARS = 1_500_000
CONTEXT_LENGTH = 64
TEST_EVERY_NTH_WINDOW = 10  # held-out windows are spread over the whole text
TEST_WINDOWS = 256  # evaluate on a fixed subset to keep evaluation cheap

DIRICHLET_ALPHA = 0.3
MIN_CLIENT_EXAMPLES = 64

BATCH_SIZE = 32


# --------------------------------------------------------------------------- models


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (channels unchanged)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        return F.relu(out + x)


class Cnn3Bn(nn.Module):
    """Small ResNet-style CNN for 1x8x8 digits: 3x3 convs with BatchNorm."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        # Convs followed by BN carry no bias: BN's shift makes it redundant.
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.res1 = ResidualBlock(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)  # 8x8 -> 4x4
        self.bn2 = nn.BatchNorm2d(32)
        self.res2 = ResidualBlock(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.res1(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.res2(x)
        x = x.mean(dim=(2, 3))  # global average pool
        return self.fc(x)


class Cnn5Fc(nn.Module):
    """5x5 convs without pooling, then a large FC head that holds most parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, d_model))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention and a 4x MLP, each with a residual."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class CharTransformer(nn.Module):
    """Tiny GPT-style character language model (no dropout, untied output head)."""

    def __init__(self, vocab_size=len(VOCAB), d_model=64, num_layers=2, num_heads=4,
                 context_length=CONTEXT_LENGTH):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, num_heads) for _ in range(num_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


class CharGru(nn.Module):
    """Character language model with one GRU layer: recurrent weight matrices instead of
    attention (a probe outside the bench suite)."""

    def __init__(self, vocab_size=len(VOCAB), d_embed=64, hidden=192):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_embed)
        self.gru = nn.GRU(d_embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens):
        out, _ = self.gru(self.embedding(tokens))
        return self.head(out)


class DepthwiseCnn(nn.Module):
    """MobileNet-style CNN for 1x8x8 digits: depthwise 3x3 and pointwise 1x1 convs with
    BatchNorm (conv kernels of 9 elements per channel; a probe outside the bench suite)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        layers = []
        for c_in, c_out, stride in ((32, 64, 1), (64, 128, 2), (128, 128, 1)):
            layers += [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                       nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.body(F.relu(self.bn0(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class HashedTrigramLm(nn.Module):
    """Character LM over hashed character trigrams (a fastText-like feature table): a
    2^15 x 32 embedding of which a round's text touches only some rows, so with plain SGD
    (no momentum or weight decay) the other rows of the update are exactly zero, as in the
    embedding gradients of word-level NLP models (a probe outside the bench suite)."""

    def __init__(self, vocab_size=len(VOCAB), bucket_bits=15, d_embed=32, hidden=128):
        super().__init__()
        self.bucket_bits = bucket_bits
        self.trigram_embedding = nn.Embedding(1 << bucket_bits, d_embed)
        self.char_embedding = nn.Embedding(vocab_size, d_embed)
        self.hidden = nn.Linear(d_embed, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens):
        previous = F.pad(tokens, (1, 0))[:, :-1]
        before_previous = F.pad(tokens, (2, 0))[:, :-2]
        trigram = (before_previous * len(VOCAB) + previous) * len(VOCAB) + tokens
        buckets = ((trigram * 2654435761) & 0xFFFFFFFF) >> (32 - self.bucket_bits)  # Knuth's multiplicative hash
        x = self.trigram_embedding(buckets) + self.char_embedding(tokens)
        return self.head(F.relu(self.hidden(x)))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    dataset: str  # "digits" or "text"
    optimizer: str  # "sgd" (momentum 0.9), "sgd-plain" (no momentum) or "adamw"
    lr: float
    weight_decay: float = 0.0


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 conv-BN layers; a 1x1 conv-BN projection shortcut when
    the stride or channel count changes, identity otherwise."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class ResNet18Digits(nn.Module):
    """ResNet-18-like CNN for 1x8x8 digits (a probe outside the bench suite): 3x3 stem
    conv + BN, 4 stages of 2 BasicBlocks (stride 2 at stages 2-4: 8x8 -> 4x4 -> 2x2 ->
    1x1), global average pool, Linear head. widths=(64, 128, 256, 512) gives ~11.2M
    parameters."""

    def __init__(self, num_classes: int = 10, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for stage_index, width in enumerate(widths):
            stride = 1 if stage_index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width)))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.mean(dim=(2, 3))  # global average pool
        return self.fc(x)


MODELS = {
    "cnn3bn": ModelSpec(Cnn3Bn, dataset="digits", optimizer="sgd", lr=0.05),
    "cnn5fc": ModelSpec(Cnn5Fc, dataset="digits", optimizer="sgd", lr=0.05),
    "transformer": ModelSpec(CharTransformer, dataset="text", optimizer="adamw", lr=3e-3,
                             weight_decay=0.01),
    # Not in the bench suite: 3.2M parameters in layers of 65K-262K elements, to see how
    # gradzip and SZ3 compare where per-tensor overhead no longer counts.
    "transformer-wide": ModelSpec(functools.partial(CharTransformer, d_model=256, num_layers=4, num_heads=8),
                                  dataset="text", optimizer="adamw", lr=1e-3, weight_decay=0.01),
    # Probes outside the bench suite (never tuned on): other kinds of layer than the suite's.
    "gru": ModelSpec(CharGru, dataset="text", optimizer="adamw", lr=3e-3, weight_decay=0.01),
    # ResNet-18-like probe (11.2M parameters, tensors up to 512x512x3x3 = 2.36M elements): not in
    # the bench suite (44.7 MB a round); `--model resnet --split iid --local-steps 15 --rounds 10`.
    "resnet": ModelSpec(ResNet18Digits, dataset="digits", optimizer="sgd", lr=0.05),
    "dwcnn": ModelSpec(DepthwiseCnn, dataset="digits", optimizer="sgd", lr=0.05),
    # Row-sparse updates: `--model trigram --split noniid --local-steps 15`.
    "trigram": ModelSpec(HashedTrigramLm, dataset="text", optimizer="sgd-plain", lr=0.5),
}


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Examples are rows of the input tensors. For text, an example is one
    window of CONTEXT_LENGTH tokens with its next-token targets."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    train_labels: np.ndarray | None  # class per train example, for label-skewed splits
    description: dict


def load_digits_dataset() -> Dataset:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    return Dataset(
        train_inputs=torch.from_numpy(train_x),
        train_targets=torch.from_numpy(train_y),
        test_inputs=torch.from_numpy(test_x),
        test_targets=torch.from_numpy(test_y),
        train_labels=train_y,
        description={"name": "sklearn digits", "train": len(train_y), "test": len(test_y)},
    )


def stdlib_source_files() -> list[str]:
    stdlib_dir = os.path.dirname(os.__file__)
    return sorted(glob.glob(os.path.join(stdlib_dir, "*.py")))


def encode_text(text: str) -> np.ndarray:
    lookup = np.full(128, VOCAB.index(UNKNOWN_CHAR), dtype=np.int64)
    for index, char in enumerate(VOCAB):
        lookup[ord(char)] = index
    text = text.replace("\t", "    ")
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
    return lookup[np.minimum(codes, 127)]


def load_text_dataset() -> Dataset:
    pieces, total_chars, used_files = [], 0, []
    for path in stdlib_source_files():
        with open(path, encoding="utf-8", errors="replace") as handle:
            pieces.append(handle.read())
        total_chars += len(pieces[-1])
        used_files.append(os.path.basename(path))
        if total_chars >= TEXT_CHARS:
            break
    tokens = encode_text("".join(pieces)[:TEXT_CHARS])

    # Non-overlapping windows of CONTEXT_LENGTH + 1 tokens, kept in text order so
    # that a contiguous range of train windows is a contiguous stretch of text.
    num_windows = len(tokens) // (CONTEXT_LENGTH + 1)
    windows = torch.from_numpy(tokens[: num_windows * (CONTEXT_LENGTH + 1)]).view(num_windows, -1)
    is_test = torch.arange(num_windows) % TEST_EVERY_NTH_WINDOW == TEST_EVERY_NTH_WINDOW - 1
    train, test = windows[~is_test], windows[is_test]
    # Evenly spaced test subset: covers the whole text, cheap to evaluate.
    test = test[torch.linspace(0, len(test) - 1, TEST_WINDOWS).long()]
    return Dataset(
        train_inputs=train[:, :-1].contiguous(),
        train_targets=train[:, 1:].contiguous(),
        test_inputs=test[:, :-1].contiguous(),
        test_targets=test[:, 1:].contiguous(),
        train_labels=None,
        description={
            "name": "python stdlib source, char level",
            "python_version": platform.python_version(),
            "chars": int(len(tokens)),
            "source_dir": os.path.dirname(os.__file__),
            "files": f"{len(used_files)} sorted *.py files, {used_files[0]} .. {used_files[-1]}",
            "train_windows": len(train),
            "test_windows": len(test),
        },
    )


def load_dataset(name: str) -> Dataset:
    return {"digits": load_digits_dataset, "text": load_text_dataset}[name]()


# --------------------------------------------------------------------------- client splits


def iid_split(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet_label_split(labels: np.ndarray, num_clients: int,
                          rng: np.random.Generator) -> list[np.ndarray]:
    """Each class is divided among clients by Dirichlet(alpha) proportions, so with
    a small alpha each client ends up dominated by 2-3 classes. Resample until every
    client has enough data to fill some batches."""
    while True:
        parts = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, DIRICHLET_ALPHA))
            cut_points = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cut_points)):
                parts[client].extend(chunk.tolist())
        if min(len(part) for part in parts) >= MIN_CLIENT_EXAMPLES:
            return [np.sort(np.array(part, dtype=np.int64)) for part in parts]


def contiguous_split(num_examples: int, num_clients: int) -> list[np.ndarray]:
    """Text is non-IID by position: each client gets one contiguous stretch
    (i.e. different source files)."""
    return np.array_split(np.arange(num_examples), num_clients)


def split_among_clients(dataset: Dataset, split: str, num_clients: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    num_examples = len(dataset.train_targets)
    if split == "iid":
        return iid_split(num_examples, num_clients, rng)
    if dataset.train_labels is not None:
        return dirichlet_label_split(dataset.train_labels, num_clients, rng)
    return contiguous_split(num_examples, num_clients)


# --------------------------------------------------------------------------- federated training


def make_optimizer(model: nn.Module, spec: ModelSpec) -> torch.optim.Optimizer:
    if spec.optimizer in ("sgd", "sgd-plain"):
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9 if spec.optimizer == "sgd" else 0.0,
                               weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def loss_and_correct(model: nn.Module, inputs, targets):
    """Works for classifiers (B, classes) and LMs (B, T, vocab) alike."""
    logits = model(inputs)
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets)
    correct = (logits.argmax(dim=1) == targets).sum().item()
    return loss, correct, targets.numel()


def train_locally(model: nn.Module, spec: ModelSpec, dataset: Dataset, indices: np.ndarray,
                  local_steps: int, rng: np.random.Generator) -> float:
    """Run local_steps minibatch steps over the client's data, reshuffling per
    epoch. The optimizer is fresh each round, as in plain FedAvg. Returns mean loss."""
    model.train()
    optimizer = make_optimizer(model, spec)
    order, position, total_loss = rng.permutation(indices), 0, 0.0
    for _ in range(local_steps):
        if position + BATCH_SIZE > len(order):
            order, position = rng.permutation(indices), 0
        batch = torch.from_numpy(order[position: position + BATCH_SIZE])
        position += BATCH_SIZE
        loss, _, _ = loss_and_correct(model, dataset.train_inputs[batch], dataset.train_targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    return total_loss / local_steps


@torch.no_grad()
def test_accuracy(model: nn.Module, dataset: Dataset) -> float:
    model.eval()
    correct, total = 0, 0
    for start in range(0, len(dataset.test_targets), 256):
        _, batch_correct, batch_total = loss_and_correct(
            model, dataset.test_inputs[start: start + 256], dataset.test_targets[start: start + 256]
        )
        correct, total = correct + batch_correct, total + batch_total
    return correct / total


def federated_average(client_states: list[dict], weights: list[float]) -> dict:
    """Weighted average of full state dicts, so BatchNorm running statistics are
    averaged too. Integer buffers (num_batches_tracked) are rounded back."""
    total = float(sum(weights))
    averaged = {}
    for name, reference in client_states[0].items():
        mean = sum(state[name].double() * (weight / total)
                   for state, weight in zip(client_states, weights))
        if not reference.is_floating_point():
            mean = mean.round()
        averaged[name] = mean.to(reference.dtype)
    return averaged


# --------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class SequenceConfig:
    model: str
    split: str
    local_steps: int
    clients: int = 4
    rounds: int = 10
    client: int = 0
    seed: int = 0


def round_seed(config: SequenceConfig, round_index: int, client: int) -> np.random.SeedSequence:
    """Independent, reproducible batch-order stream per (seed, round, client)."""
    return np.random.SeedSequence([config.seed, round_index, client])


def write_round(out_dir: Path, config: SequenceConfig, round_index: int, update: dict) -> None:
    tensors = {name: tensor.numpy().astype(np.float32) for name, tensor in update.items()}
    metadata = {
        "model": config.model,
        "split": config.split,
        "round": str(round_index),
        "client": str(config.client),
        "local_steps": str(config.local_steps),
    }
    blob = with_sorted_metadata(safetensors_dumps(tensors, metadata=metadata))
    (out_dir / f"round_{round_index:03d}.safetensors").write_bytes(blob)


def with_sorted_metadata(blob: bytes) -> bytes:
    """safetensors writes __metadata__ in hash-map order, which changes from run to
    run; sort it so regenerated files are byte-identical. The header keeps its
    length (same keys and values, reordered), so data offsets stay valid."""
    header_length = int.from_bytes(blob[:8], "little")
    header_bytes = blob[8: 8 + header_length]
    header = json.loads(header_bytes)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":")).encode().ljust(header_length)
    if len(canonical) != header_length:  # unexpected serializer formatting; keep as written
        return blob
    return blob[:8] + canonical + blob[8 + header_length:]


def generate_sequence(config: SequenceConfig, out_dir: Path, label: str = "") -> dict:
    if not 0 <= config.client < config.clients:
        raise ValueError(f"--client {config.client} is not in [0, {config.clients})")
    label = label or out_dir.name
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    spec = MODELS[config.model]
    dataset = load_dataset(spec.dataset)
    client_indices = split_among_clients(
        dataset, config.split, config.clients, np.random.default_rng(config.seed)
    )
    client_weights = [len(indices) for indices in client_indices]
    global_model = spec.build()
    local_model = spec.build()
    trainable_names = [name for name, p in global_model.named_parameters() if p.requires_grad]

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("round_*.safetensors"):  # don't mix with an older, longer run
        stale.unlink()

    accuracies, dumped_client_losses = [], []
    for round_index in range(config.rounds):
        round_started = time.perf_counter()
        global_state = {name: t.clone() for name, t in global_model.state_dict().items()}
        client_states = []
        for client, indices in enumerate(client_indices):
            local_model.load_state_dict(global_state)
            rng = np.random.default_rng(round_seed(config, round_index, client))
            loss = train_locally(local_model, spec, dataset, indices, config.local_steps, rng)
            local_state = {name: t.detach().clone() for name, t in local_model.state_dict().items()}
            client_states.append(local_state)
            if client == config.client:
                dumped_client_losses.append(loss)
                update = {name: local_state[name] - global_state[name] for name in trainable_names}
                write_round(out_dir, config, round_index, update)
        global_model.load_state_dict(federated_average(client_states, client_weights))
        accuracies.append(test_accuracy(global_model, dataset))
        update_norm = math.sqrt(sum(float((u.double() ** 2).sum()) for u in update.values()))
        print(f"[{label}] round {round_index + 1}/{config.rounds}  "
              f"test_acc={accuracies[-1]:.4f}  client{config.client}_loss={dumped_client_losses[-1]:.4f}  "
              f"update_l2={update_norm:.4g}  {time.perf_counter() - round_started:.1f}s",
              file=sys.stderr, flush=True)

    meta = {
        "config": dataclasses.asdict(config),
        "training": {
            "optimizer": spec.optimizer, "lr": spec.lr, "weight_decay": spec.weight_decay,
            "momentum": 0.9 if spec.optimizer == "sgd" else None, "batch_size": BATCH_SIZE,
            "partition": partition_description(config.split, spec.dataset),
        },
        "dataset": dataset.description,
        "client_examples": client_weights,
        "client_label_counts": client_label_counts(dataset, client_indices),
        "parameters": {name: list(p.shape) for name, p in global_model.named_parameters()
                       if name in trainable_names},
        "parameter_count": sum(global_model.get_parameter(name).numel() for name in trainable_names),
        "round_files": [f"round_{r:03d}.safetensors" for r in range(config.rounds)],
        "global_test_accuracy": [round(acc, 6) for acc in accuracies],
        "dumped_client_train_loss": [round(loss, 6) for loss in dumped_client_losses],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "sklearn": sklearn.__version__},
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def partition_description(split: str, dataset_name: str) -> str:
    if split == "iid":
        return "random equal split"
    if dataset_name == "digits":
        return f"per-class Dirichlet(alpha={DIRICHLET_ALPHA}) over clients"
    return "contiguous chunks of the text"


def client_label_counts(dataset: Dataset, client_indices: list[np.ndarray]) -> list[list[int]] | None:
    if dataset.train_labels is None:
        return None
    num_classes = int(dataset.train_labels.max()) + 1
    return [np.bincount(dataset.train_labels[indices], minlength=num_classes).tolist()
            for indices in client_indices]


# --------------------------------------------------------------------------- suites

SHORT_STEPS, LONG_STEPS = 15, 80

BENCH_SUITE = {
    "cnn3bn-iid-short": SequenceConfig("cnn3bn", "iid", SHORT_STEPS),
    "cnn3bn-noniid-long": SequenceConfig("cnn3bn", "noniid", LONG_STEPS),
    "cnn5fc-iid-long": SequenceConfig("cnn5fc", "iid", LONG_STEPS),
    "cnn5fc-noniid-short": SequenceConfig("cnn5fc", "noniid", SHORT_STEPS),
    "transformer-iid-short": SequenceConfig("transformer", "iid", SHORT_STEPS),
    "transformer-noniid-long": SequenceConfig("transformer", "noniid", LONG_STEPS),
}

SAMPLE_CONFIG = SequenceConfig("cnn3bn", "noniid", local_steps=30, clients=4, rounds=10,
                               client=0, seed=0)

DEFAULT_SUITE_OUT = {"bench": REPO_ROOT / "benchmarks" / "corpus", "sample": REPO_ROOT / "sample_data"}


def run_suite(suite: str, out_dir: Path) -> None:
    started = time.perf_counter()
    if suite == "sample":
        meta = generate_sequence(SAMPLE_CONFIG, out_dir, label="sample")
        print(f"sample: final test accuracy {meta['global_test_accuracy'][-1]:.4f}", file=sys.stderr)
    else:
        for name, config in BENCH_SUITE.items():
            sequence_started = time.perf_counter()
            meta = generate_sequence(config, out_dir / name, label=name)
            print(f"{name}: {meta['parameter_count']} params, final test accuracy "
                  f"{meta['global_test_accuracy'][-1]:.4f}, "
                  f"{time.perf_counter() - sequence_started:.1f}s", file=sys.stderr)
    print(f"suite {suite} done in {time.perf_counter() - started:.1f}s -> {out_dir}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["bench", "sample"],
                        help="generate a predefined set of sequences (ignores the per-sequence options)")
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--split", choices=["iid", "noniid"])
    parser.add_argument("--local-steps", type=int, default=SHORT_STEPS)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--client", type=int, default=0, help="which client's updates to dump")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch intra-op threads (recorded in meta.json)")
    parser.add_argument("--out", type=Path,
                        help="output directory (default for suites: benchmarks/corpus or sample_data)")
    args = parser.parse_args(argv)
    if args.suite is None and (args.model is None or args.split is None or args.out is None):
        parser.error("without --suite, --model, --split and --out are required")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.suite:
        run_suite(args.suite, args.out or DEFAULT_SUITE_OUT[args.suite])
        return
    config = SequenceConfig(model=args.model, split=args.split, local_steps=args.local_steps,
                            clients=args.clients, rounds=args.rounds, client=args.client,
                            seed=args.seed)
    generate_sequence(config, args.out)


if __name__ == "__main__":
    main()
