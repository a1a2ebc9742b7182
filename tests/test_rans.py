"""Tests for the context-conditional rANS coder (gradzip.entropy.rans)."""

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba import njit

from gradzip.entropy import rans
from gradzip.errors import CorruptStreamError

MAX_Q = rans.MAX_MAGNITUDE
# beyond the tables: a <= 5-byte header, < 4 bytes of padding, <= 4 final states of 8 bytes
STREAM_OVERHEAD_BITS = 8 * (5 + 4 + 32)


def round_trip(codes, contexts, n_contexts):
    codes = np.asarray(codes, np.int32)
    contexts = np.asarray(contexts, np.uint8)
    data = rans.encode(codes, contexts, n_contexts)
    assert isinstance(data, bytes)
    decoded = rans.decode(data, contexts, n_contexts)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, codes)
    return data


def laplace_codes(rng, scale, n):
    return np.round(rng.laplace(0.0, scale, n)).astype(np.int32)


def decode_or_corrupt(data, contexts, n_contexts):
    """Decoding damaged data must raise CorruptStreamError or return a well-formed array."""
    try:
        decoded = rans.decode(data, contexts, n_contexts)
    except CorruptStreamError:
        return None
    assert decoded.dtype == np.int32 and decoded.shape == contexts.shape
    return decoded


# ---- edge cases ----------------------------------------------------------------------


def test_empty():
    codes, contexts = np.zeros(0, np.int32), np.zeros(0, np.uint8)
    assert round_trip(codes, contexts, 1) == b""
    assert rans.ideal_bits(codes, contexts, 1) == 0.0
    with pytest.raises(CorruptStreamError):
        rans.decode(b"\x00", contexts, 1)


@pytest.mark.parametrize("value", [0, 1, -1, 15, -16, 17, 1000, -(2**16), MAX_Q, -MAX_Q])
def test_single_element(value):
    round_trip([value], [0], 1)


@pytest.mark.parametrize("value, extra_bits", [(0, 0), (3, 0), (-7, 0), (40000, 14)])
def test_single_distinct_code(value, extra_bits):
    n = 50_000
    data = round_trip(np.full(n, value), np.zeros(n), 1)
    # a token holding all the probability costs nothing: only raw extra bits remain
    assert len(data) < 64 + n * extra_bits // 8


def test_all_zeros_many_contexts():
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 200, 100_000).astype(np.uint8)
    round_trip(np.zeros(100_000), contexts, 200)
    assert rans.ideal_bits(np.zeros(100_000, np.int32), contexts, 200) == 0.0


def test_one_context_of_256():
    rng = np.random.default_rng(1)
    round_trip(laplace_codes(rng, 5.0, 20_000), np.full(20_000, 255), 256)


def test_extreme_magnitudes():
    rng = np.random.default_rng(2)
    codes = rng.integers(-MAX_Q, MAX_Q + 1, 30_000)
    codes[::7] = MAX_Q
    codes[1::7] = -MAX_Q
    codes[2::7] = 2**23
    round_trip(codes, rng.integers(0, 3, codes.size), 3)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 2047, 2048, 2049, 4095, 4096, 4097, 16383, 16384, 16385, 16387])
def test_lengths_around_lane_boundaries(n):
    rng = np.random.default_rng(n)
    round_trip(laplace_codes(rng, 3.0, n), rng.integers(0, 2, n), 2)


def test_skewed_distribution():
    rng = np.random.default_rng(3)
    codes = np.zeros(300_000, np.int32)
    hit = rng.random(codes.size) < 0.002
    codes[hit] = laplace_codes(rng, 200.0, int(hit.sum()))
    round_trip(codes, (rng.random(codes.size) < 0.5).astype(np.uint8), 2)


def test_deterministic_and_accepts_other_int_dtypes():
    rng = np.random.default_rng(4)
    codes = laplace_codes(rng, 20.0, 10_000)
    contexts = rng.integers(0, 5, codes.size).astype(np.uint8)
    data = rans.encode(codes, contexts, 5)
    assert rans.encode(codes.copy(), contexts.copy(), 5) == data
    assert rans.encode(codes.astype(np.int64), contexts, 5) == data
    assert rans.encode(codes[::-1].copy()[::-1], contexts, 5) == data
    np.testing.assert_array_equal(rans.decode(memoryview(data), contexts, 5), codes)
    np.testing.assert_array_equal(rans.decode(bytearray(data), contexts, 5), codes)
    read_only = np.frombuffer(contexts.tobytes(), np.uint8)
    np.testing.assert_array_equal(rans.decode(data, read_only, 5), codes)


def test_invalid_inputs():
    codes, contexts = np.zeros(4, np.int32), np.zeros(4, np.uint8)
    with pytest.raises(ValueError):
        rans.encode(np.array([MAX_Q + 1], np.int32), contexts[:1], 1)
    with pytest.raises(ValueError):
        rans.encode(np.array([-(2**31)], np.int32), contexts[:1], 1)
    with pytest.raises(ValueError):
        rans.encode(np.array([2**40]), contexts[:1], 1)
    with pytest.raises(ValueError):
        rans.encode(codes, np.array([0, 1, 2, 3], np.uint8), 3)
    with pytest.raises(ValueError):
        rans.encode(codes, contexts[:3], 1)
    with pytest.raises(ValueError):
        rans.encode(codes, contexts.astype(np.int32), 1)
    with pytest.raises(ValueError):
        rans.encode(codes.astype(np.float32), contexts, 1)
    for n_contexts in (0, 257):
        with pytest.raises(ValueError):
            rans.encode(codes, contexts, n_contexts)
    with pytest.raises(ValueError):
        rans.decode(rans.encode(codes, contexts, 1), contexts + 1, 1)


# ---- random round trips --------------------------------------------------------------


def code_arrays():
    small = st.integers(-20, 20)
    wide = st.integers(-MAX_Q, MAX_Q)
    element = st.one_of(small, small, st.integers(-3000, 3000), wide)
    return hnp.arrays(np.int32, st.integers(0, 600), elements=element)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codes=code_arrays(), n_contexts=st.integers(1, 256), data=st.data())
def test_round_trip_random(codes, n_contexts, data):
    contexts = data.draw(hnp.arrays(np.uint8, codes.size, elements=st.integers(0, n_contexts - 1)))
    round_trip(codes, contexts, n_contexts)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20_000), scale=st.floats(0.01, 5000.0))
def test_round_trip_laplace(seed, n, scale):
    rng = np.random.default_rng(seed)
    n_contexts = int(rng.integers(1, 17))
    contexts = rng.integers(0, n_contexts, n).astype(np.uint8)
    codes = np.clip(laplace_codes(rng, scale, n) * (1 + contexts), -MAX_Q, MAX_Q)
    round_trip(codes, contexts, n_contexts)


# ---- efficiency ----------------------------------------------------------------------


@functools.cache
def realistic_cases():
    rng = np.random.default_rng(5)
    n = 200_000
    cases = {}
    for scale in (0.3, 3.0, 30.0, 300.0):
        cases[f"laplace {scale}"] = (laplace_codes(rng, scale, n), np.zeros(n, np.uint8), 1)
    contexts = rng.integers(0, 8, n).astype(np.uint8)
    scales = np.array([0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0])
    mixture = np.round(rng.laplace(0.0, 1.0, n) * scales[contexts]).astype(np.int32)
    cases["mixture of 8"] = (mixture, contexts, 8)
    oriented = np.abs(laplace_codes(rng, 4.0, n))
    oriented[rng.random(n) < 0.25] *= -1
    cases["sign-skewed"] = (oriented, np.zeros(n, np.uint8), 1)
    sparse = np.zeros(n, np.int32)
    hit = rng.random(n) < 0.03
    sparse[hit] = laplace_codes(rng, 2.0, int(hit.sum()))
    cases["97% zeros"] = (sparse, np.zeros(n, np.uint8), 1)
    return cases


@pytest.mark.parametrize("name", list(realistic_cases()))
def test_payload_close_to_ideal(name):
    codes, contexts, n_contexts = realistic_cases()[name]
    data = round_trip(codes, contexts, n_contexts)
    ideal = rans.ideal_bits(codes, contexts, n_contexts)
    tables = rans.table_bits(codes, contexts, n_contexts)
    actual = 8 * len(data)
    assert actual - tables >= 0.999 * ideal  # no model beats its own entropy
    assert actual <= 1.02 * ideal + tables + STREAM_OVERHEAD_BITS
    assert tables < 0.01 * actual


def test_contexts_pay_off():
    rng = np.random.default_rng(6)
    contexts = rng.integers(0, 4, 100_000).astype(np.uint8)
    codes = laplace_codes(rng, 1.0, contexts.size) * (1 + 10 * contexts)
    with_contexts = len(round_trip(codes, contexts, 4))
    without = len(round_trip(codes, np.zeros_like(contexts), 1))
    assert with_contexts < 0.9 * without


def test_sign_is_modelled():
    rng = np.random.default_rng(7)
    symmetric = laplace_codes(rng, 3.0, 100_000)
    oriented = np.abs(symmetric)
    contexts = np.zeros(symmetric.size, np.uint8)
    saved_bits = 8 * (len(round_trip(symmetric, contexts, 1)) - len(round_trip(oriented, contexts, 1)))
    assert saved_bits > 0.8 * np.count_nonzero(symmetric)  # close to one bit per nonzero


# ---- damaged input -------------------------------------------------------------------


def small_stream():
    rng = np.random.default_rng(8)
    n = 300
    contexts = rng.integers(0, 3, n).astype(np.uint8)
    codes = laplace_codes(rng, 2.0, n) * (1 + 20 * contexts)
    codes[::50] = rng.integers(-MAX_Q, MAX_Q, codes[::50].size)
    return rans.encode(codes, contexts, 3), codes, contexts


def test_every_truncation():
    data, codes, contexts = small_stream()
    for length in range(len(data)):
        decode_or_corrupt(data[:length], contexts, 3)
    for extra in (b"\x00", b"\x00" * 4, b"\x01\x02\x03\x04"):
        assert decode_or_corrupt(data + extra, contexts, 3) is None


def test_every_bit_flip():
    data, codes, contexts = small_stream()
    undetected = 0
    for index in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[index] ^= 1 << bit
            decoded = decode_or_corrupt(bytes(damaged), contexts, 3)
            undetected += decoded is not None
    # the state and consumption checks catch most damage; raw extra bits cannot be checked
    assert undetected < 0.5 * 8 * len(data)


def test_every_byte_replaced():
    data, codes, contexts = small_stream()
    for index in range(len(data)):
        for value in (0x00, 0xFF, data[index] ^ 0x5A):
            damaged = bytearray(data)
            damaged[index] = value
            decode_or_corrupt(bytes(damaged), contexts, 3)


def test_lanes_follow_the_length():
    """One rANS state below 2048 codes, two below 16384, four from there: each more state
    is one more 8-byte final state, so zeros (which cost no payload) show the count."""
    def zeros(n):
        return len(rans.encode(np.zeros(n, np.int32), np.zeros(n, np.uint8), 1))

    assert zeros(2048) - zeros(2047) == 8
    assert zeros(4096) - zeros(4095) == 0
    assert zeros(16384) - zeros(16383) == 16


@pytest.mark.parametrize("n", [2051, 5003, 20003])
def test_damaged_multi_lane_streams(n):
    """Streams of 2048 or more elements decode 2 or 4 lanes at a time with unclamped reads
    while those stay inside the arrays; damage anywhere must still end in an error or a
    well-formed array (run with NUMBA_BOUNDSCHECK=1 to check the reads themselves)."""
    rng = np.random.default_rng(9)
    contexts = rng.integers(0, 5, n).astype(np.uint8)
    codes = laplace_codes(rng, 6.0, n)
    codes[::97] = rng.integers(-MAX_Q, MAX_Q, codes[::97].size)
    data = round_trip(codes, contexts, 5)
    for length in list(range(0, len(data), 997)) + list(range(len(data) - 40, len(data))):
        decode_or_corrupt(data[:length], contexts, 5)
    for index in rng.integers(0, len(data), 300):
        damaged = bytearray(data)
        damaged[index] ^= int(rng.integers(1, 256))
        decode_or_corrupt(bytes(damaged), contexts, 5)
    for cut in rng.integers(0, len(data), 20):  # a run of zeros: extra bits and words missing
        decode_or_corrupt(data[:cut] + bytes(4096) + data[cut + 4096 :], contexts, 5)
    decode_or_corrupt(data, contexts[:-4], 5)
    decode_or_corrupt(data, np.zeros_like(contexts), 5)


def test_wrong_contexts():
    data, codes, contexts = small_stream()
    decode_or_corrupt(data, contexts[:-1], 3)
    decode_or_corrupt(data, np.concatenate([contexts, contexts]), 3)
    decode_or_corrupt(data, np.zeros_like(contexts), 3)
    decode_or_corrupt(data, contexts[::-1].copy(), 3)
    decode_or_corrupt(data, contexts, 4)


@settings(max_examples=500, deadline=None)
@given(
    garbage=st.binary(max_size=300),
    n=st.integers(0, 2000),
    n_contexts=st.integers(1, 256),
    seed=st.integers(0, 2**16),
)
def test_random_garbage(garbage, n, n_contexts, seed):
    contexts = np.random.default_rng(seed).integers(0, n_contexts, n).astype(np.uint8)
    decode_or_corrupt(garbage, contexts, n_contexts)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    position=st.floats(0.0, 1.0),
    garbage=st.binary(min_size=1, max_size=64),
)
def test_spliced_garbage(seed, position, garbage):
    """Garbage written over part of a valid stream gets past the first checks."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    contexts = rng.integers(0, 4, n).astype(np.uint8)
    data = rans.encode(laplace_codes(rng, 10.0, n), contexts, 4)
    cut = int(position * len(data))
    decode_or_corrupt(data[:cut] + garbage + data[cut + len(garbage) :], contexts, 4)


def test_small_contexts_send_coarser_tables_when_that_is_smaller():
    """Contexts of a few hundred wide-spread codes: raw counts would cost more than the
    coarser table loses on the payload, so encode beats the default-precision bound."""
    rng = np.random.default_rng(12)
    n_contexts = 12
    contexts = rng.integers(0, n_contexts, 3000).astype(np.uint8)
    codes = laplace_codes(rng, 1.0, 3000) * (1 + contexts.astype(np.int32))
    data = round_trip(codes, contexts, n_contexts)
    bound = rans.ideal_bits(codes, contexts, n_contexts) + rans.table_bits(codes, contexts, n_contexts)
    assert 8 * len(data) < bound
    assert 8 * len(data) <= rans.estimated_bits(codes, contexts, n_contexts) + STREAM_OVERHEAD_BITS


def test_table_precision_above_the_context_total_is_corrupt():
    contexts = np.zeros(40, np.uint8)  # one context of 40 elements: p = bit_length(40) + 2 = 8
    codes = np.arange(40, dtype=np.int32) % 3
    data = bytearray(rans.encode(codes, contexts, 1))
    assert data[1] & 0x0F in range(0, 9)  # the precision field: the first 4 bits after the varint
    data[1] = (data[1] & 0xF0) | 15
    with pytest.raises(CorruptStreamError):
        rans.decode(bytes(data), contexts, 1)


@njit  # no cache: a cached caller keeps the rans kernels it was compiled with
def _encoder_quotient_mismatches(bits, seed):
    """Elements where _put_symbol's multiply-high state differs from the one by division, over
    every frequency at this precision: random states below x_max and those next to multiples
    of freq and to x_max."""
    np.random.seed(seed)
    words = np.zeros(1, np.uint32)
    freqs = np.zeros(1 << rans.TOKEN_SHIFT, np.int64)
    starts = np.zeros(1 << rans.TOKEN_SHIFT, np.int64)
    prob_bits = np.full(1, bits, np.int64)
    mismatches = 0
    for freq in range(1, (1 << bits) + 1):
        freqs[0], starts[0] = freq, (1 << bits) - freq
        table = rans._encoder_table(prob_bits, freqs, starts)
        x_max = np.int64(freq) << (63 - bits) if freq < 1 << bits else np.int64(2**63 - 1)
        for trial in range(40):
            if trial < 8:
                x = x_max - 1 - trial
            elif trial < 16:
                x = (x_max // freq - trial + 7) * freq + (trial % 2) * (freq - 1)
            else:
                x = ((np.int64(np.random.randint(0, 2**31)) << 32) | np.random.randint(0, 2**32)) % x_max
            x = max(x, rans.RANS_LOW)
            pos, state = rans._put_symbol(words, 0, x, table, 0)
            mismatches += pos != 0 or state != ((x // freq) << bits) + x % freq + starts[0]
    return mismatches


@pytest.mark.parametrize("bits", range(3, rans.PROB_BITS + 1))
def test_encoder_reciprocals_match_division(bits):
    assert _encoder_quotient_mismatches(bits, bits) == 0


@pytest.mark.parametrize("n, n_contexts", [(1, 1), (777, 3), (5000, 12), (100_000, 64), (3000, 256)])
def test_estimates_of_every_merge_from_one_histogram_equal_separate_estimates(n, n_contexts):
    rng = np.random.default_rng(n)
    codes = np.round(rng.laplace(size=n) * rng.exponential(5, n)).astype(np.int32)
    contexts = rng.integers(0, n_contexts, n).astype(np.uint8)
    by_merge = rans.estimated_bits_by_merge(codes, contexts, n_contexts, 2)
    for shift in range(3):
        merged = (contexts >> np.uint8(shift), ((n_contexts - 1) >> shift) + 1)
        assert by_merge[shift] == rans.estimated_bits(codes, *merged), shift


# ---- segmented streams (SEGMENTED_FROM codes or more) ----------------------------------


def segmented_case(n, n_contexts=5, seed=10):
    rng = np.random.default_rng(seed)
    contexts = rng.integers(0, n_contexts, n).astype(np.uint8)
    codes = laplace_codes(rng, 4.0, n) * (1 + 3 * contexts.astype(np.int32))
    codes[::1001] = rng.integers(-MAX_Q, MAX_Q, codes[::1001].size)
    return codes, contexts


@pytest.mark.parametrize("n", [rans.SEGMENTED_FROM - 1, rans.SEGMENTED_FROM, rans.SEGMENTED_FROM + 1,
                               3 * rans.SEGMENT_ELEMENTS + 5, 4 * rans.SEGMENT_ELEMENTS + rans.FEW_ELEMENTS - 1])
def test_segmented_streams_round_trip_with_the_same_bytes_on_any_thread_count(n):
    codes, contexts = segmented_case(n)
    data = round_trip(codes, contexts, 5)
    assert rans.encode(codes, contexts, 5, threads=2) == rans.encode(codes, contexts, 5, threads=3) == data
    for threads in (2, 3):
        np.testing.assert_array_equal(rans.decode(data, contexts, 5, threads=threads), codes)
    # what segmenting costs: a directory and the final states of each segment
    unsegmented = len(rans.encode(codes[: rans.SEGMENTED_FROM - 1], contexts[: rans.SEGMENTED_FROM - 1], 5))
    if n >= rans.SEGMENTED_FROM:
        assert len(data) < unsegmented * n / (rans.SEGMENTED_FROM - 1) * 1.002


def test_damaged_segmented_streams():
    """Damage to the tables, the segment directory, the extra bits or any segment's rANS
    words ends in CorruptStreamError or a well-formed array, on one thread or several."""
    codes, contexts = segmented_case(2 * rans.SEGMENT_ELEMENTS + 777, seed=11)
    data = round_trip(codes, contexts, 5)
    rng = np.random.default_rng(12)
    for length in list(range(0, 80)) + list(rng.integers(80, len(data), 40)) + list(range(len(data) - 20, len(data))):
        decode_or_corrupt(data[:length], contexts, 5)
    for index in list(range(0, 60)) + list(rng.integers(60, len(data), 200)):
        damaged = bytearray(data)
        damaged[index] ^= int(rng.integers(1, 256))
        try:
            decoded = rans.decode(bytes(damaged), contexts, 5, threads=2)
        except CorruptStreamError:
            continue
        assert decoded.dtype == np.int32 and decoded.shape == contexts.shape
    decode_or_corrupt(data + b"\x00\x00\x00\x00", contexts, 5)
    decode_or_corrupt(data, contexts[:-1], 5)
    decode_or_corrupt(data, np.concatenate([contexts, contexts[: rans.SEGMENT_ELEMENTS]]), 5)
    decode_or_corrupt(data, np.zeros_like(contexts), 5)


def _sparse_flag(data, contexts, n_contexts):
    """The decoder's choice of its mostly-zeros loop for an unsegmented stream."""
    status, bit_words, n_bit_words, _ = rans._stream_words(np.frombuffer(data, np.uint8))
    assert status == rans.OK
    return rans._decode_model(bit_words, n_bit_words, contexts, n_contexts)[5]


@pytest.mark.parametrize("n", [16_384, 16_387, 100_001, rans.SEGMENTED_FROM + 3])
def test_mostly_zero_streams_take_the_sparse_loop_and_round_trip(n):
    """A stream whose tables expect SPARSE_ZERO_SHARE zeros or more decodes groups of four
    zeros without their extra bits: codes with extra bits among them (alone in a group, or
    several, in every context, near the stream's end) come back exactly, on any threads;
    a stream just below the share keeps the other loop."""
    rng = np.random.default_rng(n)
    contexts = rng.integers(0, 3, n).astype(np.uint8)
    codes = np.zeros(n, np.int32)
    nonzero = rng.random(n) < 0.01
    codes[nonzero] = rng.integers(-5000, 5000, int(nonzero.sum()))
    codes[-7:] = [0, 17, -1, 0, 0, 3000, 0]
    codes[100:104] = [40, -40, 1 << 20, -(1 << 20)]
    data = round_trip(codes, contexts, 3)
    for threads in (1, 2):
        np.testing.assert_array_equal(rans.decode(data, contexts, 3, threads=threads), codes)
    if n < rans.SEGMENTED_FROM:
        assert _sparse_flag(data, contexts, 3)
        denser = codes.copy()
        denser[rng.random(n) < 0.035] = 1  # about 95.5% zeros: below SPARSE_ZERO_SHARE
        assert 0.95 < (denser == 0).mean() < rans.SPARSE_ZERO_SHARE
        assert not _sparse_flag(round_trip(denser, contexts, 3), contexts, 3)


@pytest.mark.parametrize("n", [0, 1, 2304, rans.PARTIAL_COUNTS_FROM + 3, 70_000, 600_000])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_context_estimate_without_contexts_equals_the_one_with_zero_contexts(n, threads):
    rng = np.random.default_rng(n)
    for codes in (np.round(rng.laplace(0, 6, n)).astype(np.int32),
                  np.where(rng.random(n) < 0.98, 0, rng.integers(-(1 << 20), 1 << 20, n)).astype(np.int32)):
        expected = rans.estimated_bits(codes, np.zeros(n, np.uint8), 1, threads)
        assert rans.estimated_bits(codes, None, 1, threads) == expected
    with pytest.raises(ValueError):
        rans.estimated_bits(np.full(3, 1 << 25, np.int32), None, 1)
    with pytest.raises(ValueError):
        rans.estimated_bits(np.zeros(3, np.int32), None, 2)


@pytest.mark.parametrize("at", [400, 401, 402, 403, rans.PARTIAL_COUNTS_FROM + 1])
def test_one_context_estimate_refuses_a_code_out_of_range_in_the_partial_counts_and_their_tail(at):
    codes = np.zeros(rans.PARTIAL_COUNTS_FROM + 3, np.int32)  # counted four at a time (each of the four), then a tail of 3
    codes[at] = -(1 << 25)
    with pytest.raises(ValueError):
        rans.estimated_bits(codes, None, 1)


@njit
def _tokens_of(codes):
    out = np.empty((codes.size, 3), np.int64)
    for i in range(codes.size):
        out[i, 0], out[i, 1], out[i, 2] = rans._token(np.int64(codes[i]))
    return out


def test_tabled_tokens_are_the_tokens_the_arithmetic_gives():
    """Codes in the table's range take their token and extra bits from TOKEN_AND_BITS: each
    names its code (sign, base magnitude plus that many raw bits), as the arithmetic's do
    beyond the table, and the table is that arithmetic's (its Python spelling, which is
    checked against the kernel's on codes beyond the table, up to the largest magnitude)."""
    limit = rans.TABLED_CODES
    inside = np.arange(-limit, limit, dtype=np.int64)
    rng = np.random.default_rng(3)
    beyond = np.concatenate([np.arange(limit, limit + 4100), -np.arange(limit + 1, limit + 4100),
                             rng.integers(limit, rans.MAX_MAGNITUDE + 1, 20000) * rng.choice([-1, 1], 20000),
                             [rans.MAX_MAGNITUDE, -rans.MAX_MAGNITUDE]]).astype(np.int64)
    for codes in (inside, beyond):
        tokens, magnitudes, n_bits = _tokens_of(codes).T
        np.testing.assert_array_equal(magnitudes, np.abs(codes))
        base, extra = rans.TOKEN_BASE[tokens], rans.TOKEN_EXTRA_BITS[tokens]
        np.testing.assert_array_equal(n_bits, extra)
        assert np.all((base <= magnitudes) & (magnitudes < base + (1 << extra)) | (codes == 0) & (tokens == 0))
        np.testing.assert_array_equal(rans.TOKEN_NEGATIVE[tokens], (codes < 0).astype(np.int64))
    formula = np.array([rans._formula_token(int(q)) for q in beyond])
    np.testing.assert_array_equal(formula, _tokens_of(beyond)[:, [0, 2]])
    table = np.array([rans._formula_token(int(q)) for q in inside])
    np.testing.assert_array_equal(rans.TOKEN_AND_BITS & 0xFF, table[:, 0])
    np.testing.assert_array_equal(rans.TOKEN_AND_BITS >> 8, table[:, 1])


def _reference_stream_words(raw):
    """What the decoder parsed in Python before the kernel did it: (n_bit_words, bit words
    without their pads, rans words), or the error message."""
    value, used = 0, 0
    for i in range(min(raw.size, 5)):
        value |= int(raw[i] & 0x7F) << (7 * i)
        if not raw[i] & 0x80:
            if i > 0 and raw[i] == 0:
                return "non-canonical"
            used = i + 1
            break
    if not used:
        return "truncated"
    rans_start = used + 4 * value
    if rans_start > raw.size or (raw.size - rans_start) % 4:
        return "sections"
    return value, raw[used:rans_start].view("<u4").astype(np.uint32), raw[rans_start:].view("<u4").astype(np.uint32)


def test_the_kernels_stream_parsing_matches_the_layout_and_rejects_bad_headers():
    """An unsegmented stream's word count and sections, parsed inside the decoding kernel, are
    the documented layout's (little-endian words, 4 zero pads after the bit section); each
    malformed header has its status and raises CorruptStreamError from decode, with contexts
    and without (decode_one_context)."""
    rng = np.random.default_rng(11)
    good = [rans.encode(laplace_codes(rng, scale, n), np.zeros(n, np.uint8), 1)
            for n, scale in ((1, 1.0), (300, 3.0), (5000, 40.0), (20_000, 1e5))]
    headers = [b"", b"\x80", b"\xff" * 5, b"\x80\x00", b"\x81\x80\x00", b"\x02\x01\x02\x03\x04",
               b"\x01\x01\x02\x03\x04\x05", b"\x00\x01\x02\x03", b"\x7f" + bytes(8)]
    for data in good + headers + [g[:-1] for g in good] + [g + b"\x00" for g in good]:
        raw = np.frombuffer(data, np.uint8)
        status, bit_words, n_bit_words, rans_words = rans._stream_words(raw)
        expected = _reference_stream_words(raw)
        if isinstance(expected, str):
            assert status == (rans.ERR_SECTIONS if expected == "sections" else rans.ERR_WORD_COUNT), (data, expected)
            for decode in (lambda: rans.decode(data, np.zeros(7, np.uint8), 1), lambda: rans.decode_one_context(data, 7)):
                with pytest.raises(CorruptStreamError, match="varint" if expected != "sections" else "section lengths"):
                    decode()
            continue
        assert status == rans.OK and n_bit_words == expected[0]
        np.testing.assert_array_equal(bit_words, np.concatenate([expected[1], np.zeros(4, np.uint32)]))
        np.testing.assert_array_equal(rans_words, expected[2])


@pytest.mark.parametrize("n", [0, 1, 2047, 2048, 4096, 16_384, 70_000, rans.SEGMENTED_FROM + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_context_decoding_without_contexts_equals_decoding_with_zero_contexts(n, threads):
    rng = np.random.default_rng(n + 7)
    codes = np.where(rng.random(n) < 0.9, 0, np.round(rng.laplace(0, 300, n))).astype(np.int32)
    zeros = np.zeros(n, np.uint8)
    data = rans.encode(codes, zeros, 1, threads)
    np.testing.assert_array_equal(rans.decode_one_context(data, n, threads), codes)
    np.testing.assert_array_equal(rans.decode(data, zeros, 1, threads), codes)
    if n:
        for damaged in (data[:-4], data + b"\x00\x00\x00\x00"):
            with pytest.raises(CorruptStreamError):
                rans.decode_one_context(damaged, n, threads)
    # a wrong length: the same outcome either way (a 1-code stream of one symbol can take 2)
    outcomes = []
    for decode in (lambda: rans.decode_one_context(data, n + 1, threads), lambda: rans.decode(data, np.zeros(n + 1, np.uint8), 1, threads)):
        try:
            outcomes.append(decode().tobytes())
        except CorruptStreamError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("n", [0, 5, 3000, rans.SEGMENTED_FROM + 9])
def test_encoding_without_contexts_is_encoding_with_zero_contexts(n):
    rng = np.random.default_rng(n + 1)
    codes = np.round(rng.laplace(0, 20, n)).astype(np.int32)
    assert rans.encode(codes, None, 1, 2) == rans.encode(codes, np.zeros(n, np.uint8), 1, 2)
    with pytest.raises(ValueError):
        rans.encode(codes, None, 2)


def _certain_mixture(rng, n):
    """Codes in four contexts: 0 all zero and 1 all -1 (certain: one token without extra
    bits), 2 all 40 (one token, but with extra bits: not certain), 3 Laplacian; runs of rows
    in contexts 0 and 1 (an embedding's untouched rows), the rest mixed element by element."""
    contexts = rng.integers(0, 4, n).astype(np.uint8)
    rows = rng.random(n // 32) < 0.6
    contexts[: rows.size * 32][np.repeat(rows, 32)] = 0
    contexts[rng.random(n) < 0.05] = 1
    codes = laplace_codes(rng, 3.0, n)
    codes[contexts == 0], codes[contexts == 1], codes[contexts == 2] = 0, -1, 40
    return codes, contexts


@pytest.mark.parametrize("n", [16_384, 16_389, 200_003, rans.SEGMENTED_FROM + 5])
def test_certain_contexts_are_passed_over_with_the_same_bytes_and_codes(n):
    """A context whose table is one token without extra bits leaves the state as it is, so
    encoder and decoder pass over whole groups of four such elements: the words and codes
    are those of the loops without the skip, and so is every damaged stream's outcome."""
    rng = np.random.default_rng(n)
    codes, contexts = _certain_mixture(rng, n)
    data = round_trip(codes, contexts, 4)
    for threads in (1, 2):
        np.testing.assert_array_equal(rans.decode(data, contexts, 4, threads=threads), codes)

    histogram = np.zeros((4, 1 << rans.TOKEN_SHIFT), np.int64)
    symbols = np.empty(n, np.uint16)
    rans._tokenize(codes, contexts, symbols, histogram.reshape(-1), np.empty(n, np.uint32))
    prob_bits, _, _, freqs, starts = rans._build_model(histogram)
    certain = rans._certain_symbols(histogram, prob_bits, freqs)
    assert certain.size and certain.sum() == 2  # contexts 0 and 1, not 2 (extra bits)
    table = rans._encoder_table(prob_bits, freqs.reshape(-1), starts.reshape(-1))
    lanes = rans._lane_count(n)
    words = rans._rans_encode(symbols, table, lanes, certain)
    np.testing.assert_array_equal(words, rans._rans_encode(symbols, table, lanes, rans._NO_CERTAIN_SYMBOLS))

    if n >= rans.SEGMENTED_FROM:
        return
    status, bit_words, n_bit_words, rans_words = rans._stream_words(np.frombuffer(data, np.uint8))
    status, context_info, slot_tokens, symbol_info, bit_pos, sparse, certain_codes = rans._decode_model(
        bit_words, n_bit_words, contexts, 4)
    assert status == rans.OK and list(certain_codes) == [0, -1, rans.NOT_CERTAIN, rans.NOT_CERTAIN]

    def outcome(rans_words, certain_codes):
        decoded = np.zeros(n, np.int32)
        result = rans._decode_elements(rans_words, contexts, context_info, slot_tokens, symbol_info, lanes, bit_words,
                                       n_bit_words, bit_pos, sparse, certain_codes, decoded)
        return result, decoded

    for trial in range(40):  # damaged rANS words: the same status, bit position and codes
        damaged = rans_words.copy()
        if trial:
            at = rng.integers(0, damaged.size, 3)
            damaged[at] ^= rng.integers(1, 2**32, 3, dtype=np.uint64).astype(np.uint32)
        skipped, plain = outcome(damaged, certain_codes), outcome(damaged, rans._NO_CERTAIN)
        assert skipped[0] == plain[0]
        np.testing.assert_array_equal(skipped[1], plain[1])


def test_certain_contexts_under_the_share_are_not_skipped():
    """Below CERTAIN_SKIP_SHARE of the elements the skip's check would cost more than it saves."""
    rng = np.random.default_rng(5)
    n = 50_000
    contexts = (rng.random(n) < 0.2).astype(np.uint8)  # context 1 certain, a fifth of the elements
    codes = laplace_codes(rng, 3.0, n)
    codes[contexts == 1] = 0
    data = round_trip(codes, contexts, 2)
    status, bit_words, n_bit_words, _ = rans._stream_words(np.frombuffer(data, np.uint8))
    assert rans._decode_model(bit_words, n_bit_words, contexts, 2)[6].size == 0


@pytest.mark.parametrize("n", [0, 7, 8, 9, 1000, 65_543])
def test_context_counts_are_bincounts_in_runs_and_scattered(n):
    """The model's element counts, read eight contexts at a time (a word of eight equal
    ones adds 8): runs, scattered contexts, context 255, a tail of fewer than eight, and an
    array that starts at an odd byte of its buffer."""
    rng = np.random.default_rng(n)
    runs = np.repeat(rng.integers(0, 256, n // 16 + 1), 16)[:n]
    scattered = rng.integers(0, 256, n)
    mixed = np.where(rng.random(n) < 0.5, runs, scattered)
    for contexts in (runs, scattered, mixed, np.full(n, 255)):
        contexts = np.concatenate([[7], contexts]).astype(np.uint8)[1:]  # (odd start)
        expected = np.bincount(contexts, minlength=256)
        np.testing.assert_array_equal(rans._context_counts(contexts, 256), expected)
    np.testing.assert_array_equal(rans._context_counts(np.zeros(n, np.uint8), 1), [n])


@pytest.mark.parametrize("n", [rans.ZERO_RUNS_FROM + 13, 300_001])
def test_zero_runs_are_counted_and_tokenized_eight_at_a_time_as_one_by_one(n):
    """Codes that are mostly groups of eight zeros in one context are counted and tokenized
    by the group: the histogram, symbols, extra bits and status are those of the elements
    one by one, with nonzero codes, context changes and an out-of-range magnitude inside
    groups, and a tail shorter than a group."""
    rng = np.random.default_rng(n)
    contexts = np.repeat(rng.integers(0, 5, n // 40 + 1), 40)[:n].astype(np.uint8)
    contexts[rng.random(n) < 0.002] = 7
    codes = np.where(rng.random(n) < 0.01, rng.integers(-3000, 3000, n), 0).astype(np.int32)
    codes[-3:] = [0, 5, 0]
    assert rans._grouped_contexts(codes, contexts).size == n // 8  # (the groups' path is taken)
    for bad in (None, 1 << 25):
        if bad is not None:
            codes[n // 2] = bad
        expected_histogram = np.zeros(8 << rans.TOKEN_SHIFT, np.int64)
        expected_magnitudes = rans._count_each(codes, contexts, expected_histogram, 0, n)
        histogram = np.zeros_like(expected_histogram)
        status = rans._count_tokens(codes, contexts, histogram)
        np.testing.assert_array_equal(histogram, expected_histogram)
        assert status == (rans.OK if expected_magnitudes <= rans.MAX_MAGNITUDE else rans.ERR_MAGNITUDE_RANGE)
        assert (status == rans.OK) == (bad is None)

        outputs = []
        for grouped in (True, False):
            symbols, extra = np.zeros(n, np.uint16), np.zeros(n, np.uint32)
            histogram = np.zeros_like(expected_histogram)
            if grouped:
                state = rans._tokenize(codes, contexts, symbols, histogram, extra)
            else:
                magnitudes, *rest = rans._tokenize_each(codes, contexts, symbols, histogram, extra, 0, n, 0, 0, 0, 0)
                state = (rans.OK if magnitudes <= rans.MAX_MAGNITUDE else rans.ERR_MAGNITUDE_RANGE, *rest)
            outputs.append((state, symbols, histogram, extra[: state[1]]))
        (state, symbols, histogram, extra), (state_1, symbols_1, histogram_1, extra_1) = outputs
        assert tuple(state) == tuple(state_1)
        for a, b in ((symbols, symbols_1), (histogram, histogram_1), (extra, extra_1)):
            np.testing.assert_array_equal(a, b)
    codes[n // 2] = 0
    round_trip(codes, contexts, 8)

    # one context, without a contexts array: the same grouping over the codes alone
    assert rans._mostly_zero_groups(codes)
    for bad in (None, 1 << 25):
        if bad is not None:
            codes[n // 3] = bad
        expected = np.zeros(1 << rans.TOKEN_SHIFT, np.int64)
        magnitudes = rans._count_each(codes, np.zeros(n, np.uint8), expected, 0, n)
        histogram = np.zeros_like(expected)
        status = rans._count_tokens_in_one_context(codes, histogram)
        np.testing.assert_array_equal(histogram, expected)
        assert status == (rans.OK if magnitudes <= rans.MAX_MAGNITUDE else rans.ERR_MAGNITUDE_RANGE)


@pytest.mark.parametrize("n_contexts", [1, 3])
def test_the_mostly_zeros_loop_gives_the_general_loops_codes_and_status_on_damaged_streams(n_contexts):
    """The mostly-zeros loop reads token 0 from a slot below its frequency without the
    tables (and with one context, without the contexts): on a valid stream and on damaged
    ones it returns what the general loop returns, codes and status alike."""
    rng = np.random.default_rng(n_contexts)
    n = 100_003
    contexts = rng.integers(0, n_contexts, n).astype(np.uint8)
    codes = np.where(rng.random(n) < 0.01, rng.integers(-5000, 5000, n), 0).astype(np.int32)
    data = round_trip(codes, contexts, n_contexts)
    status, bit_words, n_bit_words, rans_words = rans._stream_words(np.frombuffer(data, np.uint8))
    status, context_info, slot_tokens, symbol_info, bit_pos, sparse, certain = rans._decode_model(
        bit_words, n_bit_words, contexts, n_contexts)
    assert status == rans.OK and sparse and certain.size == 0

    def outcome(words, sparse):
        decoded = np.zeros(n, np.int32)
        result = rans._decode_elements(words, contexts, context_info, slot_tokens, symbol_info, 4, bit_words, n_bit_words,
                                       bit_pos, sparse, certain, decoded)
        return result, decoded

    for trial in range(30):
        damaged = rans_words.copy()
        if trial:
            at = rng.integers(0, damaged.size, 2)
            damaged[at] ^= rng.integers(1, 2**32, 2, dtype=np.uint64).astype(np.uint32)
        (result, decoded), (result_1, decoded_1) = outcome(damaged, True), outcome(damaged, False)
        assert result == result_1
        np.testing.assert_array_equal(decoded, decoded_1)
        if not trial:
            np.testing.assert_array_equal(decoded, codes)


@njit(cache=False)
def _exp_golomb_bit_by_bit(words, n_words, pos, acc, n_acc, k):
    """The reader _get_exp_golomb replaced, kept as the reference: the unary zeros read one
    bit at a time."""
    unary = 0
    while True:
        if unary + k > rans.MAX_WEIGHT_BITS:
            return 0, pos, acc, n_acc, rans.ERR_TABLE
        bit, pos, acc, n_acc, ok = rans._get_bits(words, n_words, pos, acc, n_acc, 1)
        if not ok:
            return 0, pos, acc, n_acc, rans.ERR_BITS_EXHAUSTED
        if bit:
            break
        unary += 1
    low, pos, acc, n_acc, ok = rans._get_bits(words, n_words, pos, acc, n_acc, unary + k)
    value = (np.int64(1) << (unary + k)) + low - (np.int64(1) << k)
    return value, pos, acc, n_acc, rans.OK if ok else rans.ERR_BITS_EXHAUSTED


@njit(cache=False)
def _read_weights(reader_is_new, words, n_words, n_acc_start, k, out_values, out_status):
    """Read Exp-Golomb values from the start until a status other than OK; returns how many."""
    pos, acc, n_acc = 0, np.int64(0), 0
    if n_acc_start:  # start with bits held, as a table read after other fields does
        _, pos, acc, n_acc, _ = rans._get_bits(words, n_words, pos, acc, n_acc, n_acc_start)
    count = 0
    while count < out_values.size:
        if reader_is_new:
            value, pos, acc, n_acc, status = rans._get_exp_golomb(words, n_words, pos, acc, n_acc, k)
        else:
            value, pos, acc, n_acc, status = _exp_golomb_bit_by_bit(words, n_words, pos, acc, n_acc, k)
        out_values[count], out_status[count] = value, status
        count += 1
        if status != rans.OK:
            break
    return count, pos, acc, n_acc


@pytest.mark.parametrize("seed", range(6))
def test_exp_golomb_reader_counts_zeros_by_the_word_as_the_bit_by_bit_reader(seed):
    """The table reader counts a weight's unary zeros a word at a time: the same values, bit
    positions and statuses (ERR_TABLE for a run of zeros too long for any weight,
    ERR_BITS_EXHAUSTED at the end of the words) as reading them bit by bit, on written
    tables, sparse random words (long zero runs) and truncated ones."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(16):
        written = np.zeros(64, np.uint32)
        pos, acc, n_acc = 0, np.int64(0), 0
        for value in rng.integers(0, 1 << max(0, rans.MAX_WEIGHT_BITS - k - 1), 40):
            pos, acc, n_acc = rans._put_exp_golomb(written, pos, acc, n_acc, np.int64(value), k)
        written[pos] = acc
        cases.append((written[: pos + 1], k))
        sparse = rng.integers(0, 1 << 32, 24, dtype=np.uint64) & rng.integers(0, 1 << 32, 24, dtype=np.uint64)
        sparse &= rng.integers(0, 1 << 32, 24, dtype=np.uint64)
        sparse[rng.integers(0, 24, 6)] = 0  # whole zero words: runs over the limit
        cases.append((sparse.astype(np.uint32), k))
        cases.append((written[: rng.integers(0, pos + 1)], k))  # truncated
    for words, k in cases:
        for n_acc_start in (0, 5, 31):
            results = []
            for reader_is_new in (True, False):
                values, statuses = np.zeros(64, np.int64), np.zeros(64, np.int64)
                count, pos, acc, n_acc = _read_weights(reader_is_new, words, words.size, n_acc_start, k, values, statuses)
                ok = statuses[count - 1] == rans.OK if count else True
                # (after an error, the reader's position is of no use: only the status counts)
                results.append((count, list(values[:count - (not ok)]), list(statuses[:count]),
                                (pos, acc, n_acc) if ok else None))
            assert results[0] == results[1], (k, n_acc_start)
