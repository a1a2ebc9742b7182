"""Context-conditional static (two-pass) rANS coder for signed integer codes.

Tokens.  Each code q is split into a *token*, modelled per context, and raw *extra bits*:

    token 0             q == 0
    token 2*c - 1       q > 0 with magnitude class c
    token 2*c           q < 0 with magnitude class c

|q| in 1..15 is its own class (c = |q|, no extra bits).  A larger |q| with
e = floor(log2 |q|) (4..23) gets class c = 16 + 2*(e - 4) + h, where h is the bit just below
the leading one; the e - 1 bits below h are written raw.  Keeping h in the token halves each
raw bucket, which recovers most of what raw bits lose on a decaying (Laplacian) tail.  That
makes 56 classes and N_TOKENS = 111 tokens for |q| < 2**24.  The sign is part of the token,
so when the caller orients q by a predicted sign, that sign is modelled per context.

Model.  Per context with N elements, the sent weights are normalized to a total of 2**p
with p = min(13, bit_length(N) + 2): decode tables that stay in cache for big contexts,
and small ones (cheap to build) for small contexts.  The encoder chooses per context what it sends: the
raw counts (N <= 2**15; frequencies summing to 2**15 above that), or the counts normalized
to a coarser total 2**precision, whichever makes table plus payload smallest.  Normalization is integer-only (round, then
move the rounding error one unit at a time to where it costs the fewest bits), so encoder
and decoder derive identical tables on any machine.

Coder.  rANS with a 64-bit state in [2**31, 2**63) (a signed int64 never overflows) and
32-bit renormalization, so each symbol moves at most one word.  Streams of 16384 or more
elements interleave 4 states (element i uses state i % 4) so the CPU overlaps their
dependency chains, streams of 2048 to 16383 interleave 2, and shorter ones use 1: each more
state costs its 8-byte final state (with 2 from 4096 the small models decompressed
1.05-1.14x faster, for 0.03-0.11% more bytes; from 2048, the small CNNs 1.02-1.04x
faster again, for 0.02-0.07% more).

Byte layout of one stream (words are little-endian uint32, bits are packed LSB-first):

    varint n_bit_words          LEB128: length of the bit section in words
    bit section (n_bit_words words)
        one table per context that occurs in `contexts`, in increasing context order:
            4 bits   precision  0: the weights sum to W (below); else to 2**precision <= 2**p
            7 bits   span       only tokens 0 .. span-1 can occur (1..111)
            7 bits   implied    the token whose weight is not sent (< span)
            4 bits   k          Exp-Golomb order of the weights
            for t in 0 .. span-1 except implied:
                     weight[t]  Exp-Golomb-k: v = weight + 2**k as u zero bits, a one
                                bit, then the u + k bits of v below its leading one
            weight[implied] = W - sum(the others), must be >= 1
          where W = min(N, 2**15).  At precision 0 a context with N > 2**15 sends its
          normalized frequencies (sum 2**15 = its total) and a smaller one its raw counts;
          both sides normalize the weights to 2**p.  N comes from `contexts`: it is not stored.
        the extra bits, in element order: the e - 1 low bits of each |q| >= 16
        zero bits up to the end of the last word
    rANS section (the rest, a multiple of 4 bytes)
        the words the encoder emitted while renormalizing (it walks the elements from
        last to first), then each final state as (low word, high word), state 0 first.
        The decoder reads it backwards from the end.

Segmented layout, for SEGMENTED_FROM (2**19) codes or more: the elements are cut into
segments of SEGMENT_ELEMENTS (2**18; the last may be shorter), coded under one set of tables:

    varint n_table_words        LEB128
    table section (n_table_words words): the tables as above, zero-padded to a word
    per segment: varint n_extra_words, varint n_rans_words
    per segment: its extra bits (n_extra_words words, zero-padded)
    per segment: its rANS words (n_rans_words words), as above: 4 states from 16384
                 elements on, 2 from 2048, else 1

Segments decode independently once the tables are read, on as many threads as the caller
gives; the bytes do not depend on the thread count.

An empty array encodes to b"".  The decoder never indexes outside its arrays and checks that
the tables are consistent, that every state starts in range and ends at its initial value
2**31, and that both sections are consumed exactly with zero padding; any mismatch raises
CorruptStreamError.  Kernels never use fastmath: encoder and decoder must agree bit-exactly.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..errors import CorruptStreamError
from ..parallel import each, spans

# ---- token alphabet ------------------------------------------------------------------

DIRECT_LIMIT = 16  # magnitudes below this are tokens of their own
MAX_MAGNITUDE = (1 << 24) - 1
MAX_EXTRA_BITS = 22
N_CLASSES = DIRECT_LIMIT + 2 * (23 - 4 + 1)  # zero, 1..15, two halves of octaves 4..23
N_TOKENS = 2 * N_CLASSES - 1  # 111: zero plus a signed token per nonzero class
TOKEN_SHIFT = 7  # per-context token rows are padded to 128: index (context << 7) | token


def _token_tables():
    """Per token: base magnitude, number of raw extra bits, 1 if negative."""
    base = np.zeros(N_TOKENS, np.int64)
    extra_bits = np.zeros(N_TOKENS, np.int64)
    negative = np.zeros(N_TOKENS, np.int64)
    for cls in range(1, N_CLASSES):
        if cls < DIRECT_LIMIT:
            cls_base, cls_bits = cls, 0
        else:
            octave, half = 4 + (cls - DIRECT_LIMIT) // 2, (cls - DIRECT_LIMIT) % 2
            cls_base, cls_bits = (2 | half) << (octave - 1), octave - 1
        for token, is_negative in ((2 * cls - 1, 0), (2 * cls, 1)):
            base[token], extra_bits[token], negative[token] = cls_base, cls_bits, is_negative
    return base, extra_bits, negative


TOKEN_BASE, TOKEN_EXTRA_BITS, TOKEN_NEGATIVE = _token_tables()
TOKEN_ROW_MASK = (1 << TOKEN_SHIFT) - 1
# what the decoder needs of a token in one load: base | negative << 32 | extra bits << 48
TOKEN_DECODE = TOKEN_BASE | (TOKEN_NEGATIVE << 32) | (TOKEN_EXTRA_BITS << 48)


def _token_of_top():
    """Token of each magnitude < 32 and sign, indexed (magnitude << 1) | negative.  A larger
    magnitude shifted right by octave - 4 lands in 16..31 with the same h, and its token is
    4 * (octave - 4) more (2 classes per octave, 2 tokens per class)."""
    token_of_top = np.zeros(4 * DIRECT_LIMIT, np.int64)
    for top in range(1, 2 * DIRECT_LIMIT):
        cls = top if top < DIRECT_LIMIT else DIRECT_LIMIT + ((top >> 3) & 1)
        token_of_top[top << 1], token_of_top[(top << 1) | 1] = 2 * cls - 1, 2 * cls
    return token_of_top


TOKEN_OF_TOP = _token_of_top()


def _formula_token(q: int) -> tuple[int, int]:
    """(token, number of extra bits) of code q by _token's arithmetic, in Python."""
    magnitude = abs(q)
    shift = (magnitude | DIRECT_LIMIT).bit_length() - 5
    top = magnitude >> shift
    return (int(TOKEN_OF_TOP[(top << 1) | (q < 0)]) + 4 * shift) & TOKEN_ROW_MASK, shift + 3 * (top >> 4)


# _token of every code in [-TABLED_CODES, TABLED_CODES) from one load, token | extra bits << 8:
# the arithmetic took the tokenizer 2.8 ns a code, the table 2.0 (and every size estimate
# counts tokens too); a test checks it against the arithmetic, which serves larger codes.
TABLED_CODES = 512
TOKEN_AND_BITS = np.array([token | (n_bits << 8) for token, n_bits in map(_formula_token, range(-TABLED_CODES, TABLED_CODES))],
                          np.int32)

# ---- model and rANS parameters -------------------------------------------------------

PROB_BITS = 15  # largest per-context total of the sent weights is 2**15
# Coding precision: at most 2**13 per context, so 64 contexts' decode tables (8 KiB each) stay
# in L2 (2**15 made a 64-context decode up to 1.9x slower in a synthetic 1M-element test,
# for under 0.1% of the size of the corpus FC layers).
CODING_PROB_BITS = 13
PROB_TOTAL = 1 << PROB_BITS
MAX_WEIGHT_BITS = PROB_BITS + 1  # a sent weight is <= 2**15
TOKEN_FIELD_BITS = 7  # span and implied are <= 111
K_FIELD_BITS = 4
PRECISION_FIELD_BITS = 4  # per table: 0 = default weights, else weights summing to 2**precision
RANS_LOW = 1 << 31  # the state lives in [RANS_LOW, 2**63)
WORD_MASK = 0xFFFFFFFF
MAX_LANES = 4
FEW_ELEMENTS = 1 << 11  # below this, one rANS state (each more costs an 8-byte final state)
SOME_ELEMENTS = 1 << 14  # below this, two; from it on, MAX_LANES
# Streams of SEGMENTED_FROM codes or more are cut into segments of SEGMENT_ELEMENTS (the last
# may be shorter), each with its own extra bits and rANS states under the shared tables, so
# threads can code them at once. Each segment costs about 40 bytes (directory entry, final
# states, padding): under 0.1% of the corpus FC layer's stream at rel 1e-2.
SEGMENTED_FROM = 1 << 19
SEGMENT_ELEMENTS = 1 << 18
# A stream whose tables expect at least this share of zero codes decodes its groups of four
# zeros without their extra-bit look-ups: 1.2x faster at 99% zeros (a residual that a
# low-rank part leaves), equal at 95%, slower below (the branch mispredicts).
SPARSE_ZERO_SHARE = 0.97
# A context whose table gives one token every slot, with no extra bits (the zero rows of a
# layer with dead units, the untouched rows of an embedding), leaves the rANS state as it is:
# x' = 2**bits (x >> bits) + (x mod 2**bits) = x, and no word or bit is read. Where at least
# this share of a stream's elements are in such contexts, the decoder writes whole groups of
# four of them without the state machine: a speed choice only, the same codes.
CERTAIN_SKIP_SHARE = 0.25
NOT_CERTAIN = np.int64(1) << 40  # (codes are below 2**24 in magnitude)


# ---- status codes returned by kernels ------------------------------------------------

OK = 0
ERR_MAGNITUDE_RANGE = 1
ERR_BITS_EXHAUSTED = 2
ERR_TABLE = 3
ERR_RANS_EXHAUSTED = 4
ERR_RANS_STATE = 5
ERR_TRAILING = 6
ERR_WORD_COUNT = 7
ERR_SECTIONS = 8
_MESSAGES = {
    ERR_BITS_EXHAUSTED: "bit section truncated",
    ERR_TABLE: "invalid frequency table",
    ERR_RANS_EXHAUSTED: "rANS section truncated",
    ERR_RANS_STATE: "rANS state out of range or not back at its initial value",
    ERR_TRAILING: "unused data at the end of a section",
    ERR_WORD_COUNT: "bad word count (truncated, oversized or non-canonical varint)",
    ERR_SECTIONS: "section lengths do not match the data size",
}


# ---- small helpers -------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _lane_count(n):
    return 1 if n < FEW_ELEMENTS else 2 if n < SOME_ELEMENTS else MAX_LANES


@intrinsic
def _count_leading_zeros(typingctx, value):
    """llvm.ctlz on an int64 (64 for zero)."""
    if value != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.int64(types.int64), codegen


@intrinsic
def _count_trailing_zeros(typingctx, value):
    """llvm.cttz on an int64 (64 for zero)."""
    if value != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.int64(types.int64), codegen


# The bit helpers below serve the (per-context) table code; inline="always" spares each
# call numba's refcounting of the words array.


@njit(cache=True, nogil=True, inline="always")
def _bit_length(value):
    return 64 - _count_leading_zeros(np.int64(value))


@njit(cache=True, nogil=True, inline="always")
def _put_bits(words, pos, acc, n_acc, value, n_bits):
    """Append n_bits (<= 31) of value; full words go to words[pos]."""
    acc |= value << n_acc
    n_acc += n_bits
    if n_acc >= 32:
        words[pos] = acc & WORD_MASK
        pos += 1
        acc >>= 32
        n_acc -= 32
    return pos, acc, n_acc


@njit(cache=True, nogil=True, inline="always")
def _get_bits(words, n_words, pos, acc, n_acc, n_bits):
    """Read n_bits (<= 31); returns (value, pos, acc, n_acc, ok). Reads only words[:n_words]."""
    if n_acc < n_bits:
        if pos < n_words:
            acc |= np.int64(words[pos]) << n_acc
            pos += 1
            n_acc += 32
        if n_acc < n_bits:
            return 0, pos, acc, n_acc, False
    value = acc & ((np.int64(1) << n_bits) - 1)
    return value, pos, acc >> n_bits, n_acc - n_bits, True


@njit(cache=True, nogil=True, inline="always")
def _put_exp_golomb(words, pos, acc, n_acc, value, k):
    shifted = value + (np.int64(1) << k)
    n_low = _bit_length(shifted) - 1  # bits below the leading one
    unary = n_low - k
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, np.int64(1) << unary, unary + 1)
    return _put_bits(words, pos, acc, n_acc, shifted - (np.int64(1) << n_low), n_low)


@njit(cache=True, nogil=True)
def _get_exp_golomb(words, n_words, pos, acc, n_acc, k):
    """Returns (value, pos, acc, n_acc, status). The unary zeros are counted a word's worth
    at a time (acc holds n_acc bits, zeros above them), not bit by bit: reading a table took
    about 2 us, a third of a small tensor's model. The statuses are the bit-by-bit reader's."""
    unary = 0
    while acc == 0:  # every bit held is a zero
        unary += n_acc
        if unary + k > MAX_WEIGHT_BITS:  # no valid weight is this long; keeps reads < 32 bits
            return 0, pos, acc, n_acc, ERR_TABLE
        if pos >= n_words:
            return 0, pos, acc, n_acc, ERR_BITS_EXHAUSTED
        acc, n_acc = np.int64(words[pos]), 32
        pos += 1
    zeros = _count_trailing_zeros(acc)
    unary += zeros
    if unary + k > MAX_WEIGHT_BITS:
        return 0, pos, acc, n_acc, ERR_TABLE
    acc, n_acc = acc >> (zeros + 1), n_acc - zeros - 1
    low, pos, acc, n_acc, ok = _get_bits(words, n_words, pos, acc, n_acc, unary + k)
    value = (np.int64(1) << (unary + k)) + low - (np.int64(1) << k)
    return value, pos, acc, n_acc, OK if ok else ERR_BITS_EXHAUSTED


@njit(cache=True, nogil=True, inline="always")
def _exp_golomb_cost(value, k):
    return 2 * (_bit_length(value + (np.int64(1) << k)) - 1) - k + 1


# ---- tokens and extra bits -----------------------------------------------------------
# The per-element loops avoid data-dependent branches (zero-bit reads and writes are
# no-ops): on fine-bound data whether an element is small or has extra bits is random.
# They index with unsigned integers: numba adds a negative-index fix-up to signed ones.


@njit(cache=True, nogil=True, inline="always")
def _token(q):
    """(token, magnitude, number of extra bits) of code q.  A magnitude over MAX_MAGNITUDE
    (the caller reports it) still gets a token inside its 128-entry row."""
    magnitude = -q if q < 0 else q
    if -TABLED_CODES <= q < TABLED_CODES:
        packed = np.int64(TOKEN_AND_BITS[np.uint64(q + TABLED_CODES)])
        return packed & 0xFF, magnitude, packed >> 8
    shift = _bit_length(magnitude | DIRECT_LIMIT) - 5  # octave - 4 from 32 on, else 0
    top = magnitude >> shift  # < 32: the magnitude itself, or its leading one, h and 3 bits
    token = (TOKEN_OF_TOP[(top << 1) | (q < 0)] + 4 * shift) & TOKEN_ROW_MASK
    return token, magnitude, shift + 3 * (top >> 4)


@njit(cache=True, nogil=True)
def _count_tokens(codes, contexts, histogram):
    """histogram[context << TOKEN_SHIFT | token] += 1 for every element.  Contexts must index
    histogram rows (the caller checks).  Returns a status."""
    context_words = _grouped_contexts(codes, contexts)
    magnitude_bits = 0  # OR of all magnitudes: > MAX_MAGNITUDE iff one of them is
    for k in range(context_words.size):
        context = _zeros_in_one_context(codes, context_words, k)
        if context >= 0:  # token 0, eight times
            histogram[np.uint64(context << TOKEN_SHIFT)] += 8
        else:
            magnitude_bits |= _count_each(codes, contexts, histogram, 8 * k, 8 * k + 8)
    # the tail after the last whole group, or every element where they are not grouped
    magnitude_bits |= _count_each(codes, contexts, histogram, 8 * context_words.size, codes.size)
    return ERR_MAGNITUDE_RANGE if magnitude_bits > MAX_MAGNITUDE else OK


@njit(cache=True, nogil=True)
def _count_each(codes, contexts, histogram, start, stop):
    """_count_tokens of elements start .. stop - 1 one by one; returns the OR of their magnitudes.
    (A function of its own: written out in the loop of groups, it ran 10-15% slower.)"""
    magnitude_bits = 0
    for i in range(start, stop):
        token, magnitude, _ = _token(np.int64(codes[np.uint64(i)]))
        magnitude_bits |= magnitude
        histogram[np.uint64((np.int64(contexts[np.uint64(i)]) << TOKEN_SHIFT) | token)] += 1
    return magnitude_bits


# Codes are counted in groups of eight where at least this share of up to _ZERO_RUN_SAMPLES
# evenly spaced groups are zeros in one context: 1M codes of a low-rank residual at 99% zeros
# 2.5 -> 0.4 ms; spread codes, which would pay 10-25% for the groups' test, stay one by one.
ZERO_RUN_SHARE = 0.5
ZERO_RUNS_FROM = 1 << 15  # (smaller streams are one by one: the sampling's microsecond would show)
_ZERO_RUN_SAMPLES = 64
_NO_CONTEXT_WORDS = np.zeros(0, np.uint64)


@njit(cache=True, nogil=True)
def _grouped_contexts(codes, contexts):
    """The contexts as uint64 words of eight (the whole groups) where counting by groups pays
    (ZERO_RUN_SHARE), else none: the caller then takes the elements one by one."""
    if codes.size < ZERO_RUNS_FROM:
        return _NO_CONTEXT_WORDS
    words = contexts[: codes.size - codes.size % 8].view(np.uint64)
    samples = min(words.size, _ZERO_RUN_SAMPLES)
    runs = 0
    for s in range(samples):
        runs += _zeros_in_one_context(codes, words, s * words.size // samples) >= 0
    return words if runs >= ZERO_RUN_SHARE * samples else _NO_CONTEXT_WORDS


@njit(cache=True, nogil=True, inline="always")
def _zeros_in_one_context(codes, context_words, k):
    """The context of elements 8k .. 8k + 7 where they are all zero codes in one context (the
    runs of a sparse residual or of zero rows: counted and tokenized 8 at a time, one
    increment instead of 8 that each wait for the last), else -1.  context_words: the
    contexts as uint64 words."""
    word = context_words[np.uint64(k)]
    first = word & np.uint64(0xFF)
    if word != first * np.uint64(0x0101010101010101):
        return np.int64(-1)
    return np.int64(first) if _zero_group(codes, k) else np.int64(-1)


@njit(cache=True, nogil=True, inline="always")
def _zero_group(codes, k):
    """Whether elements 8k .. 8k + 7 are all zero codes."""
    i = np.uint64(8 * k)
    return (codes[i] | codes[i + np.uint64(1)] | codes[i + np.uint64(2)] | codes[i + np.uint64(3)] | codes[i + np.uint64(4)]
            | codes[i + np.uint64(5)] | codes[i + np.uint64(6)] | codes[i + np.uint64(7)]) == 0


@njit(cache=True, nogil=True)
def _mostly_zero_groups(codes):
    """_grouped_contexts' test for codes in one context: whether at least ZERO_RUN_SHARE of up
    to _ZERO_RUN_SAMPLES evenly spaced groups of eight are all zeros."""
    groups = codes.size // 8
    if codes.size < ZERO_RUNS_FROM:
        return False
    samples = min(groups, _ZERO_RUN_SAMPLES)
    runs = 0
    for s in range(samples):
        runs += _zero_group(codes, s * groups // samples)
    return runs >= ZERO_RUN_SHARE * samples


# From this many codes, one context's tokens are counted into four partial histograms: a run
# of zeros (the residual a low-rank part leaves is 97-99.9% zeros) otherwise increments one
# counter, each increment waiting for the last (1M codes at 98% zeros: 2.3 -> 0.86 ms; spread
# codes run at the same speed, a small tensor's 2% slower for zeroing the partials).
PARTIAL_COUNTS_FROM = 1 << 12


@njit(cache=True, nogil=True)
def _count_tokens_in_one_context(codes, histogram):
    """_count_tokens with every element in context 0, without a contexts array (a small
    tensor's estimate cost as much again in making and checking one)."""
    magnitude_bits = 0
    start = 0
    if _mostly_zero_groups(codes):  # (see _grouped_contexts)
        start = codes.size - codes.size % 8
        zeros = 0
        for k in range(start // 8):
            if _zero_group(codes, k):
                zeros += 8
            else:
                magnitude_bits |= _count_each_in_one_context(codes, histogram, 8 * k, 8 * k + 8)
        histogram[0] += zeros
    elif codes.size >= PARTIAL_COUNTS_FROM:
        partial = np.zeros((4, 1 << TOKEN_SHIFT), np.int64)
        start = codes.size - codes.size % 4
        for i in range(0, start, 4):
            t0, m0, _ = _token(np.int64(codes[np.uint64(i)]))
            t1, m1, _ = _token(np.int64(codes[np.uint64(i + 1)]))
            t2, m2, _ = _token(np.int64(codes[np.uint64(i + 2)]))
            t3, m3, _ = _token(np.int64(codes[np.uint64(i + 3)]))
            magnitude_bits |= m0 | m1 | m2 | m3
            partial[0, np.uint64(t0)] += 1
            partial[1, np.uint64(t1)] += 1
            partial[2, np.uint64(t2)] += 1
            partial[3, np.uint64(t3)] += 1
        for t in range(1 << TOKEN_SHIFT):
            histogram[t] += partial[0, t] + partial[1, t] + partial[2, t] + partial[3, t]
    magnitude_bits |= _count_each_in_one_context(codes, histogram, start, codes.size)
    return ERR_MAGNITUDE_RANGE if magnitude_bits > MAX_MAGNITUDE else OK


@njit(cache=True, nogil=True, inline="always")
def _count_each_in_one_context(codes, histogram, start, stop):
    """_count_each with every element in context 0."""
    magnitude_bits = 0
    for i in range(start, stop):
        token, magnitude, _ = _token(np.int64(codes[np.uint64(i)]))
        magnitude_bits |= magnitude
        histogram[np.uint64(token)] += 1
    return magnitude_bits


@njit(cache=True, nogil=True)
def _tokenize(codes, contexts, symbols, histogram, extra_words):
    """_count_tokens that also stores symbols[i] = contexts[i] << TOKEN_SHIFT | token (what the
    rANS encoder indexes its tables with) and packs the extra bits into extra_words from bit 0,
    in one pass over the codes.  extra_words needs a spare slot past the last full word.
    Returns (status, number of full words, acc, n_acc)."""
    context_words = _grouped_contexts(codes, contexts)
    magnitude_bits = 0
    pos, acc, n_acc = 0, np.int64(0), 0
    for k in range(context_words.size):
        context = _zeros_in_one_context(codes, context_words, k)
        if context >= 0:  # token 0 (no extra bits), eight times
            symbol = context << TOKEN_SHIFT
            for i in range(8 * k, 8 * k + 8):
                symbols[np.uint64(i)] = symbol
            histogram[np.uint64(symbol)] += 8
        else:
            magnitude_bits, pos, acc, n_acc = _tokenize_each(codes, contexts, symbols, histogram, extra_words, 8 * k,
                                                             8 * k + 8, magnitude_bits, pos, acc, n_acc)
    # the tail after the last whole group, or every element where they are not grouped
    magnitude_bits, pos, acc, n_acc = _tokenize_each(codes, contexts, symbols, histogram, extra_words,
                                                     8 * context_words.size, codes.size, magnitude_bits, pos, acc, n_acc)
    return ERR_MAGNITUDE_RANGE if magnitude_bits > MAX_MAGNITUDE else OK, pos, acc, n_acc


@njit(cache=True, nogil=True)
def _tokenize_each(codes, contexts, symbols, histogram, extra_words, start, stop, magnitude_bits, pos, acc, n_acc):
    """_tokenize of elements start .. stop - 1 one by one, from and to the state
    (magnitude_bits, pos, acc, n_acc). (A function of its own, like _count_each.)"""
    for i in range(start, stop):
        token, magnitude, n_bits = _token(np.int64(codes[np.uint64(i)]))
        magnitude_bits |= magnitude
        symbol = (np.int64(contexts[np.uint64(i)]) << TOKEN_SHIFT) | token
        symbols[np.uint64(i)] = symbol
        histogram[np.uint64(symbol)] += 1
        acc |= (magnitude & ((np.int64(1) << n_bits) - 1)) << n_acc
        n_acc += n_bits
        extra_words[np.uint64(pos)] = acc & WORD_MASK  # rewritten until the word is full
        full = n_acc >> 5
        pos += full
        acc >>= full << 5
        n_acc &= 31
    return magnitude_bits, pos, acc, n_acc


@njit(cache=True, nogil=True)
def _append_words(words, pos, acc, n_acc, source, n_source):
    """Append source[:n_source] (32 bits each) behind the n_acc pending bits in acc."""
    for j in range(n_source):
        acc |= np.int64(source[np.uint64(j)]) << n_acc
        words[np.uint64(pos)] = acc & WORD_MASK
        pos += 1
        acc >>= 32
    return pos, acc, n_acc


@njit(cache=True, nogil=True, inline="always")
def _code(token, words, bit_pos):
    """(code, number of extra bits read) from token and the extra bits at bit_pos, read
    from words[bit_pos // 32] and the word after it (the caller keeps both in range)."""
    info = TOKEN_DECODE[token]
    n_bits = info >> 48
    word = np.uint64(bit_pos >> 5)
    pair = (np.int64(words[word + np.uint64(1)]) << 32) | np.int64(words[word])
    low = (pair >> (bit_pos & 31)) & ((np.int64(1) << n_bits) - 1)
    negative = -((info >> 32) & 1)  # all ones or zero
    magnitude = (info & WORD_MASK) + low
    return (magnitude ^ negative) - negative, n_bits


# ---- model: normalized frequencies ---------------------------------------------------


@njit(cache=True, nogil=True)
def _context_prob_bits(count):
    """log2 of the frequency total for a context with count elements."""
    return min(CODING_PROB_BITS, _bit_length(count) + 2)


@njit(cache=True, nogil=True)
def _normalize(weights, total, prob_bits, freqs):
    """Scale weights (sum = total, 1 <= total <= 2**prob_bits) to freqs summing to
    2**prob_bits, every nonzero weight keeping freq >= 1.  Integer-only: identical on every
    machine.  A unit of freq moved to or from token t changes the code length by about
    w_t / f_t bits, so the rounding error goes greedily where that is cheapest."""
    target = np.int64(1) << prob_bits
    present = np.empty(N_TOKENS, np.int64)
    n_present = 0
    assigned = 0
    for t in range(N_TOKENS):
        freqs[t] = 0
        if weights[t] > 0:
            freqs[t] = max(1, (weights[t] * target + total // 2) // total)
            assigned += freqs[t]
            present[n_present] = t
            n_present += 1
    while assigned < target:  # add to the token with the largest w / (f + 1/2)
        best = present[0]
        for j in range(1, n_present):
            t = present[j]
            if weights[t] * (2 * freqs[best] + 1) > weights[best] * (2 * freqs[t] + 1):
                best = t
        freqs[best] += 1
        assigned += 1
    while assigned > target:  # take from the token with the smallest w / (f - 1/2), f > 1
        best = -1
        for j in range(n_present):
            t = present[j]
            if freqs[t] > 1 and (
                best < 0 or weights[t] * (2 * freqs[best] - 1) < weights[best] * (2 * freqs[t] - 1)
            ):
                best = t
        freqs[best] -= 1
        assigned -= 1


@njit(cache=True, nogil=True)
def _cumulative(freqs, starts):
    running = 0
    for t in range(freqs.size):
        starts[t] = running
        running += freqs[t]


# ---- table serialization -------------------------------------------------------------


@njit(cache=True, nogil=True)
def _table_layout(weights):
    """(span, implied, k, bits) of one context's table: the largest weight is implied (the
    most expensive to send), and k is the cheapest Exp-Golomb order for the others."""
    span = 0
    implied = 0
    for t in range(N_TOKENS):
        if weights[t] > 0:
            span = t + 1
            if weights[t] > weights[implied]:
                implied = t
    best_k, best_cost = 0, np.int64(1) << 62
    for k in range(1 << K_FIELD_BITS):
        cost = -_exp_golomb_cost(weights[implied], k)
        for t in range(span):  # no branch for the implied token: the loop vectorizes
            cost += _exp_golomb_cost(weights[t], k)
        if cost < best_cost:
            best_k, best_cost = k, cost
    return span, implied, best_k, 2 * TOKEN_FIELD_BITS + K_FIELD_BITS + best_cost


@njit(cache=True, nogil=True)
def _write_table(words, pos, acc, n_acc, weights):
    """Write one context's weights (layout in the module docstring)."""
    span, implied, best_k, _ = _table_layout(weights)
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, span, TOKEN_FIELD_BITS)
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, implied, TOKEN_FIELD_BITS)
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, best_k, K_FIELD_BITS)
    for t in range(span):
        if t != implied:
            pos, acc, n_acc = _put_exp_golomb(words, pos, acc, n_acc, weights[t], best_k)
    return pos, acc, n_acc


@njit(cache=True, nogil=True)
def _read_table(words, n_words, pos, acc, n_acc, total, weights):
    """Inverse of _write_table for a context whose weights sum to total.
    Returns (pos, acc, n_acc, status)."""
    span, pos, acc, n_acc, ok1 = _get_bits(words, n_words, pos, acc, n_acc, TOKEN_FIELD_BITS)
    implied, pos, acc, n_acc, ok2 = _get_bits(words, n_words, pos, acc, n_acc, TOKEN_FIELD_BITS)
    k, pos, acc, n_acc, ok3 = _get_bits(words, n_words, pos, acc, n_acc, K_FIELD_BITS)
    if not (ok1 and ok2 and ok3):
        return pos, acc, n_acc, ERR_BITS_EXHAUSTED
    if span < 1 or span > N_TOKENS or implied >= span:
        return pos, acc, n_acc, ERR_TABLE
    weights[:] = 0
    remaining = total
    for t in range(span):
        if t == implied:
            continue
        weight, pos, acc, n_acc, status = _get_exp_golomb(words, n_words, pos, acc, n_acc, k)
        if status != OK:
            return pos, acc, n_acc, status
        if weight >= remaining:  # the implied token must keep a weight >= 1
            return pos, acc, n_acc, ERR_TABLE
        weights[t] = weight
        remaining -= weight
    weights[implied] = remaining
    return pos, acc, n_acc, OK


@njit(cache=True, nogil=True)
def _payload_bits(histogram_row, freqs, prob_bits):
    bits = 0.0
    for t in range(N_TOKENS):
        if histogram_row[t] > 0:
            bits += histogram_row[t] * (prob_bits - np.log2(freqs[t]))
    return bits


@njit(cache=True, nogil=True)
def _choose_precision(histogram_row, count, prob_bits, sent, freqs):
    """Pick what one context sends: its default weights (precision 0: raw counts, or for a
    context over 2**15 elements frequencies summing to 2**15) or frequencies summing to
    2**precision, whichever makes table plus payload smallest (a coarse table is cheap to send
    and costs a little on every element).  Fills sent and freqs (normalized to 2**prob_bits);
    returns the precision.  The choice is the encoder's: the decoder reads it."""
    total = min(count, PROB_TOTAL)
    if count > PROB_TOTAL:
        _normalize(histogram_row, count, np.int64(PROB_BITS), sent)  # (int64, as the other calls)
    else:
        for t in range(N_TOKENS):  # (element loops, not slice copies: see checksum._absorb)
            sent[t] = histogram_row[t]
    _normalize(sent, total, prob_bits, freqs)
    best = _table_layout(sent)[3] + _payload_bits(histogram_row, freqs, prob_bits)
    best_precision = 0
    present = 0
    for t in range(N_TOKENS):
        if histogram_row[t] > 0:
            present += 1
    trial = np.zeros(N_TOKENS, np.int64)
    trial_freqs = np.zeros(N_TOKENS, np.int64)
    for precision in range(max(_bit_length(present), 1), min(prob_bits, _bit_length(total) - 1) + 1):
        _normalize(histogram_row, count, precision, trial)
        _normalize(trial, np.int64(1) << precision, prob_bits, trial_freqs)
        cost = _table_layout(trial)[3] + _payload_bits(histogram_row, trial_freqs, prob_bits)
        if cost < best:
            best, best_precision = cost, precision
            for t in range(N_TOKENS):
                sent[t] = trial[t]
                freqs[t] = trial_freqs[t]
    return best_precision


@njit(cache=True, nogil=True)
def _build_model(histogram):
    """Per-context prob_bits, precision, sent weights, freqs and starts (rows of
    2**TOKEN_SHIFT) from token counts."""
    n_contexts = histogram.shape[0]
    prob_bits = np.zeros(n_contexts, np.int64)
    precision = np.zeros(n_contexts, np.int64)
    sent = np.zeros_like(histogram)
    freqs = np.zeros_like(histogram)
    starts = np.zeros_like(histogram)
    for c in range(n_contexts):
        count = histogram[c].sum()
        if count > 0:
            prob_bits[c] = _context_prob_bits(count)
            precision[c] = _choose_precision(histogram[c], count, prob_bits[c], sent[c], freqs[c])
            _cumulative(freqs[c], starts[c])
    return prob_bits, precision, sent, freqs, starts


@njit(cache=True, nogil=True)
def _write_tables(precision, sent, words, pos, acc, n_acc):
    for c in range(sent.shape[0]):
        if sent[c].sum() > 0:
            pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, precision[c], PRECISION_FIELD_BITS)
            pos, acc, n_acc = _write_table(words, pos, acc, n_acc, sent[c])
    return pos, acc, n_acc


# ---- rANS core -----------------------------------------------------------------------
# The hot loops keep each lane's state in its own variable (4 independent chains that the
# CPU overlaps), index with unsigned integers (no negative-index fix-up) and inline their
# helpers (no refcounting of the arrays around each call).  Renormalization is branch-free.


@intrinsic
def _mul_high(typingctx, a, b):
    """High 64 bits of the unsigned 128-bit product of two int64 bit patterns (one mul)."""
    if a != types.int64 or b != types.int64:
        return None

    def codegen(context, builder, signature, args):
        wide = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))

    return types.int64(types.int64, types.int64), codegen


ENCODER_FIELDS = 4  # per symbol: x_max, rcp_freq, bias, cmpl_freq | rcp_shift << 32


@njit(cache=True, nogil=True)
def _encoder_table(prob_bits, freqs, starts):
    """Per symbol k = (context << TOKEN_SHIFT) | token, what _put_symbol needs to replace the
    division x // freq by a multiply-high (Giesen's rans64).  With 2**(shift - 1) < freq <=
    2**shift, rcp_freq = ceil(2**(63 + shift) / freq) exceeds 2**(63 + shift) / freq by less
    than 1, so for x < 2**63 the product exceeds x * 2**(63 + shift) / freq by less than
    2**(63 + shift) / freq: the quotient comes out exact.  freq = 1 takes rcp_freq = 2**64 - 1
    (quotient x - 1) and the missing 2**bits - 1 goes into the bias."""
    table = np.zeros(ENCODER_FIELDS * freqs.size, np.int64)
    for k in range(freqs.size):
        freq = freqs[k]
        if freq == 0:
            continue
        bits = prob_bits[k >> TOKEN_SHIFT]
        shift = _bit_length(freq - 1)  # ceil(log2 freq)
        if freq == 1:
            rcp_freq, rcp_shift, bias = np.int64(-1), 0, starts[k] + (np.int64(1) << bits) - 1
        else:
            # long division of 2**(shift + 63) + freq - 1 by freq in two 32-bit steps
            high = np.int64(1) << (shift + 31)
            low = (((high % freq) << 32) + freq - 1) // freq
            rcp_freq, rcp_shift, bias = ((high // freq) << 32) + low, shift - 1, starts[k]
        base = ENCODER_FIELDS * k
        table[base] = freq << (63 - bits)  # 2**63 (as int64: -2**63) if freq = 2**bits
        table[base + 1] = rcp_freq
        table[base + 2] = bias
        table[base + 3] = ((np.int64(1) << bits) - freq) | (np.int64(rcp_shift) << 32)
    return table


@njit(cache=True, nogil=True, inline="always")
def _put_symbol(words, pos, x, table, k):
    """Encode symbol k into state x: (pos, new x).  The new state is
    (x // freq << bits) + x % freq + start = x + start + (x // freq) * (2**bits - freq), after
    pushing 32 bits out if it would reach 2**63 (x >= x_max = freq << (63 - bits))."""
    base = np.uint64(ENCODER_FIELDS * k)
    flush = np.uint64(x) >= np.uint64(table[base])  # unsigned: x_max may be 2**63
    words[np.uint64(pos)] = x & WORD_MASK  # kept only if flush
    pos += flush
    x = x >> 32 if flush else x
    packed = table[base + np.uint64(3)]
    quotient = _mul_high(x, table[base + np.uint64(1)]) >> (packed >> 32)
    return pos, x + table[base + np.uint64(2)] + quotient * (packed & WORD_MASK)


@njit(cache=True, nogil=True)
def _rans_encode(symbols, table, lanes, certain):
    """Encode symbols (from _tokenize) backwards, element i in state i % lanes; table from
    _encoder_table.  Returns the emitted words followed by the final states.  certain
    (_certain_symbols; empty: none worth skipping): the symbols that leave a state as it is,
    whose groups of four are passed over (a speed choice only, the same words)."""
    n = symbols.size
    words = np.empty(n + 2 * lanes + 1, np.uint32)  # <= one word per symbol, one spare
    states = np.full(lanes, RANS_LOW, np.int64)
    pos = 0
    n_grouped = n - n % lanes
    for i in range(n - 1, n_grouped - 1, -1):  # the last n % lanes elements
        lane = i - n_grouped
        pos, states[lane] = _put_symbol(words, pos, states[lane], table, np.int64(symbols[i]))
    if lanes == 1:
        x0 = states[0]
        for i in range(n - 1, -1, -1):
            pos, x0 = _put_symbol(words, pos, x0, table, np.int64(symbols[np.uint64(i)]))
        states[0] = x0
    elif lanes == 2:
        x0, x1 = states[0], states[1]
        for i in range(n_grouped - 2, -1, -2):
            pos, x1 = _put_symbol(words, pos, x1, table, np.int64(symbols[np.uint64(i + 1)]))
            pos, x0 = _put_symbol(words, pos, x0, table, np.int64(symbols[np.uint64(i)]))
        states[0], states[1] = x0, x1
    else:
        x0, x1, x2, x3 = states[0], states[1], states[2], states[3]
        skip_certain = certain.size > 0
        for i in range(n_grouped - 4, -1, -4):
            if skip_certain and (certain[np.uint64(symbols[np.uint64(i)])] & certain[np.uint64(symbols[np.uint64(i + 1)])]
                                 & certain[np.uint64(symbols[np.uint64(i + 2)])] & certain[np.uint64(symbols[np.uint64(i + 3)])]):
                continue
            pos, x3 = _put_symbol(words, pos, x3, table, np.int64(symbols[np.uint64(i + 3)]))
            pos, x2 = _put_symbol(words, pos, x2, table, np.int64(symbols[np.uint64(i + 2)]))
            pos, x1 = _put_symbol(words, pos, x1, table, np.int64(symbols[np.uint64(i + 1)]))
            pos, x0 = _put_symbol(words, pos, x0, table, np.int64(symbols[np.uint64(i)]))
        states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    for lane in range(lanes):
        words[pos] = states[lane] & WORD_MASK
        words[pos + 1] = states[lane] >> 32
        pos += 2
    return words[:pos]


@njit(cache=True, nogil=True, inline="always")
def _take_symbol(x, context, context_info, slot_tokens, symbol_info):
    """(token, state before its renormalization) decoded from state x.  context_info[c] is
    prob_bits | (start of c's slot table) << 6; symbol_info[2k], [2k + 1] are freq and start
    of k = (context << TOKEN_SHIFT) | token (one array each: fewer registers in the loop)."""
    info = context_info[np.uint64(context)]
    bits = info & 63
    slot = x & ((np.int64(1) << bits) - 1)
    token = np.int64(slot_tokens[np.uint64((info >> 6) + slot)])
    k = np.uint64(((context << TOKEN_SHIFT) | token) << 1)
    return token, symbol_info[k] * (x >> bits) + slot - symbol_info[k + np.uint64(1)]


@njit(cache=True, nogil=True, inline="always")
def _take_likely_zero(x, context, context_info, slot_tokens, symbol_info):
    """_take_symbol where token 0 is likely: its slots come first (start 0), so a slot below
    its frequency is token 0 without the two table look-ups on the state's chain; the same
    (token, state). With _four_lanes_mostly_zeros, a cnn5fc FC layer's 1M codes of one
    context at 99.3-99.8% zeros decode in 2.05-2.15 ms instead of 2.65-2.75."""
    info = context_info[np.uint64(context)]
    bits = info & 63
    slot = x & ((np.int64(1) << bits) - 1)
    zero_freq = symbol_info[np.uint64(context << (TOKEN_SHIFT + 1))]
    if slot < zero_freq:
        return np.int64(0), zero_freq * (x >> bits) + slot
    return _take_symbol(x, context, context_info, slot_tokens, symbol_info)


@njit(cache=True, nogil=True, inline="always")
def _refill(x, words, pos):
    """(x, pos) after pulling the next word in if x fell below RANS_LOW; needs pos > 0."""
    word = np.int64(words[np.uint64(pos - 1)])  # loaded before the test: off the state's chain
    refill = np.int64(x < RANS_LOW)
    # arithmetic, not a select: LLVM turns that one into a branch that mispredicts
    return (x << (refill << 5)) | (word & -refill), pos - refill


@njit(cache=True, nogil=True, inline="always")
def _refill_four(x0, x1, x2, x3, words, pos):
    """_refill of four states, in the order the encoder wrote their words."""
    x0, pos = _refill(x0, words, pos)
    x1, pos = _refill(x1, words, pos)
    x2, pos = _refill(x2, words, pos)
    x3, pos = _refill(x3, words, pos)
    return x0, x1, x2, x3, pos


@njit(cache=True, nogil=True, inline="always")
def _four_codes(t0, t1, t2, t3, bit_words, bit_pos, codes, i):
    """codes[i .. i + 3] from four tokens and their extra bits from bit_pos on; returns the
    bit position after them."""
    codes[np.uint64(i)], n0 = _code(t0, bit_words, bit_pos)
    codes[np.uint64(i + 1)], n1 = _code(t1, bit_words, bit_pos + n0)
    codes[np.uint64(i + 2)], n2 = _code(t2, bit_words, bit_pos + n0 + n1)
    codes[np.uint64(i + 3)], n3 = _code(t3, bit_words, bit_pos + n0 + n1 + n2)
    return bit_pos + n0 + n1 + n2 + n3


@njit(cache=True, nogil=True)
def _four_lanes(words, contexts, context_info, slot_tokens, symbol_info, bit_words, bit_limit, bit_pos, pos, states, codes):
    """_decode_elements' unclamped loop on four states (updated in states) from element 0, while
    the arrays have room: returns (the next element, pos, bit_pos)."""
    x0, x1, x2, x3 = states[0], states[1], states[2], states[3]
    i = 0
    while i + 4 <= codes.size and pos >= 4 and bit_pos <= bit_limit:
        t0, x0 = _take_symbol(x0, np.int64(contexts[np.uint64(i)]), context_info, slot_tokens, symbol_info)
        t1, x1 = _take_symbol(x1, np.int64(contexts[np.uint64(i + 1)]), context_info, slot_tokens, symbol_info)
        t2, x2 = _take_symbol(x2, np.int64(contexts[np.uint64(i + 2)]), context_info, slot_tokens, symbol_info)
        t3, x3 = _take_symbol(x3, np.int64(contexts[np.uint64(i + 3)]), context_info, slot_tokens, symbol_info)
        x0, x1, x2, x3, pos = _refill_four(x0, x1, x2, x3, words, pos)
        bit_pos = _four_codes(t0, t1, t2, t3, bit_words, bit_pos, codes, i)
        i += 4
    states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    return i, pos, bit_pos


@njit(cache=True, nogil=True)
def _four_lanes_mostly_zeros(words, contexts, context_info, slot_tokens, symbol_info, bit_words, bit_limit, bit_pos, pos,
                             sparse, certain, states, codes):
    """_four_lanes for a stream of mostly zeros (sparse) or with certain contexts (a loop of
    its own: their tests inside _four_lanes cost a stream with neither 2-8%)."""
    x0, x1, x2, x3 = states[0], states[1], states[2], states[3]
    skip_certain = certain.size > 0
    one_context = context_info.size == 1  # (every context 0: no context to read)
    i = 0
    while i + 4 <= codes.size and pos >= 4 and bit_pos <= bit_limit:
        if skip_certain:  # four certain codes: no state changes, nothing read
            k0 = certain[np.uint64(contexts[np.uint64(i)])]
            k1 = certain[np.uint64(contexts[np.uint64(i + 1)])]
            k2 = certain[np.uint64(contexts[np.uint64(i + 2)])]
            k3 = certain[np.uint64(contexts[np.uint64(i + 3)])]
            if (k0 != NOT_CERTAIN) & (k1 != NOT_CERTAIN) & (k2 != NOT_CERTAIN) & (k3 != NOT_CERTAIN):
                codes[np.uint64(i)], codes[np.uint64(i + 1)], codes[np.uint64(i + 2)], codes[np.uint64(i + 3)] = k0, k1, k2, k3
                i += 4
                continue
        if sparse and one_context:
            t0, x0 = _take_likely_zero(x0, np.int64(0), context_info, slot_tokens, symbol_info)
            t1, x1 = _take_likely_zero(x1, np.int64(0), context_info, slot_tokens, symbol_info)
            t2, x2 = _take_likely_zero(x2, np.int64(0), context_info, slot_tokens, symbol_info)
            t3, x3 = _take_likely_zero(x3, np.int64(0), context_info, slot_tokens, symbol_info)
        elif sparse:
            t0, x0 = _take_likely_zero(x0, np.int64(contexts[np.uint64(i)]), context_info, slot_tokens, symbol_info)
            t1, x1 = _take_likely_zero(x1, np.int64(contexts[np.uint64(i + 1)]), context_info, slot_tokens, symbol_info)
            t2, x2 = _take_likely_zero(x2, np.int64(contexts[np.uint64(i + 2)]), context_info, slot_tokens, symbol_info)
            t3, x3 = _take_likely_zero(x3, np.int64(contexts[np.uint64(i + 3)]), context_info, slot_tokens, symbol_info)
        else:
            t0, x0 = _take_symbol(x0, np.int64(contexts[np.uint64(i)]), context_info, slot_tokens, symbol_info)
            t1, x1 = _take_symbol(x1, np.int64(contexts[np.uint64(i + 1)]), context_info, slot_tokens, symbol_info)
            t2, x2 = _take_symbol(x2, np.int64(contexts[np.uint64(i + 2)]), context_info, slot_tokens, symbol_info)
            t3, x3 = _take_symbol(x3, np.int64(contexts[np.uint64(i + 3)]), context_info, slot_tokens, symbol_info)
        x0, x1, x2, x3, pos = _refill_four(x0, x1, x2, x3, words, pos)
        if (t0 | t1 | t2 | t3) == 0:  # four zeros: no extra bits (token 0 is code 0)
            codes[np.uint64(i)], codes[np.uint64(i + 1)], codes[np.uint64(i + 2)], codes[np.uint64(i + 3)] = 0, 0, 0, 0
        else:
            bit_pos = _four_codes(t0, t1, t2, t3, bit_words, bit_pos, codes, i)
        i += 4
    states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    return i, pos, bit_pos


@njit(cache=True, nogil=True)
def _decode_elements(
    words, contexts, context_info, slot_tokens, symbol_info, lanes, bit_words, n_bit_words, bit_pos, sparse, certain, codes
):
    """Inverse of _rans_encode and of the extra bits in one pass (both go in element order):
    fills codes, returns (status, bit position after the extra bits).  context_info and
    symbol_info as in _take_symbol; bit_words needs 4 zero pad words after its n_bit_words.
    sparse: mostly zero codes expected (SPARSE_ZERO_SHARE); certain: per context, the code of
    its one certain token or NOT_CERTAIN (empty: none worth skipping, CERTAIN_SKIP_SHARE);
    both speed choices only."""
    pos = words.size
    if pos < 2 * lanes:
        return ERR_RANS_EXHAUSTED, bit_pos
    states = np.empty(lanes, np.int64)
    for lane in range(lanes - 1, -1, -1):
        high, low = np.int64(words[pos - 1]), np.int64(words[pos - 2])
        pos -= 2
        states[lane] = (high << 32) | low
        if high >> 31 or states[lane] < RANS_LOW:
            return ERR_RANS_STATE, bit_pos
    # Decoding maps a state in [RANS_LOW, 2**63) to another whatever the data: only the
    # positions can go wrong.  The fast loops read unclamped while that stays in the arrays:
    # each lane pulls at most one word (pos >= lanes), and the 4 pad words cover the at most
    # 4 * 22 extra bits read from bit_limit on.  The clamped loop does the rest: the last few
    # elements, or a damaged stream to its end; the checks below report what went wrong.
    bit_limit = 32 * n_bit_words
    i = 0
    if lanes == 1:
        x0 = states[0]
        while i < codes.size and pos >= 1 and bit_pos <= bit_limit:
            token, x0 = _take_symbol(x0, np.int64(contexts[np.uint64(i)]), context_info, slot_tokens, symbol_info)
            x0, pos = _refill(x0, words, pos)
            codes[np.uint64(i)], n_bits = _code(token, bit_words, bit_pos)
            bit_pos += n_bits
            i += 1
        states[0] = x0
    elif lanes == 2:
        x0, x1 = states[0], states[1]
        while i + 2 <= codes.size and pos >= 2 and bit_pos <= bit_limit:
            t0, x0 = _take_symbol(x0, np.int64(contexts[np.uint64(i)]), context_info, slot_tokens, symbol_info)
            t1, x1 = _take_symbol(x1, np.int64(contexts[np.uint64(i + 1)]), context_info, slot_tokens, symbol_info)
            x0, pos = _refill(x0, words, pos)
            x1, pos = _refill(x1, words, pos)
            codes[np.uint64(i)], n0 = _code(t0, bit_words, bit_pos)
            codes[np.uint64(i + 1)], n1 = _code(t1, bit_words, bit_pos + n0)
            bit_pos += n0 + n1
            i += 2
        states[0], states[1] = x0, x1
    elif sparse or certain.size > 0:
        i, pos, bit_pos = _four_lanes_mostly_zeros(words, contexts, context_info, slot_tokens, symbol_info, bit_words,
                                                   bit_limit, bit_pos, pos, sparse, certain, states, codes)
    else:
        i, pos, bit_pos = _four_lanes(words, contexts, context_info, slot_tokens, symbol_info, bit_words, bit_limit, bit_pos,
                                      pos, states, codes)
    for i in range(i, codes.size):
        lane = i & (lanes - 1)
        token, x = _take_symbol(states[lane], np.int64(contexts[i]), context_info, slot_tokens, symbol_info)
        refill = x < RANS_LOW
        pos -= refill
        states[lane] = (x << 32) | np.int64(words[max(pos, 0)]) if refill else x  # pos < 0: reported below
        codes[i], n_bits = _code(token, bit_words, min(bit_pos, bit_limit))  # likewise bit_pos > bit_limit
        bit_pos += n_bits
    if pos < 0:
        return ERR_RANS_EXHAUSTED, bit_pos
    for lane in range(lanes):
        if states[lane] != RANS_LOW:
            return ERR_RANS_STATE, bit_pos
    if pos != 0:
        return ERR_TRAILING, bit_pos
    return OK, bit_pos


# ---- whole-stream kernels ------------------------------------------------------------


@njit(cache=True, nogil=True)
def _histogram(codes, contexts, n_contexts):
    """(status, histogram[n_contexts, 2**TOKEN_SHIFT])."""
    histogram = np.zeros((n_contexts, 1 << TOKEN_SHIFT), np.int64)
    status = _count_tokens(codes, contexts, histogram.reshape(-1))
    return status, histogram


@njit(cache=True, nogil=True)
def _encode_kernel(codes, contexts, n_contexts):
    """Returns (status, bit_words, rans_words)."""
    symbols = np.empty(codes.size, np.uint16)
    histogram = np.zeros((n_contexts, 1 << TOKEN_SHIFT), np.int64)
    # 30 bits: an out-of-range int32 magnitude (reported below) has up to that many
    extra_words = np.empty(30 * codes.size // 32 + 2, np.uint32)
    status, n_extra_words, extra_acc, n_extra_acc = _tokenize(
        codes, contexts, symbols, histogram.reshape(-1), extra_words
    )
    if status != OK:
        return status, np.empty(0, np.uint32), np.empty(0, np.uint32)
    prob_bits, precision, sent, freqs, starts = _build_model(histogram)

    # the tables come first, so the extra bits (packed while tokenizing) are appended behind them
    max_table_bits = n_contexts * (PRECISION_FIELD_BITS + 2 * TOKEN_FIELD_BITS + K_FIELD_BITS + N_TOKENS * (2 * MAX_WEIGHT_BITS + 1))
    bit_words = np.empty(max_table_bits // 32 + n_extra_words + 3, np.uint32)
    pos, acc, n_acc = _write_tables(precision, sent, bit_words, 0, np.int64(0), 0)
    pos, acc, n_acc = _append_words(bit_words, pos, acc, n_acc, extra_words, n_extra_words)
    pos, acc, n_acc = _put_bits(bit_words, pos, acc, n_acc, extra_acc, n_extra_acc)
    if n_acc > 0:
        bit_words[pos] = acc
        pos += 1

    lanes = _lane_count(codes.size)
    table = _encoder_table(prob_bits, freqs.reshape(-1), starts.reshape(-1))
    rans_words = _rans_encode(symbols, table, lanes, _certain_symbols(histogram, prob_bits, freqs))
    return OK, bit_words[:pos], rans_words


@njit(cache=True, nogil=True)
def _table_words(precision, sent):
    """The tables of a built model as whole words (the last zero-padded)."""
    n_contexts = sent.shape[0]
    max_table_bits = n_contexts * (PRECISION_FIELD_BITS + 2 * TOKEN_FIELD_BITS + K_FIELD_BITS + N_TOKENS * (2 * MAX_WEIGHT_BITS + 1))
    words = np.empty(max_table_bits // 32 + 2, np.uint32)
    pos, acc, n_acc = _write_tables(precision, sent, words, 0, np.int64(0), 0)
    if n_acc > 0:
        words[pos] = acc
        pos += 1
    return words[:pos]


@njit(cache=True, nogil=True)
def _context_counts(contexts, n_contexts):
    """Elements per context (contexts: contiguous).  Eight at a time as one uint64: eight in
    one context (a run: a layer's zero rows, an embedding's untouched ones) add 8 at once,
    0.63 -> 0.27 ms on 1M contexts with 85% of such words, 0.41 -> 0.38 ms on random ones.
    Four partial counts: one shared counter would make every increment wait for the
    previous one when most elements have the same context."""
    if n_contexts == 1:  # the caller checked that every context is < n_contexts
        return np.full(1, contexts.size, np.int64)
    partial = np.zeros((4, 256), np.int64)
    n_words = contexts.size // 8
    words = contexts[: 8 * n_words].view(np.uint64)  # (the bytes' order does not matter here)
    byte = np.uint64(0xFF)
    for k in range(n_words):
        word = words[np.uint64(k)]
        first = word & byte
        if word == first * np.uint64(0x0101010101010101):
            partial[0, first] += 8
        else:
            partial[0, first] += 1
            partial[1, (word >> np.uint64(8)) & byte] += 1
            partial[2, (word >> np.uint64(16)) & byte] += 1
            partial[3, (word >> np.uint64(24)) & byte] += 1
            partial[0, (word >> np.uint64(32)) & byte] += 1
            partial[1, (word >> np.uint64(40)) & byte] += 1
            partial[2, (word >> np.uint64(48)) & byte] += 1
            partial[3, word >> np.uint64(56)] += 1
    for i in range(8 * n_words, contexts.size):
        partial[0, contexts[np.uint64(i)]] += 1
    counts = np.zeros(n_contexts, np.int64)
    for c in range(n_contexts):
        counts[c] = partial[0, c] + partial[1, c] + partial[2, c] + partial[3, c]
    return counts


@njit(cache=True, nogil=True)
def _decode_model(bit_words, n_bit_words, contexts, n_contexts):
    """(status, context_info, slot_tokens, symbol_info, bit position after the tables,
    sparse, certain): the decoder's model from the tables at the start of bit_words (see
    _take_symbol); sparse: the tables expect at least SPARSE_ZERO_SHARE of zero codes;
    certain: see _decode_elements."""
    counts = _context_counts(contexts, n_contexts)

    prob_bits = np.zeros(n_contexts, np.int64)
    slot_base = np.zeros(n_contexts, np.int64)
    n_slots = 0
    for c in range(n_contexts):
        if counts[c] > 0:
            prob_bits[c] = _context_prob_bits(counts[c])
            slot_base[c] = n_slots
            n_slots += 1 << prob_bits[c]

    freqs = np.zeros((n_contexts, 1 << TOKEN_SHIFT), np.int64)
    starts = np.zeros((n_contexts, 1 << TOKEN_SHIFT), np.int64)
    slot_tokens = np.empty(n_slots, np.uint8)
    weights = np.zeros(N_TOKENS, np.int64)
    pos, acc, n_acc = 0, np.int64(0), 0
    for c in range(n_contexts):
        if counts[c] == 0:
            continue
        precision, pos, acc, n_acc, ok = _get_bits(bit_words, n_bit_words, pos, acc, n_acc, PRECISION_FIELD_BITS)
        if not ok or precision > prob_bits[c]:
            status = ERR_BITS_EXHAUSTED if not ok else ERR_TABLE
            return status, prob_bits, slot_tokens, freqs.reshape(-1), 0, False, _NO_CERTAIN
        total = min(counts[c], PROB_TOTAL) if precision == 0 else np.int64(1) << precision
        pos, acc, n_acc, status = _read_table(bit_words, n_bit_words, pos, acc, n_acc, total, weights)
        if status != OK:
            return status, prob_bits, slot_tokens, freqs.reshape(-1), 0, False, _NO_CERTAIN
        _normalize(weights, total, prob_bits[c], freqs[c])
        _cumulative(freqs[c], starts[c])
        for t in range(N_TOKENS):  # freqs sum to 2**prob_bits: every slot gets a token
            first = slot_base[c] + starts[c, t]
            slot_tokens[first : first + freqs[c, t]] = t

    context_info = prob_bits | (slot_base << 6)
    symbol_info = np.empty(2 * freqs.size, np.int64)
    flat_freqs, flat_starts = freqs.reshape(-1), starts.reshape(-1)
    for k in range(flat_freqs.size):  # (a loop, not slice copies: see checksum._absorb)
        symbol_info[2 * k] = flat_freqs[k]
        symbol_info[2 * k + 1] = flat_starts[k]
    expected_zeros = 0.0
    for c in range(n_contexts):
        expected_zeros += counts[c] * (freqs[c, 0] / (np.int64(1) << prob_bits[c]))
    sparse = expected_zeros >= SPARSE_ZERO_SHARE * contexts.size
    return OK, context_info, slot_tokens, symbol_info, 32 * pos - n_acc, sparse, _certain_codes(counts, prob_bits, freqs)


_NO_CERTAIN = np.zeros(0, np.int64)


@njit(cache=True, nogil=True)
def _certain_symbols(histogram, prob_bits, freqs):
    """_rans_encode's certain: per symbol (context << TOKEN_SHIFT) | token, 1 where that token
    without extra bits fills its context's table (_certain_codes' contexts), else 0; empty
    where under CERTAIN_SKIP_SHARE of the elements are such symbols."""
    certain = np.zeros(freqs.size, np.uint8)
    n_certain = 0
    for c in range(freqs.shape[0]):
        for t in range(N_TOKENS):
            if histogram[c, t] > 0 and freqs[c, t] == np.int64(1) << prob_bits[c] and TOKEN_EXTRA_BITS[t] == 0:
                certain[(c << TOKEN_SHIFT) | t] = 1
                n_certain += histogram[c, t]
    return certain if n_certain >= CERTAIN_SKIP_SHARE * histogram.sum() else _NO_CERTAIN_SYMBOLS


_NO_CERTAIN_SYMBOLS = np.zeros(0, np.uint8)


@njit(cache=True, nogil=True)
def _certain_codes(counts, prob_bits, freqs):
    """_decode_elements' certain: each used context's code where one token without extra
    bits fills its table, else NOT_CERTAIN; empty where under CERTAIN_SKIP_SHARE of the
    elements are in such contexts."""
    certain = np.full(counts.size, NOT_CERTAIN, np.int64)
    n_certain = 0
    for c in range(counts.size):
        for t in range(N_TOKENS):
            if counts[c] > 0 and freqs[c, t] == np.int64(1) << prob_bits[c] and TOKEN_EXTRA_BITS[t] == 0:
                magnitude = np.int64(TOKEN_BASE[t])
                certain[c] = -magnitude if TOKEN_NEGATIVE[t] else magnitude
                n_certain += counts[c]
    return certain if n_certain >= CERTAIN_SKIP_SHARE * counts.sum() else _NO_CERTAIN


@njit(cache=True, nogil=True)
def _bits_end_exactly(bit_words, n_bit_words, bit_pos):
    """Status of a bit section read up to bit_pos: the words read are those holding bits
    [0, bit_pos), and the rest of the last must be zero."""
    if bit_pos > 32 * n_bit_words:
        return ERR_BITS_EXHAUSTED
    if (bit_pos + 31) >> 5 != n_bit_words:
        return ERR_TRAILING
    if bit_pos & 31 and bit_words[n_bit_words - 1] >> (bit_pos & 31):
        return ERR_TRAILING
    return OK


@njit(cache=True, nogil=True)
def _little_endian_words(raw, start, n_words, n_pad):
    """n_words little-endian uint32 words from raw[start:] (uint8), then n_pad zero words.
    Unsigned indices let LLVM vectorize the loop: 1.0 instead of 4.2 us for 1120 words."""
    words = np.zeros(n_words + n_pad, np.uint32)
    first = np.uint64(start)
    for k in range(np.uint64(n_words)):
        at = first + np.uint64(4) * k
        words[k] = (np.uint32(raw[at]) | (np.uint32(raw[at + np.uint64(1)]) << 8)
                    | (np.uint32(raw[at + np.uint64(2)]) << 16) | (np.uint32(raw[at + np.uint64(3)]) << 24))
    return words


@njit(cache=True, nogil=True)
def _varint_at(raw, at):
    """(value, bytes used) of the LEB128 varint at raw[at:] (uint8; 5 bytes hold any word
    count we produce); 0 bytes used where it is truncated, oversized or non-canonical."""
    value = np.int64(0)
    for i in range(max(min(raw.size - at, 5), 0)):
        byte = np.int64(raw[at + i])
        value |= (byte & 0x7F) << (7 * i)
        if byte & 0x80 == 0:
            return value, (0 if i > 0 and byte == 0 else i + 1)
    return value, 0


@njit(cache=True, nogil=True)
def _stream_words(raw):
    """(status, bit_words with 4 zero pad words, n_bit_words, rans_words) of an unsegmented
    stream's bytes (uint8): parsed in the kernel, where the same steps in Python (a varint
    read element by element, two slices and copies) cost a small tensor 8 of its 60 us."""
    n_bit_words, used = _varint_at(raw, 0)
    empty = np.zeros(0, np.uint32)
    if used == 0:
        return ERR_WORD_COUNT, empty, 0, empty
    rans_start = used + 4 * n_bit_words
    if rans_start > raw.size or (raw.size - rans_start) % 4:
        return ERR_SECTIONS, empty, 0, empty
    return (OK, _little_endian_words(raw, used, n_bit_words, 4), n_bit_words,
            _little_endian_words(raw, rans_start, (raw.size - rans_start) // 4, 0))


@njit(cache=True, nogil=True)
def decode_stream_kernel(raw, contexts, n_contexts, codes):
    """Fills codes from an unsegmented stream's bytes (raw, uint8); returns a status.
    contexts empty: every code in context 0 (n_contexts 1), without an array of zeros."""
    status, bit_words, n_bit_words, rans_words = _stream_words(raw)
    if status != OK:
        return status
    if contexts.size == 0:
        contexts = np.zeros(codes.size, np.uint8)
    return _decode_kernel(bit_words, n_bit_words, rans_words, contexts, n_contexts, codes)


@njit(cache=True, nogil=True)
def _decode_kernel(bit_words, n_bit_words, rans_words, contexts, n_contexts, codes):
    """Fills codes; returns a status.  bit_words[n_bit_words:] are 4 zero pad words."""
    status, context_info, slot_tokens, symbol_info, bit_pos, sparse, certain = _decode_model(
        bit_words, n_bit_words, contexts, n_contexts)
    if status != OK:
        return status
    return _decode_segment(bit_words, n_bit_words, bit_pos, rans_words, contexts, context_info, slot_tokens, symbol_info,
                           sparse, certain, codes)


@njit(cache=True, nogil=True)
def _decode_segment(bit_words, n_bit_words, bit_pos, rans_words, contexts, context_info, slot_tokens, symbol_info, sparse,
                    certain, codes):
    """Decode codes (and their extra bits from bit_pos on) with a built model; returns a
    status.  bit_words[n_bit_words:] are 4 zero pad words."""
    status, bit_pos = _decode_elements(
        rans_words, contexts, context_info, slot_tokens, symbol_info, _lane_count(codes.size),
        bit_words, n_bit_words, bit_pos, sparse, certain, codes,
    )
    if status != OK:
        return status
    return _bits_end_exactly(bit_words, n_bit_words, bit_pos)


@njit(cache=True, nogil=True)
def _histogram_ideal_bits(histogram):
    """Per-context empirical token entropy plus the raw extra bits."""
    bits = 0.0
    for c in range(histogram.shape[0]):
        count = histogram[c].sum()
        for t in range(N_TOKENS):
            k = histogram[c, t]
            if k > 0:
                bits += k * (np.log2(count / k) + TOKEN_EXTRA_BITS[t])
    return bits


@njit(cache=True, nogil=True)
def _histogram_table_bits(histogram):
    """Bits of the tables at the default precision, without building the model (a context of
    at most 2**15 elements sends its raw counts, so only larger ones need normalizing): an
    upper bound, as encode may choose a coarser, cheaper table where that is smaller."""
    bits = 0
    freqs = np.zeros(N_TOKENS, np.int64)
    for c in range(histogram.shape[0]):
        count = histogram[c].sum()
        if count > PROB_TOTAL:
            _normalize(histogram[c], count, np.int64(PROB_BITS), freqs)
            bits += PRECISION_FIELD_BITS + _table_layout(freqs)[3]
        elif count > 0:
            bits += PRECISION_FIELD_BITS + _table_layout(histogram[c])[3]
    return bits


@njit(cache=True, nogil=True)
def _ideal_bits_kernel(codes, contexts, n_contexts):
    status, histogram = _histogram(codes, contexts, n_contexts)
    return status, _histogram_ideal_bits(histogram)


@njit(cache=True, nogil=True)
def _table_bits_kernel(codes, contexts, n_contexts):
    status, histogram = _histogram(codes, contexts, n_contexts)
    return status, _histogram_table_bits(histogram)


@njit(cache=True, nogil=True)
def _ideal_and_table_bits_kernel(codes, contexts, n_contexts):
    status, histogram = _histogram(codes, contexts, n_contexts)
    return status, (_histogram_ideal_bits(histogram), _histogram_table_bits(histogram))


@njit(cache=True, nogil=True)
def _estimate_merges_kernel(codes, contexts, n_contexts, max_shift):
    """(status, estimate of each merge 0..max_shift): contexts merged 2**shift at a time have
    the histogram of the unmerged ones with groups of rows summed, so one pass serves all."""
    status, histogram = _histogram(codes, contexts, n_contexts)
    return status, _merged_estimates(histogram, max_shift)


@njit(cache=True, nogil=True)
def _estimate_one_context_kernel(codes):
    """(status, estimate) of codes all in one context."""
    histogram = np.zeros((1, 1 << TOKEN_SHIFT), np.int64)
    status = _count_tokens_in_one_context(codes, histogram.reshape(-1))
    return status, _merged_estimates(histogram, np.int64(0))[0]  # (an int64, not a literal: one compiled copy)


@njit(cache=True, nogil=True)
def _merged_estimates(histogram, max_shift):
    """_estimate_merges_kernel's estimates from the histogram."""
    n_contexts = histogram.shape[0]
    estimates = np.empty(max_shift + 1)
    for shift in range(max_shift + 1):
        merged = np.zeros((((n_contexts - 1) >> shift) + 1, histogram.shape[1]), np.int64)
        for c in range(n_contexts):
            for t in range(histogram.shape[1]):  # (not a row +=: see checksum._absorb)
                merged[c >> shift, t] += histogram[c, t]
        estimates[shift] = _histogram_ideal_bits(merged) + _histogram_table_bits(merged)
    return estimates


# ---- public API ----------------------------------------------------------------------


def _for_kernels(array):
    """Contiguous and writable: read-only arrays would compile (and cache) another
    specialization of every kernel. (A stream's bytes reach decode_stream_kernel as they
    come, read-only from bytes: the decoder always passes bytes, a bytearray compiles its own.)"""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _check_contexts(contexts, n_contexts, n_codes=None):
    if not 1 <= n_contexts <= 256:
        raise ValueError(f"n_contexts must be in 1..256, got {n_contexts}")
    contexts = _for_kernels(contexts)
    if contexts.ndim != 1 or contexts.dtype != np.uint8:
        raise ValueError("contexts must be a 1-D uint8 array")
    if n_codes is not None and contexts.size != n_codes:
        raise ValueError(f"{n_codes} codes but {contexts.size} contexts")
    if contexts.size and n_contexts < 256 and contexts.max() >= n_contexts:
        raise ValueError(f"a context is >= n_contexts = {n_contexts}")
    return contexts


def _require_one_context(n_contexts):
    """Callers pass contexts None for all codes in context 0: only with n_contexts 1."""
    if n_contexts != 1:
        raise ValueError("contexts are needed for more than one context")


def _check_codes(codes):
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise ValueError("codes must be a 1-D integer array")
    if codes.dtype != np.int32:
        if codes.size and (codes.min() < -MAX_MAGNITUDE or codes.max() > MAX_MAGNITUDE):
            raise ValueError(f"codes must satisfy |q| <= {MAX_MAGNITUDE}")
        codes = codes.astype(np.int32)
    return _for_kernels(codes)


def check_status(status):
    if status == ERR_MAGNITUDE_RANGE:
        raise ValueError(f"codes must satisfy |q| <= {MAX_MAGNITUDE}")
    if status != OK:
        raise CorruptStreamError(_MESSAGES[status])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(raw: np.ndarray, at: int) -> tuple[int, int]:
    """(value, bytes used) of the LEB128 varint at raw[at:] (uint8)."""
    value, used = _varint_at(raw, at)
    if not used:
        raise CorruptStreamError(_MESSAGES[ERR_WORD_COUNT])
    return int(value), int(used)


def _segments(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + SEGMENT_ELEMENTS, n)) for start in range(0, n, SEGMENT_ELEMENTS)]


def _encode_segmented(codes, contexts, n_contexts, threads) -> bytes:
    symbols = np.empty(codes.size, np.uint16)

    def tokenize(segment):
        start, stop = segment
        histogram = np.zeros(n_contexts << TOKEN_SHIFT, np.int64)
        extra = np.empty(30 * (stop - start) // 32 + 2, np.uint32)
        status, n_words, acc, n_acc = _tokenize(codes[start:stop], contexts[start:stop], symbols[start:stop], histogram, extra)
        if n_acc:  # the pending bits, zero-padded to a word
            extra[n_words] = acc
            n_words += 1
        return status, histogram, extra[:n_words].copy()  # frees the worst-case buffer

    segments = _segments(codes.size)
    tokenized = each(tokenize, segments, threads)
    for status, _, _ in tokenized:
        check_status(status)
    histogram = np.sum([h for _, h, _ in tokenized], axis=0).reshape(n_contexts, 1 << TOKEN_SHIFT)
    prob_bits, precision, sent, freqs, starts = _build_model(histogram)
    table = _encoder_table(prob_bits, freqs.reshape(-1), starts.reshape(-1))
    certain = _certain_symbols(histogram, prob_bits, freqs)
    coded = each(lambda s: _rans_encode(symbols[s[0]:s[1]], table, _lane_count(s[1] - s[0]), certain), segments, threads)
    tables = _table_words(precision, sent)
    directory = b"".join(_varint(extra.size) + _varint(words.size) for (_, _, extra), words in zip(tokenized, coded))
    parts = [_varint(tables.size), tables.astype("<u4", copy=False).tobytes(), directory]
    parts += [extra.astype("<u4", copy=False).tobytes() for _, _, extra in tokenized]
    parts += [words.astype("<u4", copy=False).tobytes() for words in coded]
    return b"".join(parts)


def _decode_segmented(raw, contexts, n_contexts, codes, threads) -> None:
    n_table_words, offset = _read_varint(raw, 0)
    tables_end = offset + 4 * n_table_words
    if tables_end > raw.size:
        raise CorruptStreamError(_MESSAGES[ERR_SECTIONS])
    table_words = _little_endian_words(raw, offset, n_table_words, 4)
    segments, offset, sizes = _segments(codes.size), tables_end, []
    for _ in segments:
        n_extra, used = _read_varint(raw, offset)
        n_rans, used_too = _read_varint(raw, offset + used)
        offset += used + used_too
        sizes.append((n_extra, n_rans))
    extra_start = offset
    rans_start = extra_start + 4 * sum(n for n, _ in sizes)
    if rans_start + 4 * sum(n for _, n in sizes) != raw.size:
        raise CorruptStreamError(_MESSAGES[ERR_SECTIONS])
    status, context_info, slot_tokens, symbol_info, bit_pos, sparse, certain = _decode_model(
        table_words, n_table_words, contexts, n_contexts)
    check_status(status)
    check_status(_bits_end_exactly(table_words, n_table_words, bit_pos))

    jobs = []
    for (start, stop), (n_extra, n_rans) in zip(segments, sizes):
        jobs.append((start, stop, extra_start, n_extra, rans_start, n_rans))
        extra_start += 4 * n_extra
        rans_start += 4 * n_rans

    def decode_segment(job):
        start, stop, extra_at, n_extra, rans_at, n_rans = job
        extra = _little_endian_words(raw, extra_at, n_extra, 4)
        words = _little_endian_words(raw, rans_at, n_rans, 0)
        return _decode_segment(extra, n_extra, 0, words, contexts[start:stop], context_info, slot_tokens, symbol_info,
                               sparse, certain, codes[start:stop])

    for status in each(decode_segment, jobs, threads):
        check_status(status)


def encode(codes: np.ndarray, contexts: np.ndarray | None, n_contexts: int, threads: int = 1) -> bytes:
    """Encode 1-D signed codes (|q| < 2**24), each modelled under its uint8 context
    (< n_contexts <= 256; None: all in context 0, n_contexts 1, without checking an array of
    zeros).  The decoder needs the same contexts.  Streams of SEGMENTED_FROM codes or more
    are coded in segments, on up to `threads` threads (the bytes do not depend on it)."""
    codes = _check_codes(codes)
    if contexts is None:
        _require_one_context(n_contexts)
        contexts = np.zeros(codes.size, np.uint8)
    else:
        contexts = _check_contexts(contexts, n_contexts, codes.size)
    if codes.size == 0:
        return b""
    if codes.size >= SEGMENTED_FROM:
        return _encode_segmented(codes, contexts, n_contexts, threads)
    status, bit_words, rans_words = _encode_kernel(codes, contexts, n_contexts)
    check_status(status)
    # (joined bytes: filling one preallocated array took 2.9 us of a small tensor's 33)
    return b"".join((_varint(bit_words.size), bit_words.astype("<u4", copy=False).tobytes(),
                     rans_words.astype("<u4", copy=False).tobytes()))


def decode(data: bytes | memoryview, contexts: np.ndarray, n_contexts: int, threads: int = 1) -> np.ndarray:
    """Inverse of encode given the same contexts and n_contexts: an int32 array with one
    code per context (segments on up to `threads` threads).  Raises CorruptStreamError if
    data is damaged or does not match."""
    contexts = _check_contexts(contexts, n_contexts)
    raw = np.frombuffer(data, dtype=np.uint8)
    codes = np.empty(contexts.size, np.int32)
    if contexts.size == 0:
        if raw.size:
            raise CorruptStreamError("data for an empty array")
        return codes
    if contexts.size >= SEGMENTED_FROM:
        _decode_segmented(raw, contexts, n_contexts, codes, threads)
        return codes
    check_status(decode_stream_kernel(raw, contexts, n_contexts, codes))
    return codes


_ONE_CONTEXT = np.zeros(0, np.uint8)


def decode_one_context(data: bytes | memoryview, n: int, threads: int = 1) -> np.ndarray:
    """decode of n codes all in context 0 (n_contexts 1), without an array of n zero contexts."""
    inputs = decode_inputs(data, None, 1, n)
    if inputs is None:  # empty or segmented
        return decode(data, np.zeros(n, np.uint8), 1, threads)
    codes = np.empty(n, np.int32)
    check_status(decode_stream_kernel(*inputs, codes))
    return codes


def decode_inputs(data: bytes | memoryview, contexts: np.ndarray | None, n_contexts: int, n: int) -> tuple | None:
    """For a caller that decodes n codes inside its own kernel: the arguments of
    decode_stream_kernel before codes (contexts checked as decode checks them; None: all in
    context 0), or None where the stream is empty or segmented (use decode).  Raises
    ValueError for bad contexts; a damaged stream is the kernel's status."""
    if n == 0 or n >= SEGMENTED_FROM:
        return None
    if contexts is None:
        _require_one_context(n_contexts)
        contexts = _ONE_CONTEXT
    else:
        contexts = _check_contexts(contexts, n_contexts, n)
    return np.frombuffer(data, dtype=np.uint8), contexts, n_contexts


def _measured(kernel, codes, contexts, n_contexts):
    codes = _check_codes(codes)
    contexts = _check_contexts(contexts, n_contexts, codes.size)
    status, bits = kernel(codes, contexts, n_contexts)
    check_status(status)
    return bits


def ideal_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> float:
    """Ideal code length in bits of codes under this coder's model (per-context empirical
    token distributions plus raw extra bits), excluding the frequency tables."""
    return float(_measured(_ideal_bits_kernel, codes, contexts, n_contexts))


def table_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> int:
    """Bits the frequency tables take at the default precision: an upper bound of what encode
    writes, as it may choose coarser tables.  The rest of a stream is the payload that
    ideal_bits estimates (plus the cost of any coarser table) and overhead: a <= 5-byte
    header, padding, and the final rANS states (8 bytes each; 4 states from 16384 elements
    on, 2 from 2048, else 1)."""
    return int(_measured(_table_bits_kernel, codes, contexts, n_contexts))


def ideal_and_table_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> tuple[float, int]:
    """(ideal_bits, table_bits) from one pass over the codes, for an estimate that scales the
    payload but not the tables (a sample's)."""
    ideal, table = _measured(_ideal_and_table_bits_kernel, codes, contexts, n_contexts)
    return float(ideal), int(table)


def estimated_bits_by_merge(codes: np.ndarray, contexts: np.ndarray, n_contexts: int, max_shift: int,
                            threads: int = 1) -> np.ndarray:
    """estimated_bits under contexts >> shift (n_contexts merged alike) for every shift in
    0..max_shift, from one pass over the codes (a large array's in element ranges on up to
    `threads` threads, whose histograms add up exactly)."""
    codes = _check_codes(codes)
    contexts = _check_contexts(contexts, n_contexts, codes.size)
    ranges = spans(codes.size, threads)
    if len(ranges) == 1:
        status, estimates = _estimate_merges_kernel(codes, contexts, n_contexts, max_shift)
        check_status(status)
        return estimates
    parts = each(lambda span: _histogram(codes[span[0]:span[1]], contexts[span[0]:span[1]], n_contexts), ranges, threads)
    for status, _ in parts:
        check_status(status)
    return _merged_estimates(sum(histogram for _, histogram in parts), max_shift)


def estimated_bits(codes: np.ndarray, contexts: np.ndarray | None, n_contexts: int, threads: int = 1) -> float:
    """ideal_bits + table_bits in one pass: what encode's output will take at most, give or
    take the few bytes of header and final states. contexts None: every code in context 0
    (n_contexts 1)."""
    if contexts is None:
        _require_one_context(n_contexts)
        codes = _check_codes(codes)
        if len(spans(codes.size, threads)) == 1:
            status, bits = _estimate_one_context_kernel(codes)
            check_status(status)
            return float(bits)
        contexts = np.zeros(codes.size, np.uint8)
    return float(estimated_bits_by_merge(codes, contexts, n_contexts, 0, threads)[0])
