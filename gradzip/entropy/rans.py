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
with p = min(15, bit_length(N) + 2): full precision for big contexts, and small decode
tables (cheap to build) for small ones.  The encoder chooses per context what it sends: the
raw counts (N <= 2**15; frequencies summing to 2**15 above that), or the counts normalized
to a coarser total 2**precision, whichever makes table plus payload smallest.  Normalization is integer-only (round, then
move the rounding error one unit at a time to where it costs the fewest bits), so encoder
and decoder derive identical tables on any machine.

Coder.  rANS with a 64-bit state in [2**31, 2**63) (a signed int64 never overflows) and
32-bit renormalization, so each symbol moves at most one word.  Streams of 16384 or more
elements interleave 4 states (element i uses state i % 4) so the CPU overlaps their
dependency chains; shorter ones use 1 state to save the 24 bytes of extra final states.

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

# ---- model and rANS parameters -------------------------------------------------------

PROB_BITS = 15  # largest per-context total is 2**15
PROB_TOTAL = 1 << PROB_BITS
MAX_WEIGHT_BITS = PROB_BITS + 1  # a sent weight is <= 2**15
TOKEN_FIELD_BITS = 7  # span and implied are <= 111
K_FIELD_BITS = 4
PRECISION_FIELD_BITS = 4  # per table: 0 = default weights, else weights summing to 2**precision
RANS_LOW = 1 << 31  # the state lives in [RANS_LOW, 2**63)
WORD_MASK = 0xFFFFFFFF
MAX_LANES = 4
FEW_ELEMENTS = 1 << 14  # below this, one rANS state: 3 fewer 8-byte final states on small tensors


# ---- status codes returned by kernels ------------------------------------------------

OK = 0
ERR_MAGNITUDE_RANGE = 1
ERR_BITS_EXHAUSTED = 2
ERR_TABLE = 3
ERR_RANS_EXHAUSTED = 4
ERR_RANS_STATE = 5
ERR_TRAILING = 6
_MESSAGES = {
    ERR_BITS_EXHAUSTED: "bit section truncated",
    ERR_TABLE: "invalid frequency table",
    ERR_RANS_EXHAUSTED: "rANS section truncated",
    ERR_RANS_STATE: "rANS state out of range or not back at its initial value",
    ERR_TRAILING: "unused data at the end of a section",
}


# ---- small helpers -------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _lane_count(n):
    return 1 if n < FEW_ELEMENTS else MAX_LANES


@intrinsic
def _count_leading_zeros(typingctx, value):
    """llvm.ctlz on an int64 (64 for zero)."""
    if value != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

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
    """Returns (value, pos, acc, n_acc, status)."""
    unary = 0
    while True:
        if unary + k > MAX_WEIGHT_BITS:  # no valid weight is this long; keeps reads < 32 bits
            return 0, pos, acc, n_acc, ERR_TABLE
        bit, pos, acc, n_acc, ok = _get_bits(words, n_words, pos, acc, n_acc, 1)
        if not ok:
            return 0, pos, acc, n_acc, ERR_BITS_EXHAUSTED
        if bit:
            break
        unary += 1
    low, pos, acc, n_acc, ok = _get_bits(words, n_words, pos, acc, n_acc, unary + k)
    value = (np.int64(1) << (unary + k)) + low - (np.int64(1) << k)
    return value, pos, acc, n_acc, OK if ok else ERR_BITS_EXHAUSTED


@njit(cache=True, nogil=True, inline="always")
def _exp_golomb_cost(value, k):
    return 2 * (_bit_length(value + (np.int64(1) << k)) - 1) - k + 1


# ---- tokens and extra bits -----------------------------------------------------------
# The per-element loops avoid data-dependent branches (zero-bit reads and writes are
# no-ops): on fine-bound data whether an element is small or has extra bits is random.


@njit(cache=True, nogil=True)
def _magnitude_class(magnitude):
    octave = _bit_length(magnitude | DIRECT_LIMIT) - 1  # >= 4 keeps the shift valid
    half = (magnitude >> (octave - 1)) & 1
    large = DIRECT_LIMIT + 2 * (octave - 4) + half
    return magnitude if magnitude < DIRECT_LIMIT else large


@njit(cache=True, nogil=True)
def _tokenize(codes, contexts, tokens, histogram):
    """tokens[i] = token of codes[i]; histogram[context << TOKEN_SHIFT | token] += 1.
    Contexts must index histogram rows (the caller checks). Returns a status."""
    magnitude_bits = 0  # OR of all magnitudes: > MAX_MAGNITUDE iff one of them is
    for i in range(codes.size):
        q = np.int64(codes[i])
        magnitude = -q if q < 0 else q
        magnitude_bits |= magnitude
        cls = _magnitude_class(min(magnitude, MAX_MAGNITUDE))  # clamped: indexes stay valid
        token = 2 * cls - (magnitude != 0) + (q < 0)
        tokens[i] = token
        histogram[(np.int64(contexts[i]) << TOKEN_SHIFT) | token] += 1
    return ERR_MAGNITUDE_RANGE if magnitude_bits > MAX_MAGNITUDE else OK


@njit(cache=True, nogil=True)
def _write_extra_bits(codes, tokens, words, pos, acc, n_acc):
    """Append every element's extra bits; words needs a spare slot past the last full one."""
    for i in range(codes.size):
        n_bits = TOKEN_EXTRA_BITS[tokens[i]]
        q = np.int64(codes[i])
        magnitude = -q if q < 0 else q
        acc |= (magnitude & ((np.int64(1) << n_bits) - 1)) << n_acc
        n_acc += n_bits
        words[pos] = acc & WORD_MASK  # rewritten until the word is full
        full = n_acc >> 5
        pos += full
        acc >>= full << 5
        n_acc &= 31
    return pos, acc, n_acc


@njit(cache=True, nogil=True)
def _detokenize(tokens, words, n_words, pos, acc, n_acc, codes):
    """codes[i] from tokens[i] and the extra bits. words[n_words] must exist (a zero pad).
    Returns (pos, acc, n_acc, status)."""
    for i in range(tokens.size):
        token = tokens[i]
        n_bits = TOKEN_EXTRA_BITS[token]
        refill = n_acc < n_bits
        word = np.int64(words[min(pos, n_words)])  # clamped; pos > n_words is reported below
        acc |= (word << n_acc) if refill else 0
        n_acc += 32 if refill else 0
        pos += refill
        magnitude = TOKEN_BASE[token] + (acc & ((np.int64(1) << n_bits) - 1))
        acc >>= n_bits
        n_acc -= n_bits
        codes[i] = -magnitude if TOKEN_NEGATIVE[token] else magnitude
    return pos, acc, n_acc, ERR_BITS_EXHAUSTED if pos > n_words else OK


# ---- model: normalized frequencies ---------------------------------------------------


@njit(cache=True, nogil=True)
def _context_prob_bits(count):
    """log2 of the frequency total for a context with count elements."""
    return min(PROB_BITS, _bit_length(count) + 2)


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
        cost = 0
        for t in range(span):
            if t != implied:
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
        _normalize(histogram_row, count, PROB_BITS, sent)
    else:
        sent[:N_TOKENS] = histogram_row[:N_TOKENS]
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
            sent[:N_TOKENS] = trial
            freqs[:N_TOKENS] = trial_freqs
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
# The hot loops keep the states in a small array indexed by i % lanes (independent chains
# that the CPU overlaps) and do every array access in the loop body: helpers that take
# arrays get refcount calls around each use.  Renormalization is branch-free.


@njit(cache=True, nogil=True)
def _rans_encode(tokens, contexts, prob_bits, freqs, starts, lanes):
    """Encode tokens backwards; freqs/starts are flat, indexed (context << TOKEN_SHIFT) |
    token.  Returns the emitted words followed by the final states."""
    n = tokens.size
    words = np.empty(n + 2 * lanes + 1, np.uint32)  # <= one word per symbol, one spare
    states = np.full(lanes, RANS_LOW, np.int64)
    pos = 0
    for i in range(n - 1, -1, -1):
        lane = i & (lanes - 1)
        x = states[lane]
        context = np.int64(contexts[i])
        bits = prob_bits[context]
        k = (context << TOKEN_SHIFT) | np.int64(tokens[i])
        freq = freqs[k]
        # push 32 bits out first if the result would reach 2**63
        flush = (x >> (63 - bits)) >= freq
        words[pos] = x & WORD_MASK  # kept only if flush
        pos += flush
        x = x >> 32 if flush else x
        quotient = np.int64(np.uint64(x) // np.uint64(freq))  # unsigned: no floor fix-up
        states[lane] = (quotient << bits) + (x - quotient * freq) + starts[k]
    for lane in range(lanes):
        words[pos] = states[lane] & WORD_MASK
        words[pos + 1] = states[lane] >> 32
        pos += 2
    return words[:pos]


@njit(cache=True, nogil=True)
def _rans_decode(words, contexts, prob_bits, slot_base, slot_tokens, freqs, starts, lanes, tokens):
    """Inverse of _rans_encode: fills tokens, returns a status.  Context c's slot table is
    slot_tokens[slot_base[c] : slot_base[c] + 2**prob_bits[c]]."""
    pos = words.size
    if pos < 2 * lanes:
        return ERR_RANS_EXHAUSTED
    states = np.empty(lanes, np.int64)
    for lane in range(lanes - 1, -1, -1):
        high, low = np.int64(words[pos - 1]), np.int64(words[pos - 2])
        pos -= 2
        states[lane] = (high << 32) | low
        if high >> 31 or states[lane] < RANS_LOW:
            return ERR_RANS_STATE
    # decoding maps a state in [RANS_LOW, 2**63) to another whatever the data; only pos
    # can go wrong, and it is checked after the loop
    for i in range(tokens.size):
        lane = i & (lanes - 1)
        x = states[lane]
        context = np.int64(contexts[i])
        bits = prob_bits[context]
        slot = x & ((np.int64(1) << bits) - 1)
        token = np.int64(slot_tokens[slot_base[context] + slot])
        k = (context << TOKEN_SHIFT) | token
        x = freqs[k] * (x >> bits) + slot - starts[k]
        refill = x < RANS_LOW
        pos -= refill
        word = np.int64(words[max(pos, 0)])  # clamped; pos < 0 is reported below
        states[lane] = (x << 32) | word if refill else x
        tokens[i] = token
    if pos < 0:
        return ERR_RANS_EXHAUSTED
    for lane in range(lanes):
        if states[lane] != RANS_LOW:
            return ERR_RANS_STATE
    if pos != 0:
        return ERR_TRAILING
    return OK


# ---- whole-stream kernels ------------------------------------------------------------


@njit(cache=True, nogil=True)
def _count_tokens(codes, contexts, n_contexts):
    """(status, tokens, histogram[n_contexts, 2**TOKEN_SHIFT])."""
    tokens = np.empty(codes.size, np.uint8)
    histogram = np.zeros((n_contexts, 1 << TOKEN_SHIFT), np.int64)
    status = _tokenize(codes, contexts, tokens, histogram.reshape(-1))
    return status, tokens, histogram


@njit(cache=True, nogil=True)
def _encode_kernel(codes, contexts, n_contexts):
    """Returns (status, bit_words, rans_words)."""
    status, tokens, histogram = _count_tokens(codes, contexts, n_contexts)
    if status != OK:
        return status, np.empty(0, np.uint32), np.empty(0, np.uint32)
    prob_bits, precision, sent, freqs, starts = _build_model(histogram)

    max_table_bits = n_contexts * (PRECISION_FIELD_BITS + 2 * TOKEN_FIELD_BITS + K_FIELD_BITS + N_TOKENS * (2 * MAX_WEIGHT_BITS + 1))
    bit_words = np.empty((max_table_bits + MAX_EXTRA_BITS * codes.size) // 32 + 2, np.uint32)
    pos, acc, n_acc = _write_tables(precision, sent, bit_words, 0, np.int64(0), 0)
    pos, acc, n_acc = _write_extra_bits(codes, tokens, bit_words, pos, acc, n_acc)
    if n_acc > 0:
        bit_words[pos] = acc
        pos += 1

    lanes = _lane_count(codes.size)
    rans_words = _rans_encode(tokens, contexts, prob_bits, freqs.reshape(-1), starts.reshape(-1), lanes)
    return OK, bit_words[:pos], rans_words


@njit(cache=True, nogil=True)
def _decode_kernel(bit_words, n_bit_words, rans_words, contexts, n_contexts, codes):
    """Fills codes; returns a status.  bit_words[n_bit_words] is a zero pad word."""
    counts = np.zeros(n_contexts, np.int64)
    for i in range(contexts.size):
        counts[contexts[i]] += 1

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
        if not ok:
            return ERR_BITS_EXHAUSTED
        if precision > prob_bits[c]:
            return ERR_TABLE
        total = min(counts[c], PROB_TOTAL) if precision == 0 else np.int64(1) << precision
        pos, acc, n_acc, status = _read_table(bit_words, n_bit_words, pos, acc, n_acc, total, weights)
        if status != OK:
            return status
        _normalize(weights, total, prob_bits[c], freqs[c])
        _cumulative(freqs[c], starts[c])
        for t in range(N_TOKENS):  # freqs sum to 2**prob_bits: every slot gets a token
            first = slot_base[c] + starts[c, t]
            slot_tokens[first : first + freqs[c, t]] = t

    tokens = np.empty(codes.size, np.uint8)
    lanes = _lane_count(codes.size)
    flat_freqs, flat_starts = freqs.reshape(-1), starts.reshape(-1)
    status = _rans_decode(
        rans_words, contexts, prob_bits, slot_base, slot_tokens, flat_freqs, flat_starts, lanes, tokens
    )
    if status != OK:
        return status
    pos, acc, n_acc, status = _detokenize(tokens, bit_words, n_bit_words, pos, acc, n_acc, codes)
    if status != OK:
        return status
    if pos != n_bit_words or acc != 0:
        return ERR_TRAILING
    return OK


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
            _normalize(histogram[c], count, PROB_BITS, freqs)
            bits += PRECISION_FIELD_BITS + _table_layout(freqs)[3]
        elif count > 0:
            bits += PRECISION_FIELD_BITS + _table_layout(histogram[c])[3]
    return bits


@njit(cache=True, nogil=True)
def _ideal_bits_kernel(codes, contexts, n_contexts):
    status, tokens, histogram = _count_tokens(codes, contexts, n_contexts)
    return status, _histogram_ideal_bits(histogram)


@njit(cache=True, nogil=True)
def _table_bits_kernel(codes, contexts, n_contexts):
    status, tokens, histogram = _count_tokens(codes, contexts, n_contexts)
    return status, _histogram_table_bits(histogram)


@njit(cache=True, nogil=True)
def _estimate_kernel(codes, contexts, n_contexts):
    """(status, ideal payload bits + table bits) from one tokenizing pass."""
    status, tokens, histogram = _count_tokens(codes, contexts, n_contexts)
    return status, _histogram_ideal_bits(histogram) + _histogram_table_bits(histogram)


# ---- public API ----------------------------------------------------------------------


def _for_kernels(array):
    """Contiguous and writable: read-only arrays would compile (and cache) another
    specialization of every kernel."""
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


def _check_codes(codes):
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise ValueError("codes must be a 1-D integer array")
    if codes.dtype != np.int32:
        if codes.size and (codes.min() < -MAX_MAGNITUDE or codes.max() > MAX_MAGNITUDE):
            raise ValueError(f"codes must satisfy |q| <= {MAX_MAGNITUDE}")
        codes = codes.astype(np.int32)
    return _for_kernels(codes)


def _check_status(status):
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


def _read_varint(data: np.ndarray) -> tuple[int, int]:
    """(value, bytes used) of the LEB128 varint at the start of data."""
    value = 0
    for i in range(min(data.size, 5)):  # 5 bytes hold any word count we can produce
        value |= int(data[i] & 0x7F) << (7 * i)
        if not data[i] & 0x80:
            if i > 0 and data[i] == 0:
                raise CorruptStreamError("non-canonical varint")
            return value, i + 1
    raise CorruptStreamError("truncated or oversized varint")


def encode(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> bytes:
    """Encode 1-D signed codes (|q| < 2**24), each modelled under its uint8 context
    (< n_contexts <= 256).  The decoder needs the same contexts."""
    codes = _check_codes(codes)
    contexts = _check_contexts(contexts, n_contexts, codes.size)
    if codes.size == 0:
        return b""
    status, bit_words, rans_words = _encode_kernel(codes, contexts, n_contexts)
    _check_status(status)
    header = _varint(bit_words.size)
    rans_start = len(header) + 4 * bit_words.size
    out = np.empty(rans_start + 4 * rans_words.size, np.uint8)
    out[: len(header)] = np.frombuffer(header, np.uint8)
    out[len(header) : rans_start] = bit_words.astype("<u4", copy=False).view(np.uint8)
    out[rans_start:] = rans_words.astype("<u4", copy=False).view(np.uint8)
    return out.tobytes()


def decode(data: bytes | memoryview, contexts: np.ndarray, n_contexts: int) -> np.ndarray:
    """Inverse of encode given the same contexts and n_contexts: an int32 array with one
    code per context.  Raises CorruptStreamError if data is damaged or does not match."""
    contexts = _check_contexts(contexts, n_contexts)
    raw = np.frombuffer(data, dtype=np.uint8)
    codes = np.empty(contexts.size, np.int32)
    if contexts.size == 0:
        if raw.size:
            raise CorruptStreamError("data for an empty array")
        return codes
    n_bit_words, offset = _read_varint(raw)
    rans_start = offset + 4 * n_bit_words
    if rans_start > raw.size or (raw.size - rans_start) % 4:
        raise CorruptStreamError("section lengths do not match the data size")
    # copies: aligned native-endian arrays for the kernels, the bit section with a zero pad
    bit_words = np.zeros(n_bit_words + 1, np.uint32)
    bit_words[:n_bit_words] = raw[offset:rans_start].view("<u4")
    rans_words = raw[rans_start:].view("<u4").astype(np.uint32)
    _check_status(_decode_kernel(bit_words, n_bit_words, rans_words, contexts, n_contexts, codes))
    return codes


def ideal_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> float:
    """Ideal code length in bits of codes under this coder's model (per-context empirical
    token distributions plus raw extra bits), excluding the frequency tables."""
    codes = _check_codes(codes)
    contexts = _check_contexts(contexts, n_contexts, codes.size)
    status, bits = _ideal_bits_kernel(codes, contexts, n_contexts)
    _check_status(status)
    return float(bits)


def table_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> int:
    """Bits the frequency tables take at the default precision: an upper bound of what encode
    writes, as it may choose coarser tables.  The rest of a stream is the payload that
    ideal_bits estimates (plus the cost of any coarser table) and overhead: a <= 5-byte
    header, padding, and the final rANS states (8 bytes each; 4 states from 16384 elements
    on, else 1)."""
    codes = _check_codes(codes)
    contexts = _check_contexts(contexts, n_contexts, codes.size)
    status, bits = _table_bits_kernel(codes, contexts, n_contexts)
    _check_status(status)
    return int(bits)


def estimated_bits(codes: np.ndarray, contexts: np.ndarray, n_contexts: int) -> float:
    """ideal_bits + table_bits in one pass: what encode's output will take at most, give or
    take the few bytes of header and final states."""
    codes = _check_codes(codes)
    contexts = _check_contexts(contexts, n_contexts, codes.size)
    status, bits = _estimate_kernel(codes, contexts, n_contexts)
    _check_status(status)
    return float(bits)
