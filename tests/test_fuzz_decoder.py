"""Bounded-time decoder fuzzing: mutated and truncated .grz streams may only raise gradzip's
own errors (GradzipError and its subclasses), never another exception, and never allocate far
beyond what the damaged stream could justify.

Two mutators share the time budget:
  * raw: bit flips, byte overwrites, insertions, deletions, truncations, duplicated or spliced
    chunks; checksums are left as they are, so this exercises framing and checksum checks;
  * structured: the stream is parsed, a payload section or a JSON field of a header, record or
    trailer is damaged, and the stream is rebuilt with valid checksums, so the damage reaches
    the codec, the entropy decoders (Huffman and rANS), zstd and the escape handling.

Every case is derived from a fixed seed, so a failure names the seed that reproduces it.
GRADZIP_FUZZ_SECONDS overrides the budget (default 20 s).
"""
from __future__ import annotations

import io
import os
import random
import time
import tracemalloc

import numpy as np
import pytest

from gradzip import Compressor, Decompressor, GradzipError
from gradzip.api import describe_stream
from gradzip.container import join_stream, split_stream
from gradzip.state import PredictorState

FUZZ_SECONDS = float(os.environ.get("GRADZIP_FUZZ_SECONDS", "20"))
MEMORY_LIMIT = 256 * 1024 * 1024  # the corpus streams are a few KB; decoding one never needs this
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 1025, 4095, 4096,
                    32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**63 - 1, 2**63,
                    2**64, -1, -2, -128, -2**31, -2**63]
INTERESTING_VALUES = INTERESTING_INTS + [0.0, -0.0, 0.5, 1.5, -1.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308,
                                         -1e308, "", "x", "F32", "BF16", "I64", "lossless", "quantized", "none",
                                         "ema", "context", "huffman", "rans", "zstd", None, True, False, [], {},
                                         [0], [1, 2], [[]], {"a": 1}]


def sequence(rounds, eb, mode, **options):
    """[(stream, state bytes before it)] for consecutive rounds."""
    c = Compressor(eb, mode, **options)
    out = []
    for tensors in rounds:
        before = c.state.to_bytes()
        out.append((c.compress(tensors), before))
    return out


@pytest.fixture(scope="module")
def corpus(gz):
    rng = np.random.default_rng(51)
    conv = rng.normal(size=(8, 16, 3, 3)) * np.sign(rng.normal(size=(8, 16, 1, 1)))
    plain = []
    low_rank = np.zeros((64, 1024))
    for r in range(3):
        # lowrank: an FC layer's updates, a few outer products a round (the low-rank part's case)
        low_rank = 0.7 * low_rank + rng.normal(size=(64, 3)) @ rng.normal(size=(3, 1024)) + 0.05 * rng.normal(size=(64, 1024))
        # kconv: persistent magnitudes, each kernel's sign drawn afresh (the EMA shift's case)
        kernel_signs = np.sign(rng.normal(size=(8, 16, 1, 1)))
        plain.append({"conv": (conv * (1 + 0.1 * r) + 0.05 * rng.normal(size=conv.shape)).astype(np.float32),
                      "kconv": (np.abs(conv) * kernel_signs * (1 + 0.05 * rng.normal(size=conv.shape))).astype(np.float32),
                      "fc": rng.laplace(size=(30, 40)).astype(np.float32), "bias": rng.normal(size=10).astype(np.float32),
                      "count": np.array(r, np.int64), "mask": rng.random(1500) < 0.5,
                      "lowrank": low_rank.astype(np.float32)})
    special = []
    for r in range(2):
        half = rng.normal(size=1100).astype(np.float16)
        half[rng.choice(1100, 20, replace=False)] = np.nan
        half[:4] = [np.inf, -np.inf, -0.0, 6e-8]
        brain = rng.normal(size=(40, 30)).astype(np.float32)
        brain[5, :5] = [np.nan, np.inf, -np.inf, 1e38, -1e38]
        special.append({"half": half, "brain": gz.bfloat16_from_float32(brain),
                        "wide": rng.normal(size=1200) * 10.0 ** rng.integers(-30, 30, size=1200),
                        "scalar": np.array(float(r), np.float32), "empty": np.zeros((0, 3), np.float32)})
    streams = sequence(plain, 1e-3, "rel") + sequence(special, 1e-4, "abs") + sequence(plain, 1e-2, "rel")
    streams += sequence(plain, 1e-3, "rel", coder="huffman")  # so the Huffman decoder is fuzzed too
    coders = set()
    predictors = set()
    for blob, before in streams:
        Decompressor(PredictorState.from_bytes(before)).decompress(blob)  # the corpus itself is valid
        for t in describe_stream(io.BytesIO(blob), len(blob)).tensors:
            coders.add(t.coder)
            predictors.add(t.predictor)
    assert {"huffman", "rans", "zstd"} <= coders, coders
    assert {"none", "ema", "linear", "low_rank"} <= predictors, predictors
    return streams


# ----------------------------------------------------------------------------- mutators


def raw_mutation(rng: random.Random, blob: bytes, others: list[bytes]) -> tuple[bytes, str]:
    data = bytearray(blob)
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        kind = rng.choice(["flip", "byte", "insert", "delete", "truncate", "duplicate", "splice", "zero"])
        pos = rng.randrange(len(data) + 1) if data else 0
        if kind == "flip" and data:
            pos = min(pos, len(data) - 1)
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte" and data:
            pos = min(pos, len(data) - 1)
            data[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == "insert":
            data[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 8, 100]))
        elif kind == "delete":
            del data[pos : pos + rng.choice([1, 2, 4, 8, 100])]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "duplicate" and data:
            n = rng.randrange(1, 200)
            data[pos:pos] = data[pos : pos + n]
        elif kind == "splice":
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            data[pos:] = other[cut:]
        elif kind == "zero":
            n = rng.randrange(1, 64)
            data[pos : pos + n] = bytes(len(data[pos : pos + n]))
        steps.append(f"{kind}@{pos}")
    return bytes(data), "raw " + ", ".join(steps)


def parse(blob: bytes):
    header, records, trailer = split_stream(blob)
    return header, [(dict(r), p) for r, p in records], dict(trailer)


build = join_stream


def mutate_value(rng: random.Random, value):
    choice = rng.random()
    if isinstance(value, bool) or value is None:
        return rng.choice(INTERESTING_VALUES)
    if isinstance(value, int) and choice < 0.5:
        return value + rng.choice([-1, 1, -2, 2, 8, -8]) if choice < 0.3 else value * rng.choice([2, 3, 1000, -1])
    if isinstance(value, float) and choice < 0.5:
        return value * rng.choice([0.5, 2.0, -1.0, 1.0000001, 1e10, 1e-10])
    if isinstance(value, list) and value and choice < 0.6:
        value = list(value)
        i = rng.randrange(len(value))
        action = rng.random()
        if action < 0.5:
            value[i] = mutate_value(rng, value[i])
        elif action < 0.7:
            del value[i]
        else:
            value.insert(i, rng.choice(value))
        return value
    if isinstance(value, dict) and value and choice < 0.7:
        value = dict(value)
        key = rng.choice(sorted(value))
        if rng.random() < 0.8:
            value[key] = mutate_value(rng, value[key])
        else:
            del value[key]
        return value
    if isinstance(value, str) and choice < 0.3:
        return value[:-1] if value else "x"
    return rng.choice(INTERESTING_VALUES)


def mutate_payload(rng: random.Random, record: dict, payload: bytes) -> tuple[dict, bytes, str]:
    sections = record.get("sections") or [["all", len(payload)]]
    index = rng.randrange(len(sections))
    start = sum(length for _, length in sections[:index])
    name, length = sections[index]
    section = bytearray(payload[start : start + length])
    kind = rng.choice(["flip", "flip", "byte", "insert", "delete", "truncate", "zero", "swap"])
    pos = rng.randrange(len(section) + 1)
    if kind == "flip" and section:
        pos = min(pos, len(section) - 1)
        section[pos] ^= 1 << rng.randrange(8)
    elif kind == "byte" and section:
        pos = min(pos, len(section) - 1)
        section[pos] = rng.randrange(256)
    elif kind == "insert":
        section[pos:pos] = rng.randbytes(rng.choice([1, 4, 16]))
    elif kind == "delete":
        del section[pos : pos + rng.choice([1, 4, 16])]
    elif kind == "truncate":
        del section[pos:]
    elif kind == "zero":
        section[pos : pos + 8] = bytes(len(section[pos : pos + 8]))
    elif kind == "swap" and len(section) > 8:
        a, b = sorted(rng.sample(range(len(section)), 2))
        section[a], section[b] = section[b], section[a]
    new_payload = payload[:start] + bytes(section) + payload[start + length :]
    record = dict(record)
    if rng.random() < 0.85 and "sections" in record:  # usually keep the section table consistent
        record["sections"] = [list(s) for s in sections]
        record["sections"][index][1] = len(section)
    return record, new_payload, f"payload section {name!r} {kind}@{pos}"


def structured_mutation(rng: random.Random, blob: bytes) -> tuple[bytes, str]:
    header, records, trailer = parse(blob)
    target = rng.random()
    if target < 0.55 and records:
        i = rng.randrange(len(records))
        record, payload = records[i]
        record, payload, what = mutate_payload(rng, record, payload)
        records[i] = (record, payload)
    elif target < 0.85 and records:
        i = rng.randrange(len(records))
        record, payload = records[i]
        key = rng.choice(sorted(k for k in record if k not in ("kind", "payload_bytes")))
        record = dict(record, **{key: mutate_value(rng, record[key])})
        records[i] = (record, payload)
        what = f"record {i} field {key!r}"
    elif target < 0.95:
        key = rng.choice(sorted(k for k in header if k != "kind"))
        header = dict(header, **{key: mutate_value(rng, header[key])})
        what = f"header field {key!r}"
    else:
        key = rng.choice(sorted(k for k in trailer if k != "kind"))
        trailer = dict(trailer, **{key: mutate_value(rng, trailer[key])})
        what = f"trailer field {key!r}"
    try:
        return build(header, records, trailer), "structured " + what
    except (ValueError, TypeError):  # e.g. a mutated value JSON cannot hold: mutate raw instead
        return raw_mutation(rng, blob, [blob])


# ----------------------------------------------------------------------------- the fuzz loop


def run_case(blob: bytes, state: PredictorState, pipe: bool) -> None:
    d = Decompressor(state)
    if pipe:
        d.decompress_from(io.BytesIO(blob), available=None)
    else:
        d.decompress(blob)


def test_decoder_fuzz_raises_only_gradzip_errors(corpus):
    states = [PredictorState.from_bytes(before) for _, before in corpus]
    blobs = [blob for blob, _ in corpus]
    deadline = time.monotonic() + FUZZ_SECONDS
    counts = {"cases": 0, "rejected": 0, "decoded": 0}
    failures: dict[str, str] = {}  # one example per kind of failure

    def fail(kind: str, detail: str) -> None:
        failures.setdefault(kind, detail)

    tracemalloc.start()
    try:
        seed = 0
        while time.monotonic() < deadline:
            seed += 1
            rng = random.Random(seed)
            index = rng.randrange(len(corpus))
            if rng.random() < 0.4:
                blob, what = raw_mutation(rng, blobs[index], blobs)
            else:
                blob, what = structured_mutation(rng, blobs[index])
            pipe = rng.random() < 0.2
            tracemalloc.reset_peak()
            try:
                run_case(blob, states[index], pipe)
                counts["decoded"] += 1
            except GradzipError:
                counts["rejected"] += 1
            except Exception as exc:  # noqa: BLE001 - any other exception is the failure we look for
                fail(f"{type(exc).__name__}: {str(exc)[:40]}",
                     f"seed {seed} (stream {index}, {what}, pipe={pipe}): {type(exc).__name__}: {exc}")
            _, peak = tracemalloc.get_traced_memory()
            if peak > MEMORY_LIMIT:
                fail(f"memory {what}", f"seed {seed} (stream {index}, {what}): decoding a {len(blob)}-byte stream "
                                       f"allocated {peak} bytes")
            if not pipe:
                try:
                    describe_stream(io.BytesIO(blob), len(blob))
                except GradzipError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    fail(f"stats {type(exc).__name__}: {str(exc)[:40]}",
                         f"seed {seed} (stream {index}, {what}) stats: {type(exc).__name__}: {exc}")
            counts["cases"] += 1
    finally:
        tracemalloc.stop()
    for blob, state in zip(blobs, states):  # the states were only read
        assert state.to_bytes() == [b for _, b in corpus][blobs.index(blob)]
    assert not failures, f"{len(failures)} kind(s) of failure after {counts}:\n" + "\n".join(failures.values())
    assert counts["cases"] >= 50, f"the fuzzer ran only {counts['cases']} cases"
    assert counts["rejected"] > 0
