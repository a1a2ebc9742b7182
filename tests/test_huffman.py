"""Tests for gradzip.entropy.huffman: round trips, code size, and hostile input."""

import heapq
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradzip.entropy import huffman
from gradzip.errors import CorruptStreamError

HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Helpers: an independent reader/writer of the documented byte layout
# ---------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


@dataclass
class Layout:
    count: int
    symbols: list[int]
    lengths: list[int]
    nbits: int
    bitstream: bytes
    table_bytes: int  # everything before the bitstream


def parse(data: bytes) -> Layout:
    assert data[0] == huffman.FORMAT_VERSION
    count, pos = read_varint(data, 1)
    n_distinct, pos = read_varint(data, pos)
    nbits, pos = read_varint(data, pos)
    symbols, previous = [], -1
    for _ in range(n_distinct):
        gap, pos = read_varint(data, pos)
        previous += gap + 1
        symbols.append(previous)
    lengths = list(data[pos:pos + n_distinct])
    pos += n_distinct
    return Layout(count, symbols, lengths, nbits, data[pos:], pos)


def build(count, symbols, lengths, nbits, bitstream=b"", version=huffman.FORMAT_VERSION) -> bytes:
    """A stream with the given fields, for crafting invalid tables."""
    gaps = [symbols[0]] + [b - a - 1 for a, b in zip(symbols, symbols[1:])] if symbols else []
    return (
        bytes([version]) + varint(count) + varint(len(symbols)) + varint(nbits)
        + b"".join(varint(g) for g in gaps) + bytes(lengths) + bitstream
    )


def roundtrip(values) -> bytes:
    values = np.asarray(values)
    data = huffman.encode(values)
    decoded = huffman.decode(data, values.size)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, values)
    return data


def entropy_bits(values) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def huffman_optimal_bits(counts) -> int:
    """Cost of an unrestricted Huffman code: the sum of all internal node weights."""
    heap = [int(c) for c in counts]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def laplace_codes(n, scale, seed=0, center=32768):
    rng = np.random.default_rng(seed)
    return (np.rint(rng.laplace(0.0, scale, n)) + center).astype(np.int32)


def assert_decodes_or_corrupt(data, count):
    """The only acceptable outcomes for damaged input."""
    try:
        decoded = huffman.decode(data, count)
    except CorruptStreamError:
        return False
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == np.int32 and decoded.shape == (count,)
    return True


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_empty(dtype):
    data = roundtrip(np.empty(0, dtype))
    assert data == bytes([huffman.FORMAT_VERSION, 0, 0, 0])


@pytest.mark.parametrize("value", [0, 1, 32768, 2**20, huffman.MAX_SYMBOL])
@pytest.mark.parametrize("n", [1, 1000])
def test_single_distinct_symbol_has_empty_bitstream(value, n):
    layout = parse(roundtrip(np.full(n, value, np.int64)))
    assert layout.symbols == [value] and layout.lengths == [0]
    assert layout.nbits == 0 and layout.bitstream == b""


def test_two_symbols_use_one_bit_each():
    values = np.array([3, 9, 9, 3, 9, 9, 9, 3, 3], np.int32)
    layout = parse(roundtrip(values))
    assert layout.lengths == [1, 1] and layout.nbits == values.size


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64])
def test_all_integer_dtypes_give_identical_streams(dtype):
    values = laplace_codes(5000, 3.0, center=60)
    reference = huffman.encode(values.astype(np.int64))
    assert roundtrip(values.astype(dtype)) == reference


def test_non_contiguous_input():
    values = laplace_codes(10_000, 5.0)
    assert roundtrip(values[::3]) == huffman.encode(values[::3].copy())


def test_many_distinct_symbols():
    rng = np.random.default_rng(1)
    values = np.concatenate([np.arange(65536), rng.integers(0, 65536, 200_000)])
    rng.shuffle(values)
    layout = parse(roundtrip(values))
    assert len(layout.symbols) == 65536
    assert max(layout.lengths) <= huffman.MAX_CODE_LENGTH


def test_every_symbol_once():
    roundtrip(np.random.default_rng(2).permutation(70_000))


def test_symbols_up_to_2_pow_20_and_beyond():
    rng = np.random.default_rng(3)
    roundtrip(rng.integers(0, 2**20 + 1, 50_000))
    # Spread too wide for a flat count array: exercises the sorted (sparse) path.
    roundtrip(rng.integers(0, huffman.MAX_SYMBOL + 1, 5_000, dtype=np.int64))
    roundtrip(np.array([0, huffman.MAX_SYMBOL, 0, 7, huffman.MAX_SYMBOL], np.uint32))


def test_highly_skewed_distribution():
    rng = np.random.default_rng(4)
    values = np.full(1_000_000, 32768, np.int32)
    rare = rng.random(values.size) < 0.001
    values[rare] = rng.integers(0, 65536, int(rare.sum()))
    layout = parse(roundtrip(values))
    dominant = layout.lengths[layout.symbols.index(32768)]
    assert dominant == 1
    assert layout.nbits <= entropy_bits(values) + values.size  # Huffman costs < 1 bit/symbol above entropy


def test_length_limit_on_fibonacci_frequencies():
    # Fibonacci weights make the optimal tree a chain: 29 levels deep for 30 symbols.
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    values = np.repeat(np.arange(30, dtype=np.int32) * 5, fib)
    np.random.default_rng(5).shuffle(values)
    layout = parse(roundtrip(values))
    assert max(layout.lengths) <= huffman.MAX_CODE_LENGTH
    assert sum(2.0 ** -length for length in layout.lengths) == 1.0
    optimal = huffman_optimal_bits(fib)
    assert optimal <= layout.nbits <= optimal * 1.001


@st.composite
def heavy_tailed_frequencies(draw):
    """Frequency tables whose optimal Huffman tree is often deeper than MAX_CODE_LENGTH."""
    n = draw(st.integers(2, 300))
    if draw(st.booleans()):
        exponents = draw(st.lists(st.floats(0, 45), min_size=n, max_size=n))
        return np.array([int(2.0**e) for e in exponents], np.int64)
    freqs = [1, 1]  # Fibonacci-like growth: a deep chain
    for _ in range(n - 2):
        freqs.append(min(freqs[-1] + freqs[-2] + draw(st.integers(0, 3)), 2**45))
    return np.array(draw(st.permutations(freqs)), np.int64)


@HYPOTHESIS
@given(heavy_tailed_frequencies())
def test_length_limited_code_is_complete_and_near_optimal(freqs):
    lengths = huffman._code_lengths(freqs).astype(np.int64)
    assert lengths.max() <= huffman.MAX_CODE_LENGTH
    assert sum(1 << (huffman.MAX_CODE_LENGTH - int(length)) for length in lengths) == 1 << huffman.MAX_CODE_LENGTH
    cost, optimal, total = int((freqs * lengths).sum()), huffman_optimal_bits(freqs), int(freqs.sum())
    assert optimal <= cost <= optimal + 0.001 * total  # raising rare frequencies costs almost nothing


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 30.0, 300.0])
def test_laplace_codes_round_trip(scale):
    roundtrip(laplace_codes(100_000, scale, seed=int(scale * 10)))


@pytest.mark.parametrize("scale", [2.0, 3.0, 10.0, 100.0])
def test_size_close_to_entropy(scale):
    values = laplace_codes(200_000, scale, seed=7)
    data = huffman.encode(values)
    layout = parse(data)
    n, entropy = values.size, entropy_bits(values)
    distinct = len(layout.symbols)
    assert layout.nbits >= entropy - 1e-6 * n  # no prefix code beats the entropy
    # Huffman's guaranteed redundancy is < p_max + 0.086 bits/symbol (Gallager);
    # for these smooth, flat-topped distributions it is far smaller in practice.
    assert layout.nbits <= entropy + 0.05 * n
    assert layout.table_bytes <= 16 + 3 * distinct  # ids are 1-byte gaps here, lengths 1 byte
    assert len(data) == layout.table_bytes + (layout.nbits + 7) // 8


def test_exact_stream_for_known_input():
    # Frequencies 4, 2, 1, 1 -> lengths 1, 2, 3, 3 -> canonical codes 0, 10, 110, 111.
    values = np.array([5, 5, 6, 5, 7, 6, 8, 5], np.int32)
    data = huffman.encode(values)
    bits = "0 0 10 0 110 10 111 0".replace(" ", "")
    bitstream = int(bits.ljust(16, "0"), 2).to_bytes(2, "big")
    assert data == build(8, [5, 6, 7, 8], [1, 2, 3, 3], len(bits), bitstream)


def test_deterministic_output():
    values = laplace_codes(100_000, 4.0, seed=8)
    assert huffman.encode(values) == huffman.encode(values.copy())


def test_decode_accepts_buffer_types():
    values = laplace_codes(1000, 3.0)
    data = huffman.encode(values)
    padded = b"xx" + data + b"yy"
    for buffer in (bytearray(data), memoryview(data), memoryview(padded)[2:-2]):
        np.testing.assert_array_equal(huffman.decode(buffer, values.size), values)


@st.composite
def symbol_arrays(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.uint32, np.int64]))
    top = min(np.iinfo(dtype).max, huffman.MAX_SYMBOL)
    high = draw(st.sampled_from([1, 3, 255, 65535, 2**20, top]))
    return draw(hnp.arrays(dtype, st.integers(0, 3000), elements=st.integers(0, min(high, top))))


@HYPOTHESIS
@given(symbol_arrays())
def test_round_trip_arbitrary_arrays(values):
    data = roundtrip(values)
    layout = parse(data)
    if values.size:
        assert max(layout.lengths) <= huffman.MAX_CODE_LENGTH
        # Any prefix code is >= entropy; Huffman is < 1 bit/symbol above it.
        entropy = entropy_bits(values)
        assert entropy - 1e-6 * values.size <= layout.nbits <= entropy + values.size


@HYPOTHESIS
@given(
    n=st.integers(1, 50_000),
    scale=st.floats(0.05, 2000.0),
    center=st.integers(0, 2**20),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_random_distributions(n, scale, center, seed):
    rng = np.random.default_rng(seed)
    values = np.clip(np.rint(rng.laplace(center, scale, n)), 0, huffman.MAX_SYMBOL).astype(np.int64)
    roundtrip(values)


# ---------------------------------------------------------------------------
# Bad input to encode / decode arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.array([1, -1]),
        np.array([0, huffman.MAX_SYMBOL + 1], np.int64),
        np.array([2**63], np.uint64),
        np.array([1.0, 2.0]),
        np.array([True, False]),
        np.zeros((2, 2), np.int32),
    ],
)
def test_encode_rejects_invalid_symbols(values):
    with pytest.raises(ValueError):
        huffman.encode(values)


def test_decode_rejects_negative_count():
    with pytest.raises(ValueError):
        huffman.decode(huffman.encode(np.array([1, 2])), -1)


# ---------------------------------------------------------------------------
# Damaged and hostile streams
# ---------------------------------------------------------------------------

SMALL_VALUES = laplace_codes(120, 3.0, seed=9)
SMALL_STREAM = huffman.encode(SMALL_VALUES)


def test_every_truncation_is_detected():
    for size in range(len(SMALL_STREAM)):
        with pytest.raises(CorruptStreamError):
            huffman.decode(SMALL_STREAM[:size], SMALL_VALUES.size)


@pytest.mark.parametrize("tail", [b"\x00", b"\x01", b"\xff" * 9])
def test_trailing_garbage_is_detected(tail):
    with pytest.raises(CorruptStreamError):
        huffman.decode(SMALL_STREAM + tail, SMALL_VALUES.size)


@pytest.mark.parametrize("count", [0, 1, SMALL_VALUES.size - 1, SMALL_VALUES.size + 1, 2**40])
def test_count_mismatch_is_detected(count):
    with pytest.raises(CorruptStreamError):
        huffman.decode(SMALL_STREAM, count)


def test_every_single_byte_mutation():
    layout = parse(SMALL_STREAM)
    lengths_start = layout.table_bytes - len(layout.lengths)
    header_end = 1 + sum(len(varint(v)) for v in (layout.count, len(layout.symbols), layout.nbits))
    for position in range(len(SMALL_STREAM)):
        # Changing the header or one code length always breaks a consistency check.
        # Symbol ids and the bitstream carry no redundancy: a flip there may
        # decode to other values (catching that is the container checksum's job).
        must_fail = position < header_end or lengths_start <= position < layout.table_bytes
        for mask in range(1, 256):
            mutated = bytearray(SMALL_STREAM)
            mutated[position] ^= mask
            decoded = assert_decodes_or_corrupt(bytes(mutated), SMALL_VALUES.size)
            assert not (must_fail and decoded), (position, mask)


@pytest.mark.parametrize("position", range(8))
def test_every_single_byte_mutation_of_tiny_streams(position):
    for values in ([7], [7, 7, 7], [1, 2], [0, 1, 1, 2, 2, 2, 2, 300]):
        data = huffman.encode(np.array(values))
        if position < len(data):
            for mask in range(1, 256):
                mutated = bytearray(data)
                mutated[position] ^= mask
                assert_decodes_or_corrupt(bytes(mutated), len(values))


@pytest.mark.parametrize(
    "data, count",
    [
        (b"", 0),
        (b"\x02\x00\x00\x00", 0),  # unknown version
        (b"\x01\x00\x00\x00\x00", 0),  # empty stream with a trailing byte
        (b"\x01\x00\x01\x00", 0),  # empty stream with an alphabet
        (b"\x01\x80\x00\x00\x00", 0),  # overlong varint
        (b"\x01" + b"\xff" * 10, 5),  # varint longer than 9 bytes
        (build(3, [4, 5], [1, 1], 3, b"\x00")[:6], 3),  # table cut short
        (build(3, [4], [1], 3, b"\x00"), 3),  # single symbol must have length 0
        (build(3, [4], [0], 3, b"\x00"), 3),  # single symbol must have no bits
        (build(3, [4, 5], [0, 1], 3, b"\x00"), 3),  # zero length among several
        (build(3, [4, 5], [1, 25], 3, b"\x00"), 3),  # longer than MAX_CODE_LENGTH
        (build(3, [4, 5, 6], [1, 1, 1], 3, b"\x00"), 3),  # oversubscribed (Kraft > 1)
        (build(3, [4, 5, 6], [1, 2, 3], 3, b"\x00"), 3),  # incomplete (Kraft < 1)
        (build(3, [4, 5], [1, 1], 2, b"\x00"), 3),  # fewer bits than symbols
        (build(3, [4, 5], [1, 1], 9, b"\x00\x00"), 3),  # bits declared but not used
        (build(3, [4, 5], [1, 1], 3, b"\x01"), 3),  # nonzero padding
        (build(3, [4, 5], [1, 1], 3, b""), 3),  # bitstream missing
        (build(3, [4, 5, 6, 7], [2, 2, 2, 2], 6, b"\x00"), 3),  # more symbols than the count
        (build(2, [4, 5], [1, 1], 2, b"\x00", version=0), 2),
        (build(1, [huffman.MAX_SYMBOL + 1], [0], 0), 1),  # symbol id out of range
        (b"\x01\x02\x02\x02" + varint(huffman.MAX_SYMBOL) + varint(2**62) + b"\x01\x01\x40", 2),  # gap overflows
    ],
)
def test_crafted_bad_streams(data, count):
    with pytest.raises(CorruptStreamError):
        huffman.decode(data, count)


def test_huge_declared_sizes_fail_fast():
    # Claimed sizes far beyond the data must be rejected before anything is allocated.
    for n_distinct, nbits, count in [(2**40, 8, 2), (2, 2**60, 2**40), (2**62, 2**62, 2**62)]:
        data = b"\x01" + varint(count) + varint(n_distinct) + varint(nbits) + b"\x00\x00\x01\x01\x00"
        with pytest.raises(CorruptStreamError):
            huffman.decode(data, count)


def test_all_ones_bitstream_takes_longest_codes_and_cannot_overrun():
    # Lengths 1, 2, ..., 24, 24 form a complete code whose all-ones code is 24 bits long.
    lengths = list(range(1, huffman.MAX_CODE_LENGTH + 1)) + [huffman.MAX_CODE_LENGTH]
    symbols = [10 * i for i in range(len(lengths))]
    count = 30  # the decoder insists on count >= number of distinct symbols
    ones = b"\xff" * (count * huffman.MAX_CODE_LENGTH // 8)
    nbits = 8 * len(ones)
    decoded = huffman.decode(build(count, symbols, lengths, nbits, ones), count)
    np.testing.assert_array_equal(decoded, [symbols[-1]] * count)
    # One more symbol would need bits beyond the end of the data.
    with pytest.raises(CorruptStreamError):
        huffman.decode(build(count + 1, symbols, lengths, nbits, ones), count + 1)


@HYPOTHESIS
@given(st.binary(max_size=400), st.integers(0, 2000))
def test_random_garbage(data, count):
    assert_decodes_or_corrupt(data, count)


@HYPOTHESIS
@given(
    count=st.integers(1, 300),
    n_distinct=st.integers(1, 40),
    nbits=st.integers(0, 3000),
    body=st.binary(max_size=500),
)
def test_random_body_behind_plausible_header(count, n_distinct, nbits, body):
    data = b"\x01" + varint(count) + varint(n_distinct) + varint(nbits) + body
    assert_decodes_or_corrupt(data, count)


@HYPOTHESIS
@given(st.data())
def test_random_bitstream_behind_valid_table(data):
    values = laplace_codes(data.draw(st.integers(2, 400)), data.draw(st.floats(0.2, 50.0)), seed=10)
    encoded = huffman.encode(values)
    layout = parse(encoded)
    size = len(layout.bitstream)
    noise = data.draw(st.binary(min_size=max(0, size - 3), max_size=size + 3))
    assert_decodes_or_corrupt(encoded[: layout.table_bytes] + noise, values.size)
