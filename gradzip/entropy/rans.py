"""Context-conditional static rANS coder for signed integer codes.

Each code q is split into a *token* (modelled per context) and raw *extra bits*:

    token 0             q == 0
    token 2*c - 1       q > 0 with magnitude class c
    token 2*c           q < 0 with magnitude class c

Magnitude classes: |q| in 1..15 is its own class (c = |q|, no extra bits).  A larger |q|
with e = floor(log2 |q|) (4..23) gets class c = 16 + 2*(e - 4) + h, where h is the bit just
below the leading one; the remaining e - 1 low bits are written raw.  Keeping h in the token
halves each raw bucket, which recovers most of what raw bits lose on a decaying (Laplacian)
tail.  This gives 56 classes and N_TOKENS = 111 tokens; |q| < 2**24.  The sign lives in the
token, so a caller that orients q by a predicted sign gets that sign modelled per context.

Probability model: per context, the empirical token counts normalized to PROB_TOTAL = 2**15
(integer-only greedy rounding, so encoder and decoder build identical tables anywhere).
The coder: rANS, 64-bit state in [2**31, 2**63), 32-bit renormalization, four interleaved
states (element i uses state i % 4; fewer than 4 elements still flush all four).

Byte layout of one stream (all multi-byte words little-endian uint32):

    varint   n_bit_words        LEB128, number of words in the bit section
    bit section                 n_bit_words words; bits packed LSB-first
        for each context that occurs in `contexts`, in increasing context order:
            7 bits   span       tokens 0..span-1 may occur (1..111)
            7 bits   implied    token whose weight is not sent (< span)
            4 bits   k          Exp-Golomb order of the weights below
            for t in 0..span-1, t != implied:
                     weight[t]  Exp-Golomb-k (u zero bits, a one bit, u + k low bits)
            weight[implied] = W - sum(others), must be >= 1
          W = min(N, PROB_TOTAL) with N = the number of elements in that context (the
          decoder knows N from `contexts`).  If N > PROB_TOTAL the weights are the normalized
          frequencies themselves; otherwise they are the raw counts, which are cheaper for
          small contexts, and both sides normalize them the same way.
        then the extra bits of every element in element order (token order: none for
        tokens below 31, i.e. |q| < 16)
        zero padding to a whole word
    rANS section                the remaining bytes, a multiple of 4:
        the words the encoder emitted while renormalizing (it runs from the last element
        to the first), then the four final states, each as (low word, high word), state 0
        first.  The decoder reads this section backwards from the end.

An empty input (n == 0) encodes to b"".  The decoder checks every index, the table sums,
the state range, that every state ends at its initial value 2**31, that both sections are
consumed exactly and that the padding bits are zero; any mismatch raises
CorruptStreamError.  Contexts are not stored: the decoder is given the same array.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..errors import CorruptStreamError

# ---- token alphabet ------------------------------------------------------------------

DIRECT_LIMIT = 16  # magnitudes below this are tokens of their own
MAX_MAGNITUDE = (1 << 24) - 1
N_CLASSES = DIRECT_LIMIT + 2 * (23 - 4 + 1)  # zero, 1..15, two halves of octaves 4..23
N_TOKENS = 2 * N_CLASSES - 1  # 111: zero plus a signed token per nonzero class
TOKEN_FIELD_BITS = 7  # enough for span and implied (<= 111)
K_FIELD_BITS = 4


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

# ---- rANS parameters -----------------------------------------------------------------

PROB_BITS = 15
PROB_TOTAL = 1 << PROB_BITS
MAX_WEIGHT_BITS = PROB_BITS + 1  # weights are <= PROB_TOTAL: at most this many bits
RANS_LOW = 1 << 31  # state lives in [RANS_LOW, 2**63): fits a signed int64
RENORM_SHIFT = 63 - PROB_BITS  # encoder flushes when x >> RENORM_SHIFT >= freq
LANES = 4
WORD_MASK = 0xFFFFFFFF

# ---- status codes returned by kernels ------------------------------------------------

OK = 0
ERR_CONTEXT_RANGE = 1
ERR_MAGNITUDE_RANGE = 2
ERR_BITS_EXHAUSTED = 3
ERR_TABLE = 4
ERR_RANS_EXHAUSTED = 5
ERR_RANS_STATE = 6
ERR_TRAILING = 7
_MESSAGES = {
    ERR_BITS_EXHAUSTED: "bit section truncated",
    ERR_TABLE: "invalid frequency table",
    ERR_RANS_EXHAUSTED: "rANS section truncated",
    ERR_RANS_STATE: "rANS state out of range or not back at its initial value",
    ERR_TRAILING: "unused data at the end of a section",
}


# ---- small helpers -------------------------------------------------------------------


@intrinsic
def _count_leading_zeros(typingctx, value):
    """llvm.ctlz on an int64 (64 for zero)."""
    if value != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.int64(types.int64), codegen


@njit(cache=True, inline="always")
def _bit_length(value):
    return 64 - _count_leading_zeros(np.int64(value))


@njit(cache=True, inline="always")
def _magnitude_class(magnitude):
    if magnitude < DIRECT_LIMIT:
        return magnitude
    octave = _bit_length(magnitude) - 1
    half = (magnitude >> (octave - 1)) & 1
    return DIRECT_LIMIT + 2 * (octave - 4) + half


@njit(cache=True, inline="always")
def _put_bits(words, pos, acc, n_acc, value, n_bits):
    """Append n_bits (<= 31) of value LSB-first; full words go to words[pos]."""
    acc |= value << n_acc
    n_acc += n_bits
    if n_acc >= 32:
        words[pos] = acc & WORD_MASK
        pos += 1
        acc >>= 32
        n_acc -= 32
    return pos, acc, n_acc


@njit(cache=True, inline="always")
def _get_bits(words, pos, acc, n_acc, n_bits):
    """Read n_bits (<= 31); returns (value, pos, acc, n_acc, ok). Never reads past words."""
    if n_acc < n_bits:
        if pos < words.size:
            acc |= np.int64(words[pos]) << n_acc
            pos += 1
            n_acc += 32
        if n_acc < n_bits:
            return 0, pos, acc, n_acc, False
    value = acc & ((np.int64(1) << n_bits) - 1)
    return value, pos, acc >> n_bits, n_acc - n_bits, True


@njit(cache=True)
def _put_exp_golomb(words, pos, acc, n_acc, value, k):
    shifted = value + (np.int64(1) << k)
    n_low = _bit_length(shifted) - 1  # bits below the leading one
    unary = n_low - k
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, np.int64(1) << unary, unary + 1)
    return _put_bits(words, pos, acc, n_acc, shifted - (np.int64(1) << n_low), n_low)


@njit(cache=True)
def _get_exp_golomb(words, pos, acc, n_acc, k):
    """Returns (value, pos, acc, n_acc, status)."""
    unary = 0
    while True:
        if unary + k > MAX_WEIGHT_BITS:  # no valid weight is this long; keeps reads < 32 bits
            return 0, pos, acc, n_acc, ERR_TABLE
        bit, pos, acc, n_acc, ok = _get_bits(words, pos, acc, n_acc, 1)
        if not ok:
            return 0, pos, acc, n_acc, ERR_BITS_EXHAUSTED
        if bit:
            break
        unary += 1
    low, pos, acc, n_acc, ok = _get_bits(words, pos, acc, n_acc, unary + k)
    value = (np.int64(1) << (unary + k)) + low - (np.int64(1) << k)
    return value, pos, acc, n_acc, OK if ok else ERR_BITS_EXHAUSTED


# ---- model: counts and normalized frequencies ----------------------------------------


@njit(cache=True)
def _tokenize(codes, contexts, n_contexts, tokens, histogram):
    """tokens[i] = token of codes[i]; histogram[context, token] += 1. Returns a status."""
    bad_magnitude = False
    bad_context = False
    for i in range(codes.size):
        q = np.int64(codes[i])
        context = np.int64(contexts[i])
        magnitude = -q if q < 0 else q
        bad_magnitude |= magnitude > MAX_MAGNITUDE
        bad_context |= context >= n_contexts
        if bad_magnitude or bad_context:
            break
        cls = _magnitude_class(magnitude)
        token = 2 * cls - (magnitude != 0) + (q < 0)
        tokens[i] = token
        histogram[context, token] += 1
    if bad_context:
        return ERR_CONTEXT_RANGE
    if bad_magnitude:
        return ERR_MAGNITUDE_RANGE
    return OK


@njit(cache=True)
def _normalize(weights, total, freqs):
    """Scale weights (sum = total >= 1) to freqs summing to PROB_TOTAL, every nonzero
    weight keeping freq >= 1. Integer-only so both sides agree bit-exactly; the rounding
    error is then moved greedily where it costs the fewest bits (d bits ~ w / f)."""
    assigned = 0
    for t in range(N_TOKENS):
        freqs[t] = 0
        if weights[t] > 0:
            freqs[t] = max(1, (weights[t] * PROB_TOTAL + total // 2) // total)
            assigned += freqs[t]
    while assigned < PROB_TOTAL:  # give a unit to the token gaining most: max w/(f + 1/2)
        best = -1
        for t in range(N_TOKENS):
            if weights[t] > 0 and (
                best < 0 or weights[t] * (2 * freqs[best] + 1) > weights[best] * (2 * freqs[t] + 1)
            ):
                best = t
        freqs[best] += 1
        assigned += 1
    while assigned > PROB_TOTAL:  # take a unit from the token losing least: min w/(f - 1/2)
        best = -1
        for t in range(N_TOKENS):
            if freqs[t] > 1 and (
                best < 0 or weights[t] * (2 * freqs[best] - 1) < weights[best] * (2 * freqs[t] - 1)
            ):
                best = t
        freqs[best] -= 1
        assigned -= 1


@njit(cache=True)
def _cumulative(freqs, starts):
    running = 0
    for t in range(freqs.size):
        starts[t] = running
        running += freqs[t]


# ---- table serialization -------------------------------------------------------------


@njit(cache=True)
def _exp_golomb_cost(value, k):
    return 2 * (_bit_length(value + (np.int64(1) << k)) - 1) - k + 1


@njit(cache=True)
def _write_table(words, pos, acc, n_acc, weights):
    """Write one context's weights (see module docstring)."""
    span = 0
    implied = 0
    for t in range(N_TOKENS):
        if weights[t] > 0:
            span = t + 1
            if weights[t] > weights[implied]:
                implied = t
    best_k, best_cost = 0, np.int64(1) << 62
    for k in range(1 << K_FIELD_BITS):
        cost = 0
        for t in range(span):
            if t != implied:
                cost += _exp_golomb_cost(weights[t], k)
        if cost < best_cost:
            best_k, best_cost = k, cost
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, span, TOKEN_FIELD_BITS)
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, implied, TOKEN_FIELD_BITS)
    pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, best_k, K_FIELD_BITS)
    for t in range(span):
        if t != implied:
            pos, acc, n_acc = _put_exp_golomb(words, pos, acc, n_acc, weights[t], best_k)
    return pos, acc, n_acc


@njit(cache=True)
def _read_table(words, pos, acc, n_acc, total, weights):
    """Inverse of _write_table for a context whose weights sum to total. Returns
    (pos, acc, n_acc, status)."""
    span, pos, acc, n_acc, ok1 = _get_bits(words, pos, acc, n_acc, TOKEN_FIELD_BITS)
    implied, pos, acc, n_acc, ok2 = _get_bits(words, pos, acc, n_acc, TOKEN_FIELD_BITS)
    k, pos, acc, n_acc, ok3 = _get_bits(words, pos, acc, n_acc, K_FIELD_BITS)
    if not (ok1 and ok2 and ok3):
        return pos, acc, n_acc, ERR_BITS_EXHAUSTED
    if span < 1 or span > N_TOKENS or implied >= span:
        return pos, acc, n_acc, ERR_TABLE
    weights[:] = 0
    remaining = total
    for t in range(span):
        if t == implied:
            continue
        weight, pos, acc, n_acc, status = _get_exp_golomb(words, pos, acc, n_acc, k)
        if status != OK:
            return pos, acc, n_acc, status
        if weight >= remaining:  # the implied token must keep weight >= 1
            return pos, acc, n_acc, ERR_TABLE
        weights[t] = weight
        remaining -= weight
    weights[implied] = remaining
    return pos, acc, n_acc, OK


# ---- extra bits ----------------------------------------------------------------------


@njit(cache=True)
def _write_extra_bits(codes, tokens, words, pos, acc, n_acc):
    for i in range(codes.size):
        n_bits = TOKEN_EXTRA_BITS[tokens[i]]
        if n_bits:
            q = np.int64(codes[i])
            magnitude = -q if q < 0 else q
            low = magnitude & ((np.int64(1) << n_bits) - 1)
            pos, acc, n_acc = _put_bits(words, pos, acc, n_acc, low, n_bits)
    return pos, acc, n_acc


@njit(cache=True)
def _detokenize(tokens, words, pos, acc, n_acc, codes):
    """codes[i] from tokens[i] and the extra bits. Returns (pos, acc, n_acc, status)."""
    for i in range(tokens.size):
        token = tokens[i]
        magnitude = TOKEN_BASE[token]
        n_bits = TOKEN_EXTRA_BITS[token]
        if n_bits:
            low, pos, acc, n_acc, ok = _get_bits(words, pos, acc, n_acc, n_bits)
            if not ok:
                return pos, acc, n_acc, ERR_BITS_EXHAUSTED
            magnitude += low
        codes[i] = -magnitude if TOKEN_NEGATIVE[token] else magnitude
    return pos, acc, n_acc, OK


# ---- rANS core -----------------------------------------------------------------------


@njit(cache=True, inline="always")
def _rans_put(x, freq, start, words, pos):
    """Encode one symbol into state x, first pushing 32 bits out if x would overflow."""
    if (x >> RENORM_SHIFT) >= freq:
        words[pos] = x & WORD_MASK
        pos += 1
        x >>= 32
    return ((x // freq) << PROB_BITS) + (x % freq) + start, pos


@njit(cache=True)
def _rans_encode(tokens, contexts, freqs, starts):
    """Encode tokens backwards with LANES interleaved states; returns the emitted words
    followed by the final states."""
    n = tokens.size
    words = np.empty(n + 2 * LANES, np.uint32)  # at most one word per symbol
    pos = 0
    x0 = x1 = x2 = x3 = np.int64(RANS_LOW)
    full = n - n % LANES
    for i in range(n - 1, full - 1, -1):  # the ragged tail (lanes 0..2) comes last
        c, t = contexts[i], tokens[i]
        lane = i % LANES
        if lane == 0:
            x0, pos = _rans_put(x0, freqs[c, t], starts[c, t], words, pos)
        elif lane == 1:
            x1, pos = _rans_put(x1, freqs[c, t], starts[c, t], words, pos)
        else:
            x2, pos = _rans_put(x2, freqs[c, t], starts[c, t], words, pos)
    for i in range(full - LANES, -1, -LANES):
        c, t = contexts[i + 3], tokens[i + 3]
        x3, pos = _rans_put(x3, freqs[c, t], starts[c, t], words, pos)
        c, t = contexts[i + 2], tokens[i + 2]
        x2, pos = _rans_put(x2, freqs[c, t], starts[c, t], words, pos)
        c, t = contexts[i + 1], tokens[i + 1]
        x1, pos = _rans_put(x1, freqs[c, t], starts[c, t], words, pos)
        c, t = contexts[i], tokens[i]
        x0, pos = _rans_put(x0, freqs[c, t], starts[c, t], words, pos)
    for x in (x0, x1, x2, x3):
        words[pos] = x & WORD_MASK
        words[pos + 1] = x >> 32
        pos += 2
    return words[:pos]


@njit(cache=True, inline="always")
def _rans_get(x, row, slot_tokens, freqs, starts, words, pos):
    """Decode one symbol from x, then refill from words[pos - 1] if x fell below RANS_LOW.
    Returns (token, x, pos); pos < 0 flags a read past the start (the index is clamped)."""
    slot = x & (PROB_TOTAL - 1)
    token = slot_tokens[row, slot]
    x = freqs[row, token] * (x >> PROB_BITS) + slot - starts[row, token]
    if x < RANS_LOW:
        pos -= 1
        x = (x << 32) | np.int64(words[max(pos, 0)])
    return token, x, pos


@njit(cache=True)
def _read_state(words, pos):
    """The state stored as (low, high) at words[pos - 2 : pos]; -1 if out of range."""
    high = np.int64(words[pos - 1])
    if high >> 31:
        return -1
    x = (high << 32) | np.int64(words[pos - 2])
    return x if x >= RANS_LOW else -1


@njit(cache=True)
def _rans_decode(words, contexts, dense_context, slot_tokens, freqs, starts, tokens):
    """Inverse of _rans_encode; fills tokens. Returns a status."""
    n = tokens.size
    pos = words.size
    if pos < 2 * LANES:
        return ERR_RANS_EXHAUSTED
    x3 = _read_state(words, pos)
    x2 = _read_state(words, pos - 2)
    x1 = _read_state(words, pos - 4)
    x0 = _read_state(words, pos - 6)
    if min(min(x0, x1), min(x2, x3)) < 0:
        return ERR_RANS_STATE
    pos -= 2 * LANES
    full = n - n % LANES
    for i in range(0, full, LANES):
        tokens[i], x0, pos = _rans_get(x0, dense_context[contexts[i]], slot_tokens, freqs, starts, words, pos)
        tokens[i + 1], x1, pos = _rans_get(x1, dense_context[contexts[i + 1]], slot_tokens, freqs, starts, words, pos)
        tokens[i + 2], x2, pos = _rans_get(x2, dense_context[contexts[i + 2]], slot_tokens, freqs, starts, words, pos)
        tokens[i + 3], x3, pos = _rans_get(x3, dense_context[contexts[i + 3]], slot_tokens, freqs, starts, words, pos)
    for i in range(full, n):
        row = dense_context[contexts[i]]
        lane = i % LANES
        if lane == 0:
            tokens[i], x0, pos = _rans_get(x0, row, slot_tokens, freqs, starts, words, pos)
        elif lane == 1:
            tokens[i], x1, pos = _rans_get(x1, row, slot_tokens, freqs, starts, words, pos)
        else:
            tokens[i], x2, pos = _rans_get(x2, row, slot_tokens, freqs, starts, words, pos)
    if pos < 0:
        return ERR_RANS_EXHAUSTED
    if x0 != RANS_LOW or x1 != RANS_LOW or x2 != RANS_LOW or x3 != RANS_LOW:
        return ERR_RANS_STATE
    if pos != 0:
        return ERR_TRAILING
    return OK


# ---- whole-stream kernels ------------------------------------------------------------


@njit(cache=True)
def _encode_kernel(codes, contexts, n_contexts):
    """Returns (status, bit_words, rans_words)."""
    n = codes.size
    tokens = np.empty(n, np.uint8)
    histogram = np.zeros((n_contexts, N_TOKENS), np.int64)
    status = _tokenize(codes, contexts, n_contexts, tokens, histogram)
    if status != OK:
        return status, np.empty(0, np.uint32), np.empty(0, np.uint32)

    freqs = np.zeros((n_contexts, N_TOKENS), np.int64)
    starts = np.zeros((n_contexts, N_TOKENS), np.int64)
    max_table_bits = n_contexts * (3 * TOKEN_FIELD_BITS + N_TOKENS * 2 * (PROB_BITS + 2))
    bit_words = np.empty((max_table_bits + 22 * n) // 32 + 2, np.uint32)
    pos, acc, n_acc = 0, np.int64(0), 0
    for c in range(n_contexts):
        count = histogram[c].sum()
        if count == 0:
            continue
        _normalize(histogram[c], count, freqs[c])
        _cumulative(freqs[c], starts[c])
        sent = freqs[c] if count > PROB_TOTAL else histogram[c]
        pos, acc, n_acc = _write_table(bit_words, pos, acc, n_acc, sent)
    pos, acc, n_acc = _write_extra_bits(codes, tokens, bit_words, pos, acc, n_acc)
    if n_acc > 0:
        bit_words[pos] = acc
        pos += 1
    return OK, bit_words[:pos], _rans_encode(tokens, contexts, freqs, starts)


@njit(cache=True)
def _count_contexts(contexts, n_contexts):
    """Elements per context, or an empty array if a context is out of range."""
    counts = np.zeros(n_contexts, np.int64)
    for i in range(contexts.size):
        c = contexts[i]
        if c >= n_contexts:
            return np.empty(0, np.int64)
        counts[c] += 1
    return counts


@njit(cache=True)
def _decode_kernel(bit_words, rans_words, contexts, counts, codes):
    """Fills codes; returns a status."""
    n_used = 0
    dense_context = np.zeros(counts.size, np.int64)
    for c in range(counts.size):
        if counts[c] > 0:
            dense_context[c] = n_used
            n_used += 1
    freqs = np.zeros((n_used, N_TOKENS), np.int64)
    starts = np.zeros((n_used, N_TOKENS), np.int64)
    slot_tokens = np.empty((n_used, PROB_TOTAL), np.uint8)
    weights = np.zeros(N_TOKENS, np.int64)
    pos, acc, n_acc = 0, np.int64(0), 0
    for c in range(counts.size):
        if counts[c] == 0:
            continue
        row = dense_context[c]
        total = min(counts[c], PROB_TOTAL)
        pos, acc, n_acc, status = _read_table(bit_words, pos, acc, n_acc, total, weights)
        if status != OK:
            return status
        _normalize(weights, total, freqs[row])
        _cumulative(freqs[row], starts[row])
        for t in range(N_TOKENS):  # sums to PROB_TOTAL by construction of _normalize
            slot_tokens[row, starts[row, t] : starts[row, t] + freqs[row, t]] = t

    tokens = np.empty(codes.size, np.uint8)
    status = _rans_decode(rans_words, contexts, dense_context, slot_tokens, freqs, starts, tokens)
    if status != OK:
        return status
    pos, acc, n_acc, status = _detokenize(tokens, bit_words, pos, acc, n_acc, codes)
    if status != OK:
        return status
    if pos != bit_words.size or acc != 0:
        return ERR_TRAILING
    return OK


@njit(cache=True)
def _ideal_bits_kernel(codes, contexts, n_contexts):
    n = codes.size
    tokens = np.empty(n, np.uint8)
    histogram = np.zeros((n_contexts, N_TOKENS), np.int64)
    status = _tokenize(codes, contexts, n_contexts, tokens, histogram)
    bits = 0.0
    for c in range(n_contexts):
        count = histogram[c].sum()
        for t in range(N_TOKENS):
            k = histogram[c, t]
            if k > 0:
                bits += k * (np.log2(count / k) + TOKEN_EXTRA_BITS[t])
    return status, bits


# ---- public API ----------------------------------------------------------------------


def _check_inputs(contexts, n_contexts, n_codes=None):
    if not 1 <= n_contexts <= 256:
        raise ValueError(f"n_contexts must be in 1..256, got {n_contexts}")
    contexts = np.asarray(contexts)
    if contexts.ndim != 1 or contexts.dtype != np.uint8:
        raise ValueError("contexts must be a 1-D uint8 array")
    if n_codes is not None and contexts.size != n_codes:
        raise ValueError(f"{n_codes} codes but {contexts.size} contexts")
    return np.ascontiguousarray(contexts)


def _check_codes(codes):
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise ValueError("codes must be a 1-D integer array")
    if codes.dtype != np.int32:
        if codes.size and (codes.min() < -MAX_MAGNITUDE or codes.max() > MAX_MAGNITUDE):
            raise ValueError(f"codes must satisfy |q| <= {MAX_MAGNITUDE}")
        codes = codes.astype(np.int32)
    return np.ascontiguousarray(codes)


def _raise_input_status(status):
    if status == ERR_CONTEXT_RANGE:
        raise ValueError("a context is >= n_contexts")
    if status == ERR_MAGNITUDE_RANGE:
        raise ValueError(f"codes must satisfy |q| <= {MAX_MAGNITUDE}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: np.ndarray) -> tuple[int, int]:
    """(value, bytes used) of the LEB128 varint at the start of data."""
    value = 0
    for i in range(min(data.size, 5)):  # a word count below 2**35 is plenty
        value |= int(data[i] & 0x7F) << (7 * i)
        if not data[i] & 0x80:
            if i > 0 and data[i] == 0:
                raise CorruptStreamError("non-canonical varint")
            return value, i + 1
    raise CorruptStreamError("truncated or oversized varint")


def encode(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> bytes:
    """Encode 1-D signed codes (|q| < 2**24), each modelled under its uint8 context."""
    codes = _check_codes(codes)
    contexts = _check_inputs(contexts, n_contexts, codes.size)
    if codes.size == 0:
        return b""
    status, bit_words, rans_words = _encode_kernel(codes, contexts, n_contexts)
    _raise_input_status(status)
    return b"".join(
        (_varint(bit_words.size), bit_words.astype("<u4").tobytes(), rans_words.astype("<u4").tobytes())
    )


def decode(data: bytes | memoryview, contexts: np.ndarray, n_contexts: int) -> np.ndarray:
    """Inverse of encode given the same contexts; raises CorruptStreamError on bad data."""
    contexts = _check_inputs(contexts, n_contexts)
    raw = np.frombuffer(data, dtype=np.uint8)
    codes = np.empty(contexts.size, np.int32)
    if contexts.size == 0:
        if raw.size:
            raise CorruptStreamError("data for an empty array")
        return codes
    counts = _count_contexts(contexts, n_contexts)
    if counts.size == 0:
        raise ValueError("a context is >= n_contexts")
    n_bit_words, offset = _read_varint(raw)
    rans_start = offset + 4 * n_bit_words
    if rans_start > raw.size or (raw.size - rans_start) % 4:
        raise CorruptStreamError("section lengths do not match the data size")
    # copies: aligned, native-endian, writable arrays for the kernels
    bit_words = raw[offset:rans_start].view("<u4").astype(np.uint32)
    rans_words = raw[rans_start:].view("<u4").astype(np.uint32)
    status = _decode_kernel(bit_words, rans_words, contexts, counts, codes)
    if status != OK:
        raise CorruptStreamError(_MESSAGES[status])
    return codes


def ideal_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> float:
    """Ideal code length in bits of codes under this coder's model (per-context empirical
    token distributions plus raw extra bits), excluding the frequency tables."""
    codes = _check_codes(codes)
    contexts = _check_inputs(contexts, n_contexts, codes.size)
    status, bits = _ideal_bits_kernel(codes, contexts, n_contexts)
    _raise_input_status(status)
    return float(bits)
