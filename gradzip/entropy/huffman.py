"""Canonical Huffman coding of quantization codes (gradzip's entropy stage, as in SZ3).

``encode`` turns a 1-D array of non-negative integer symbols (at most
``MAX_SYMBOL``) into a self-describing byte string; ``decode`` turns it back,
given the symbol count the caller recorded. No general-purpose compression is
applied here: a separate lossless stage (zstd) runs on the result.

Byte layout
-----------
Every integer marked *varint* is unsigned LEB128 (7 bits per byte, low group
first, high bit set on all but the last byte) in its shortest form, at most 9
bytes.

====================  ======================================================
field                 contents
====================  ======================================================
version               1 byte, ``FORMAT_VERSION`` (1)
count                 varint: number of symbols encoded
n_distinct            varint: number of distinct symbols (0 iff count is 0)
nbits                 varint: length of the bitstream in bits
symbol ids            n_distinct varints, symbols in ascending order: the
                      first symbol itself, then each symbol's gap to the
                      previous one minus 1 (so a dense alphabet costs 1 byte
                      per symbol)
code lengths          n_distinct bytes, the code length of each symbol in the
                      same order: 1..MAX_CODE_LENGTH, or a single 0 when there
                      is only one distinct symbol (its code is empty)
bitstream             ceil(nbits / 8) bytes: the code of every symbol in
                      input order, most significant bit first, the last byte
                      padded with zero bits; it ends exactly at the end of
                      the data
====================  ======================================================

Codes are canonical (assigned in increasing order of (length, symbol), as in
DEFLATE), so the lengths alone define them. For two or more distinct symbols
the lengths must form a complete prefix code (Kraft sum exactly 1); the
decoder rejects anything else, so every bit pattern decodes to a symbol.

Code lengths are limited to ``MAX_CODE_LENGTH`` = 24 bits. Longer codes
would only serve symbols rarer than 2**-24, where they save next to nothing;
with 24 the encoder's 64-bit accumulator always has room for a code next to
its < 32 pending bits, the decoder's >= 57 buffered bits always hold the next
code, and the alphabet is capped at 2**24 distinct symbols. Lengths come from
Moffat and Katajainen's in-place Huffman algorithm; when the optimal tree is
deeper than the limit, frequencies below a floor are raised to it and the
tree rebuilt, with the lowest floor that fits (Brotli's approach, plus a
bisection). That is always correct and, because it only touches the rarest
symbols, costs a negligible fraction of a bit per symbol.

The decoder looks up the next ``PRIMARY_TABLE_BITS`` bits in a table that
yields the symbol and length of every code that short; for a longer code the
entry gives the shortest length with that prefix, and a canonical search over
lengths continues from there. The decoder checks every field against the
data before allocating anything sized by it; the only allocation it cannot
bound by the data is the output itself (``count`` values), which is why the
caller supplies ``count`` and the stream must agree with it.
"""

import operator

import numba
import numpy as np

from ..errors import CorruptStreamError

FORMAT_VERSION = 1
MAX_CODE_LENGTH = 24
MAX_SYMBOL = 2**31 - 1  # decoded symbols are int32
MAX_DISTINCT = 2**MAX_CODE_LENGTH  # a complete code with lengths <= 24 has at most this many leaves
PRIMARY_TABLE_BITS = 12  # 4 KiB of lengths + 16 KiB of symbols: stays in L1
DENSE_SPAN_LIMIT = 2**21  # count with a flat array when max - min is below this (or below n)
_MAX_VARINT_BYTES = 9  # 63 bits: every decoded value fits in int64


# ---------------------------------------------------------------------------
# Encoder kernels
# ---------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _value_range(values):
    """Min and max of the symbols as int64 (uint64 values above 2**63 come out negative)."""
    lo = np.int64(values[0])
    hi = lo
    for i in range(1, values.size):
        v = np.int64(values[i])
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _count_dense(values, offset, span):
    counts = np.zeros(span, np.int64)
    unsigned_offset = np.uint64(offset)
    for i in range(values.size):
        counts[np.uint64(values[i]) - unsigned_offset] += 1  # unsigned: no negative-index fixup
    return counts


@numba.njit(cache=True, nogil=True)
def _nonzero_bins(counts, offset):
    """The symbols that occur (ascending) and their frequencies."""
    n_distinct = 0
    for c in counts:
        if c != 0:
            n_distinct += 1
    distinct = np.empty(n_distinct, np.int64)
    freqs = np.empty(n_distinct, np.int64)
    j = 0
    for i in range(counts.size):
        if counts[i] != 0:
            distinct[j] = i + offset
            freqs[j] = counts[i]
            j += 1
    return distinct, freqs


@numba.njit(cache=True, nogil=True)
def _rank_sparse(values):
    """For alphabets too spread out for a flat array: sort, then map each symbol to its rank."""
    as_int64 = np.empty(values.size, np.int64)
    for i in range(values.size):
        as_int64[i] = values[i]
    distinct = np.unique(as_int64)
    freqs = np.zeros(distinct.size, np.int64)
    ranks = np.empty(values.size, np.int32)
    for i in range(values.size):
        r = np.searchsorted(distinct, as_int64[i])
        ranks[i] = r
        freqs[r] += 1
    return distinct, freqs, ranks


@numba.njit(cache=True, nogil=True)
def _huffman_depths(sorted_weights, floor):
    """Optimal code lengths for ascending weights, each raised to at least ``floor``.

    Moffat & Katajainen, "In-place calculation of minimum-redundancy codes"
    (1995): O(n) on sorted input. Raising weights below a floor keeps the
    array sorted, so length limiting needs no re-sort.
    """
    n = sorted_weights.size
    a = np.empty(n, np.int64)
    for i in range(n):
        a[i] = max(sorted_weights[i], floor)
    # Pass 1, left to right: combine the two lightest items; a[] holds parent pointers.
    a[0] += a[1]
    root = 0
    leaf = 2
    for nxt in range(1, n - 1):
        if leaf >= n or a[root] < a[leaf]:
            a[nxt] = a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] = a[leaf]
            leaf += 1
        if leaf >= n or (root < nxt and a[root] < a[leaf]):
            a[nxt] += a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] += a[leaf]
            leaf += 1
    # Pass 2, right to left: internal node depths.
    a[n - 2] = 0
    for nxt in range(n - 3, -1, -1):
        a[nxt] = a[a[nxt]] + 1
    # Pass 3, right to left: leaf depths.
    available = 1
    used = 0
    depth = 0
    root = n - 2
    nxt = n - 1
    while available > 0:
        while root >= 0 and a[root] == depth:
            used += 1
            root -= 1
        while available > used:
            a[nxt] = depth
            nxt -= 1
            available -= 1
        available = 2 * used
        depth += 1
        used = 0
    return a


@numba.njit(cache=True, nogil=True)
def _limited_depths(sorted_weights):
    """Huffman depths no deeper than MAX_CODE_LENGTH, raising the smallest weights if needed."""
    depths = _huffman_depths(sorted_weights, 1)
    if depths.max() <= MAX_CODE_LENGTH:
        return depths
    # Double the floor until the tree fits (it must once all weights are equal,
    # since n <= 2**MAX_CODE_LENGTH), then bisect for the lowest floor that fits.
    too_low = 1
    floor = 2
    while True:
        depths = _huffman_depths(sorted_weights, floor)
        if depths.max() <= MAX_CODE_LENGTH:
            break
        too_low = floor
        floor *= 2
    while floor - too_low > 1:
        middle = (too_low + floor) // 2
        candidate = _huffman_depths(sorted_weights, middle)
        if candidate.max() <= MAX_CODE_LENGTH:
            floor = middle
            depths = candidate
        else:
            too_low = middle
    return depths


@numba.njit(cache=True, nogil=True)
def _code_lengths(freqs):
    """Length-limited Huffman code length of each symbol, in the order of ``freqs``."""
    n = freqs.size
    lengths = np.zeros(n, np.uint8)
    if n == 1:
        return lengths  # the only symbol needs no bits
    order = np.argsort(freqs, kind="mergesort")  # stable: ties stay in symbol order
    depths = _limited_depths(freqs[order])
    for i in range(n):
        lengths[order[i]] = depths[i]
    return lengths


@numba.njit(cache=True, nogil=True)
def _first_codes(lengths):
    """Per-length symbol count and first canonical code (DEFLATE's bl_count / next_code)."""
    count_of_length = np.zeros(MAX_CODE_LENGTH + 1, np.int64)
    for length in lengths:
        count_of_length[length] += 1
    count_of_length[0] = 0
    first_code = np.zeros(MAX_CODE_LENGTH + 1, np.int64)
    code = 0
    for length in range(1, MAX_CODE_LENGTH + 1):
        code = (code + count_of_length[length - 1]) << 1
        first_code[length] = code
    return count_of_length, first_code


@numba.njit(cache=True, nogil=True)
def _canonical_codes(lengths):
    """Canonical code of each symbol; symbols are in ascending order, so ties go by symbol."""
    _, next_code = _first_codes(lengths)
    codes = np.empty(lengths.size, np.uint32)
    for i in range(lengths.size):
        length = lengths[i]
        codes[i] = next_code[length]
        next_code[length] += 1
    return codes


@numba.njit(cache=True, nogil=True)
def _varint_size(value):
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


@numba.njit(cache=True, nogil=True)
def _put_varint(out, pos, value):
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


@numba.njit(cache=True, nogil=True)
def _symbol_gap(distinct, i):
    """What the table stores for symbol i: the symbol itself, then gaps minus 1."""
    if i == 0:
        return distinct[0]
    return distinct[i] - distinct[i - 1] - 1


@numba.njit(cache=True, nogil=True)
def _write_header_and_table(count, nbits, distinct, lengths):
    """Allocate the whole output; fill header and code table; return it with the bitstream offset."""
    n = distinct.size
    size = 1 + _varint_size(count) + _varint_size(n) + _varint_size(nbits) + n
    for i in range(n):
        size += _varint_size(_symbol_gap(distinct, i))
    out = np.empty(size + (nbits + 7) // 8, np.uint8)
    out[0] = FORMAT_VERSION
    pos = _put_varint(out, 1, count)
    pos = _put_varint(out, pos, n)
    pos = _put_varint(out, pos, nbits)
    for i in range(n):
        pos = _put_varint(out, pos, _symbol_gap(distinct, i))
    for i in range(n):
        out[pos + i] = lengths[i]
    return out, pos + n


@numba.njit(cache=True, nogil=True)
def _total_bits(freqs, lengths):
    total = 0
    for i in range(freqs.size):
        total += freqs[i] * np.int64(lengths[i])
    return total


@numba.njit(cache=True, nogil=True)
def _scatter_to_symbols(distinct, offset, span, codes, lengths):
    """Code and length lookup tables indexed by symbol - offset (dense path)."""
    code_of = np.zeros(span, np.uint32)
    length_of = np.zeros(span, np.uint8)
    for i in range(distinct.size):
        code_of[distinct[i] - offset] = codes[i]
        length_of[distinct[i] - offset] = lengths[i]
    return code_of, length_of


@numba.njit(cache=True, nogil=True)
def _pack_codes(values, offset, code_of, length_of, out, pos):
    """Append each value's code to ``out`` from ``pos``, MSB first, 4 bytes at a time.

    ``out`` is sized from the exact bit total, so this writes exactly
    ceil(nbits / 8) bytes. The accumulator holds < 32 pending bits plus a
    code of <= 24 bits, so it never overflows.
    """
    acc = np.uint64(0)
    pending = 0
    unsigned_offset = np.uint64(offset)
    for i in range(values.size):
        index = np.uint64(values[i]) - unsigned_offset  # unsigned: no negative-index fixup
        length = np.int64(length_of[index])
        acc = (acc << np.uint64(length)) | np.uint64(code_of[index])
        pending += length
        if pending >= 32:
            pending -= 32
            word = acc >> np.uint64(pending)
            out[pos] = (word >> np.uint64(24)) & np.uint64(0xFF)
            out[pos + 1] = (word >> np.uint64(16)) & np.uint64(0xFF)
            out[pos + 2] = (word >> np.uint64(8)) & np.uint64(0xFF)
            out[pos + 3] = word & np.uint64(0xFF)
            pos += 4
    while pending >= 8:
        pending -= 8
        out[pos] = (acc >> np.uint64(pending)) & np.uint64(0xFF)
        pos += 1
    if pending > 0:
        out[pos] = (acc << np.uint64(8 - pending)) & np.uint64(0xFF)
        pos += 1
    return pos


# ---------------------------------------------------------------------------
# Decoder kernels: every index into the input is checked against its end.
# ---------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _read_varint(buf, pos, end):
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise CorruptStreamError("huffman: truncated header")
        byte = np.int64(buf[pos])
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise CorruptStreamError("huffman: overlong varint")
            return value, pos
    raise CorruptStreamError("huffman: varint too long")


@numba.njit(cache=True, nogil=True)
def _read_symbol_ids(buf, pos, end, n_distinct):
    symbols = np.empty(n_distinct, np.int32)
    previous = -1
    for i in range(n_distinct):
        gap, pos = _read_varint(buf, pos, end)
        if gap > MAX_SYMBOL - previous - 1:  # also keeps previous + gap + 1 from overflowing
            raise CorruptStreamError("huffman: symbol id out of range")
        previous = previous + gap + 1
        symbols[i] = previous
    return symbols, pos


@numba.njit(cache=True, nogil=True)
def _check_complete_code(lengths):
    """Every length in 1..MAX_CODE_LENGTH and Kraft sum exactly 1; returns the longest length."""
    kraft = 0
    longest = 0
    full = np.int64(1) << MAX_CODE_LENGTH
    for length in lengths:
        if length == 0 or length > MAX_CODE_LENGTH:
            raise CorruptStreamError("huffman: bad code length")
        kraft += np.int64(1) << (MAX_CODE_LENGTH - length)
        if kraft > full:
            raise CorruptStreamError("huffman: code lengths oversubscribed")
        longest = max(longest, np.int64(length))
    if kraft != full:
        raise CorruptStreamError("huffman: code lengths incomplete")
    return longest


@numba.njit(cache=True, nogil=True)
def _build_decode_tables(symbols, lengths, primary_bits):
    """Primary table indexed by the next primary_bits bits, plus canonical-order data for longer codes.

    An entry holds the symbol and length of the code those bits start with
    or, if that code is longer than primary_bits, the length of the shortest
    code with that prefix (so the search for it starts there).
    """
    count_of_length, first_code = _first_codes(lengths)
    first_index = np.zeros(MAX_CODE_LENGTH + 1, np.int64)  # where each length starts in canonical order
    for length in range(2, MAX_CODE_LENGTH + 1):
        first_index[length] = first_index[length - 1] + count_of_length[length - 1]
    canonical_symbols = np.empty(symbols.size, np.int32)
    primary_symbol = np.zeros(1 << primary_bits, np.int32)
    primary_length = np.zeros(1 << primary_bits, np.uint8)
    seen = np.zeros(MAX_CODE_LENGTH + 1, np.int64)
    for i in range(symbols.size):  # ascending symbols: canonical order within each length
        length = np.int64(lengths[i])
        rank = seen[length]
        seen[length] += 1
        canonical_symbols[first_index[length] + rank] = symbols[i]
        if length <= primary_bits:
            code = first_code[length] + rank
            spread = primary_bits - length
            start = code << spread
            for entry in range(start, start + (np.int64(1) << spread)):
                primary_symbol[entry] = symbols[i]
                primary_length[entry] = length
    for length in range(primary_bits + 1, MAX_CODE_LENGTH + 1):  # by increasing length: first hit is shortest
        for code in range(first_code[length], first_code[length] + count_of_length[length]):
            prefix = code >> (length - primary_bits)
            if primary_length[prefix] == 0:
                primary_length[prefix] = length
    return primary_symbol, primary_length, canonical_symbols, first_code, first_index, count_of_length


@numba.njit(cache=True, nogil=True)
def _decode_long_code(bitbuf, shortest, longest, canonical_symbols, first_code, first_index, count_of_length):
    for length in range(shortest, longest + 1):
        offset = np.int64(bitbuf >> np.uint64(64 - length)) - first_code[length]
        if 0 <= offset < count_of_length[length]:
            return canonical_symbols[first_index[length] + offset], length
    raise CorruptStreamError("huffman: invalid code")  # unreachable for a complete code


@numba.njit(cache=True, nogil=True)
def _load_be64(buf, pos):
    word = np.uint64(0)
    for i in range(8):
        word = (word << np.uint64(8)) | np.uint64(buf[pos + i])
    return word


@numba.njit(cache=True, nogil=True)
def _decode_codes(buf, start, end, out, primary_bits, longest, tables):
    """Decode out.size symbols from buf[start:end]; return the number of bits consumed.

    Bits are kept left-aligned in a 64-bit buffer, refilled to at least 57
    bits whenever fewer than MAX_CODE_LENGTH remain. Reading past ``end``
    supplies zero bits instead, so a truncated stream shows up as consuming
    more bits than it has.
    """
    primary_symbol, primary_length, canonical_symbols, first_code, first_index, count_of_length = tables
    primary_shift = np.uint64(64 - primary_bits)
    bitbuf = np.uint64(0)
    available = 0
    pos = start
    for i in range(out.size):
        if available < MAX_CODE_LENGTH:
            if pos + 8 <= end:
                # Load 8 bytes, keep as many whole ones as fit; the extra bits
                # are the stream's next bits, so OR-ing them in again later is harmless.
                bitbuf |= _load_be64(buf, pos) >> np.uint64(available)
                whole_bytes = (63 - available) >> 3
                pos += whole_bytes
                available += 8 * whole_bytes
            else:
                while available <= 56:
                    if pos < end:
                        bitbuf |= np.uint64(buf[pos]) << np.uint64(56 - available)
                    pos += 1
                    available += 8
        top = bitbuf >> primary_shift  # unsigned index: numba skips its negative-index fixup
        length = np.int64(primary_length[top])
        if length <= primary_bits:
            out[i] = primary_symbol[top]
        else:
            out[i], length = _decode_long_code(
                bitbuf, length, longest, canonical_symbols, first_code, first_index, count_of_length
            )
        bitbuf <<= np.uint64(length)
        available -= length
    return (pos - start) * 8 - available


@numba.njit(cache=True, nogil=True)
def _decode_stream(buf, expected_count):
    end = buf.size
    if end < 1 or buf[0] != FORMAT_VERSION:
        raise CorruptStreamError("huffman: unknown format version")
    count, pos = _read_varint(buf, 1, end)
    n_distinct, pos = _read_varint(buf, pos, end)
    nbits, pos = _read_varint(buf, pos, end)
    if count != expected_count:
        raise CorruptStreamError("huffman: symbol count mismatch")
    if count == 0:
        if n_distinct != 0 or nbits != 0 or pos != end:
            raise CorruptStreamError("huffman: empty stream has content")
        return np.empty(0, np.int32)
    if n_distinct == 0 or n_distinct > count or n_distinct > MAX_DISTINCT:
        raise CorruptStreamError("huffman: bad alphabet size")
    if n_distinct > (end - pos) // 2:  # each entry takes >= 1 id byte + 1 length byte
        raise CorruptStreamError("huffman: code table exceeds stream")
    symbols, pos = _read_symbol_ids(buf, pos, end, n_distinct)
    if n_distinct > end - pos:
        raise CorruptStreamError("huffman: truncated code lengths")
    lengths = buf[pos:pos + n_distinct]
    pos += n_distinct
    stream_bytes = end - pos
    if nbits > 8 * stream_bytes or nbits <= 8 * (stream_bytes - 1):
        raise CorruptStreamError("huffman: bitstream length mismatch")

    if n_distinct == 1:
        if lengths[0] != 0 or nbits != 0:
            raise CorruptStreamError("huffman: single-symbol stream has bits")
        return np.full(count, symbols[0], np.int32)

    longest = _check_complete_code(lengths)
    if count > nbits or nbits > count * longest:  # every code is 1..longest bits
        raise CorruptStreamError("huffman: bit count inconsistent with symbol count")
    primary_bits = min(PRIMARY_TABLE_BITS, longest)
    tables = _build_decode_tables(symbols, lengths, primary_bits)
    out = np.empty(count, np.int32)
    consumed = _decode_codes(buf, pos, end, out, primary_bits, longest, tables)
    if consumed != nbits:
        raise CorruptStreamError("huffman: bitstream length does not match its codes")
    padding = 8 * stream_bytes - nbits
    if padding and buf[end - 1] & ((1 << padding) - 1):
        raise CorruptStreamError("huffman: nonzero padding bits")
    return out


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _as_symbol_array(symbols) -> np.ndarray:
    values = np.asarray(symbols)
    if values.ndim != 1:
        raise ValueError(f"huffman: symbols must be 1-D, got shape {values.shape}")
    if values.dtype.kind not in "iu":
        raise ValueError(f"huffman: symbols must be integers, got {values.dtype}")
    return np.ascontiguousarray(values)


def encode(symbols: np.ndarray) -> bytes:
    """Huffman-code a 1-D array of integers in [0, MAX_SYMBOL]; see the module doc for the layout."""
    values = _as_symbol_array(symbols)
    n = values.size
    if n == 0:
        out, _ = _write_header_and_table(0, 0, np.empty(0, np.int64), np.empty(0, np.uint8))
        return out.tobytes()
    lo, hi = _value_range(values)
    if lo < 0 or hi > MAX_SYMBOL:
        raise ValueError(f"huffman: symbols must lie in [0, {MAX_SYMBOL}]")
    span = hi - lo + 1
    dense = span <= max(DENSE_SPAN_LIMIT, n)
    if dense:
        distinct, freqs = _nonzero_bins(_count_dense(values, lo, span), lo)
    else:
        distinct, freqs, ranks = _rank_sparse(values)
    if distinct.size > MAX_DISTINCT:
        raise ValueError(f"huffman: at most {MAX_DISTINCT} distinct symbols are supported")

    lengths = _code_lengths(freqs)
    codes = _canonical_codes(lengths)
    nbits = _total_bits(freqs, lengths)
    out, pos = _write_header_and_table(n, nbits, distinct, lengths)
    if nbits:
        if dense:  # look codes up directly by symbol value
            code_of, length_of = _scatter_to_symbols(distinct, lo, span, codes, lengths)
            end = _pack_codes(values, lo, code_of, length_of, out, pos)
        else:  # look codes up by rank
            end = _pack_codes(ranks, 0, codes, lengths, out, pos)
        assert end == out.size
    return out.tobytes()


def decode(data, count: int) -> np.ndarray:
    """Decode ``count`` symbols from ``encode`` output; raises CorruptStreamError on any inconsistency."""
    count = operator.index(count)
    if count < 0:
        raise ValueError("huffman: count must be non-negative")
    buf = np.frombuffer(data, dtype=np.uint8)
    return _decode_stream(buf, count)
