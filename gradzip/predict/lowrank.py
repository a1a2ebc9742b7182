"""Low-rank predictor: the part of a layer's residual that is a sum of a few outer products.

A linear or conv layer's gradient is a sum of outer products (output deltas times inputs),
so after a few local steps its update, and what the linear prediction leaves of it, is close
to low rank: on the corpus's 256 x 4096 FC layer 16 components hold 98-99% of the residual's
energy. The encoder finds the leading components of the residual (viewed as rows of axis 0
by the rest) and sends them as integer factors, left (rank x rows) and right (rank x
columns), in units of `step`; both sides add

    offset[i, j] = float32(step**2 * sum_c left[c, i] * right[c, j])

to the prediction. The factors are below 2**15 in magnitude and the rank at most 64, so
every product and partial sum is an integer below 2**36, exact in float64 whatever the
order: both sides get the same float32 offset on any machine.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numba
import numpy as np

from ..parallel import each

MAX_RANK = 64
RANKS = (4, 8, 16, 32, 48, 64)  # walked from the middle by the encoder's estimate (see fit_low_rank)
# Both sides of the 2-D view must be at least this long: on the corpus only the large FC
# layer pays for its factors; conv and transformer layers lose at every rank.
MIN_SIDE = 64
MIN_ELEMENTS = 1 << 16
FACTOR_LIMIT = (1 << 15) - 2  # factors are coded as quantization codes (below the quantizer's radius)
_SAMPLE_ROWS = 32  # rows of the residual the rank estimate is made on
_OVERSAMPLE = 8  # extra random directions of the range finder
# A hinted fit sketches up to this many times the hint's rank: reusing rounds of a 3.2M-parameter
# transformer and cnn5fc compressed 1.13-1.44x faster for 0.007-0.009% more bytes (2x and 3x
# cost 0.01-0.08%, a sketch of the hint's rank alone 0.3%; see docs/design.md).
_HINT_SKETCH_FACTOR = 4
_NOISE_EDGE_FACTOR = 2.0  # see fit_low_rank
_SCREEN_ROWS = 64  # rows of the residual the cheap noise screen looks at
_SCREEN_EDGE_FACTOR = 1.5  # see _looks_like_noise
_OFFSET_BLOCK_ELEMENTS = 1 << 17  # elements of the offset's sums computed at a time (0.5-1 MiB)
_PRODUCT_BLOCK_ELEMENTS = 1 << 18  # elements of the residual in one block of a fit's matrix product
_SINGLE_EXACT_LIMIT = float(1 << 24)  # float32 holds every integer up to this exactly
_GRAM_BASIS_MIN_CONDITION = 1e-10  # smallest / largest pivot of the sketch's Gram matrix (see _orthonormal)


def eligible(shape: tuple[int, ...]) -> bool:
    """Whether a tensor's 2-D view (axis 0 by the rest) is large enough to try."""
    if len(shape) < 2 or shape[0] < MIN_SIDE:
        return False
    size = math.prod(shape)
    return size >= MIN_ELEMENTS and size // shape[0] >= MIN_SIDE


def low_rank_sums(left: np.ndarray, right: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
    """out (rows x columns flat, float32 or float64) = left.T @ right, exactly: the integer
    sums whose float32(step**2 x sum) is the offset (see above; the (de)quantizing kernels
    scale them as they read them, quantize.offset_at). left, right: integers below 2**15 in
    magnitude (rank x rows, rank x columns, any integer or float dtype), rank <= 64. Every
    product is below 2**30 and every partial sum below 2**36, so a matrix product in float64
    is exact in any order, with or without FMA: BLAS gives the same bits on every machine,
    4-5x faster than a numba loop. Where sums_dtype allows float32 (every partial sum below
    2**24), out may be float32: exact too, and 2x faster again (0.42 against 0.83 ms on
    256 x 4096 at rank 16). Columns go in blocks (blocks of columns, not rows: BLAS then
    packs each piece of right once, 5.1 -> 3.2 ms at rank 48 on 256 x 4096), on up to
    `threads` threads (each block is written once, by one of them)."""
    rank, rows = left.shape
    cols = right.shape[1]
    exact = out.dtype.type
    left_t = np.ascontiguousarray(left.T, dtype=exact)
    grid = out.reshape(rows, cols)
    width = max(1, _OFFSET_BLOCK_ELEMENTS // max(rows, 1))

    def block(start):
        stop = min(cols, start + width)
        np.matmul(left_t, right[:, start:stop].astype(exact), out=grid[:, start:stop])

    each(block, range(0, cols, width), threads)


def sums_dtype(left: np.ndarray, right: np.ndarray) -> type:
    """float32 where every product and partial sum of left.T @ right is an integer below
    2**24 in magnitude, in any order (the sum over components of max |left| x max |right|
    bounds them all; on the corpus it stayed under 0.13 x 2**24 in every part), else float64."""
    if not (left.size and right.size):
        return np.float32
    bound = np.abs(left).max(axis=1).astype(np.float64) @ np.abs(right).max(axis=1).astype(np.float64)
    return np.float32 if float(bound) < _SINGLE_EXACT_LIMIT else np.float64


def low_rank_offset(left: np.ndarray, right: np.ndarray, step: float, out: np.ndarray, threads: int = 1) -> None:
    """out (float32, rows x columns flat) = float32(step**2 * left.T @ right): the offset's
    values as the format defines them, what the (de)quantizing kernels compute from
    low_rank_sums (the reference the tests hold the kernels to)."""
    sums = np.empty(out.size, sums_dtype(left, right))
    low_rank_sums(left, right, sums, threads)
    np.multiply(sums, np.float64(step * step), out=out, dtype=np.float64, casting="same_kind")


class Factors(NamedTuple):
    """A low-rank part as sent: integer factors left (rank x rows) and right (rank x columns)
    in units of step."""

    left: np.ndarray
    right: np.ndarray
    step: float

    @property
    def offset_scale(self) -> float:
        """What the offset's sums are scaled by (quantize.offset_at)."""
        return self.step * self.step

    def offset_sums(self, threads: int = 1) -> np.ndarray:
        """The offset's exact sums (rows x columns, flat; low_rank_sums, in sums_dtype). Built
        on each call: they take 4 or 8 bytes an element, so a caller holds them only while it
        quantizes or reconstructs (the encoder's candidates keep their factors, not their
        offsets)."""
        out = np.empty(self.left.shape[1] * self.right.shape[1], sums_dtype(self.left, self.right))
        low_rank_sums(self.left, self.right, out, threads)
        return out


def factor_contexts(rank: int, rows: int, cols: int) -> np.ndarray:
    """The coding context of each factor code: its component (one table per component, whose
    magnitudes fall with its index). Codes are left's rows then right's, component-major."""
    return np.concatenate([np.repeat(np.arange(rank, dtype=np.uint8), rows),
                           np.repeat(np.arange(rank, dtype=np.uint8), cols)])


def fit_low_rank(residual: np.ndarray, eb: float, estimated_bits, rank: int | None = None,
                 threads: int = 1) -> Factors | None:
    """Encoder only: the integer factors of the residual (rows x columns, float32) worth
    sending, or None. The rank is where a walk from the middle of RANKS (within a quarter of
    either side) finds the estimated size (a sample of the residual's codes plus the factors)
    smallest: the smallest of all where that size is unimodal in the rank, as it was in every
    corpus fit; a rank the walk does not visit is not checked for values near the float
    limits (any rank it visits that meets them means no part). The step puts the offset's
    rounding error near eb / 2. estimated_bits(codes, contexts, n_contexts) is the coder's size estimate
    (contexts None: all in one context).
    rank: a hint (the last search's rank, between searches), where it is one of RANKS that
    fits: the walk starts there, among ranks up to _HINT_SKETCH_FACTOR times it, so the sketch
    is no wider than that.
    The factorization is a randomized range finder with one power iteration, then the
    eigenvectors of a small Gram matrix: any factorization is valid, since the factors are sent.
    threads: the matrix products' blocks (the same factors on any count)."""
    rows, cols = residual.shape
    top = min(MAX_RANK, rows // 4, cols // 4)
    if rank is not None and rank in RANKS and rank <= top:
        top = min(top, _HINT_SKETCH_FACTOR * rank)
    else:
        rank = None
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.dot(residual.ravel(), residual.ravel()))
    # (the sum also catches NaN and Inf.) A hinted fit skips the noise screen: its layer had
    # a part at the last search, and the screen passed every such fit of the corpus, the
    # wider transformer and the held-out and probe sequences (136 at rel 1e-2 and 1e-3),
    # while costing 0.3-1.5 ms a fit; the full test below still catches noise.
    if top < RANKS[0] or not math.isfinite(total) or (rank is None and _looks_like_noise(residual)):
        return None
    with np.errstate(over="ignore", invalid="ignore"):  # float32 products of values near its limit
        sketch = _product(residual, _directions(cols, top + _OVERSAMPLE), threads)
        if not np.isfinite(sketch).all():
            return None
        basis = _orthonormal(sketch)
        # measured: 11% smaller cnn5fc streams; a second: +-1.6%
        basis = _orthonormal(_product(residual, _product(residual, basis, threads, transposed=True), threads))
        projected = _product(residual, basis, threads, transposed=True).T.astype(np.float64)  # (top + oversample) x cols
    if not np.isfinite(projected).all():
        return None
    energy, vectors = np.linalg.eigh(projected @ projected.T)
    energy, vectors = energy[::-1][:top], vectors[:, ::-1][:, :top]
    # Noise of the residual's own energy has its top component near the Marchenko-Pastur
    # edge, total / (rows cols) x (sqrt(rows) + sqrt(cols))^2; a component pays for its
    # factors only several times above it (about 7x on a 768 x 3072 layer), so a residual
    # whose top is below twice the edge is noise to this predictor: skip the rank search.
    if not energy[0] > _NOISE_EDGE_FACTOR * _marchenko_pastur_edge(total, rows, cols):
        return None
    energy = np.maximum(energy, energy[0] * 1e-12)
    # left = U sqrt(s), right = sqrt(s) V^T with U = basis W, V^T = W^T projected / s; the
    # balance spreads the left and right entries alike.
    balance = (rows / cols) ** 0.25
    left_all = ((basis.astype(np.float64) @ vectors) * (energy ** 0.25 * balance)).T
    right_all = vectors.T @ projected
    del projected
    right_all /= (energy ** 0.25 * balance)[:, None]
    sample = np.arange(0, rows, max(1, rows // _SAMPLE_ROWS))
    two_eb = 2.0 * eb
    scale = len(sample) / rows
    sampled = residual[sample].ravel()  # (a copy: taken once, not per rank)
    best_bits = estimated_bits(_codes_of(sampled, two_eb), None, 1) / scale

    def sized(rank):
        """(estimated bits, factors) with `rank` components, or None for values near the float
        limits (no part)."""
        left, right = left_all[:rank], right_all[:rank]
        spread = math.sqrt(float(np.mean(left * left))) + math.sqrt(float(np.mean(right * right)))
        step = eb / math.sqrt(rank) / spread if spread > 0 else 0.0
        if not (step > 0 and math.isfinite(step)):
            return None
        largest = _largest_magnitude(left, right)
        if not math.isfinite(largest):
            return None
        while largest / step >= FACTOR_LIMIT:
            step *= 2.0
        step = float(f"{step:.6g}")
        q_left = _factor_codes(left, step)
        q_right = _factor_codes(right, step)
        sums = np.empty(sampled.size, sums_dtype(q_left, q_right))
        low_rank_sums(q_left[:, sample], q_right, sums)
        codes = np.empty(sampled.size, np.int32)
        _residual_codes(sampled, sums, step * step, two_eb, codes)
        factor_codes = np.concatenate([q_left.ravel(), q_right.ravel()]).astype(np.int32)
        bits = (estimated_bits(codes, None, 1) / scale
                + estimated_bits(factor_codes, factor_contexts(rank, rows, cols), rank))
        return bits, Factors(q_left, q_right, step)

    # The estimate falls, then rises with the rank (on all 148 fits of the corpus's FC layer
    # at rel 1e-2 to 1e-4), so a walk from the middle rank (or the hint) towards the smaller
    # neighbour finds the smallest in 3-4 estimates instead of 6 (from the hint, often 2-3).
    ranks = [r for r in RANKS if r <= top]
    sizes: dict = {}

    def at(i):
        if i not in sizes:
            sizes[i] = sized(ranks[i])
        return sizes[i]

    i = ranks.index(rank) if rank is not None else len(ranks) // 2
    if at(i) is None:
        return None
    direction = 1 if i + 1 < len(ranks) and at(i + 1) is not None and at(i + 1)[0] < at(i)[0] else -1
    while 0 <= i + direction < len(ranks) and at(i + direction) is not None and at(i + direction)[0] < at(i)[0]:
        i += direction
    bits, factors = at(i)
    return factors if bits < best_bits else None


def _product(residual: np.ndarray, other: np.ndarray, threads: int, transposed: bool = False) -> np.ndarray:
    """residual @ other (transposed: residual.T @ other) in blocks of the residual's rows
    (columns) on up to `threads` threads. The blocks do not depend on the thread count, so
    neither do the bits; on one thread they cost about as much as one product (1.6-2.0 ms
    against 1.5-1.7 on 256 x 4096 by 72), on two they take 0.9-1.1 ms."""
    matrix = residual.T if transposed else residual
    out = np.empty((matrix.shape[0], other.shape[1]), np.result_type(matrix, other))
    block = max(1, _PRODUCT_BLOCK_ELEMENTS // max(matrix.shape[1], 1))

    def run(start):
        np.matmul(matrix[start:start + block], other, out=out[start:start + block])

    each(run, range(0, matrix.shape[0], block), threads)
    return out


def _orthonormal(sketch: np.ndarray) -> np.ndarray:
    """An orthonormal basis (float32) of a sketch's columns: Y L^-T in float64 from the
    Cholesky factor L of Y^T Y, where an eigendecomposition of Y^T Y took 2x as long on
    256-1024 x 72 and 1.6x on 4096 x 72 (one BLAS thread: LAPACK's eigh takes 0.4-0.7 ms on
    72 x 72, its Cholesky 0.04), and numpy's Householder QR as long or longer. Its error
    grows with the sketch's condition number squared, so a sketch whose Gram matrix has a
    pivot below _GRAM_BASIS_MIN_CONDITION of the largest (then near singular) takes the QR.
    Any basis of the span serves: the factors are sent."""
    wide = sketch.astype(np.float64)
    try:
        lower = np.linalg.cholesky(wide.T @ wide)
    except np.linalg.LinAlgError:
        return np.linalg.qr(sketch)[0]
    pivots = np.diag(lower) ** 2
    if not pivots.min() > pivots.max() * _GRAM_BASIS_MIN_CONDITION:
        return np.linalg.qr(sketch)[0]
    return (wide @ np.linalg.inv(lower).T).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _factor_codes(factor, step):
    """round(factor / step) as int16 (the clip only guards the 6-digit rounding of step: a
    decoder refuses larger factors). numpy's four passes took 1.0 of a 14 ms fit (cnn5fc's FC
    layer, rank 32); the arithmetic is the same, so are the codes."""
    codes = np.empty(factor.shape, np.int16)
    flat_in, flat_out = factor.ravel(), codes.ravel()
    limit = np.float64(FACTOR_LIMIT)
    for i in range(flat_in.size):
        flat_out[i] = np.int16(min(max(np.rint(flat_in[i] / step), -limit), limit))
    return codes


@numba.njit(cache=True, nogil=True)
def _largest_magnitude(left, right):
    """max(|left|.max(), |right|.max()) in one pass over each (numpy made a copy of each); NaN
    where either holds one."""
    largest = 0.0
    for values in (left.ravel(), right.ravel()):
        for i in range(values.size):
            magnitude = abs(values[i])
            if magnitude > largest:
                largest = magnitude
            elif magnitude != magnitude:
                return np.nan
    return largest


def _marchenko_pastur_edge(total: float, rows: int, cols: int) -> float:
    """The top eigenvalue of X X^T that pure noise of X's total energy reaches (rows x cols)."""
    return total / (rows * cols) * (math.sqrt(rows) + math.sqrt(cols)) ** 2


def _looks_like_noise(residual: np.ndarray) -> bool:
    """A screen before the range finder (a sixth of its cost on a 512 x 4608 layer): the top
    eigenvalue of about 64 evenly spaced rows' Gram matrix against their noise edge. A row
    sample keeps a component's share of the energy, but its edge weighs more (about 3x on the
    256 x 4096 FC layer), so the bar is lower than the full test's: a component that pays
    (several times the full edge) clears it, noise does not."""
    rows, cols = residual.shape
    sample = residual[:: max(1, rows // _SCREEN_ROWS)].astype(np.float64)
    gram = sample @ sample.T
    total = float(np.trace(gram))
    if not (total > 0 and math.isfinite(total)):
        return True
    return not np.linalg.eigvalsh(gram)[-1] > _SCREEN_EDGE_FACTOR * _marchenko_pastur_edge(total, sample.shape[0], cols)


@functools.lru_cache(maxsize=16)
def _directions(cols: int, count: int) -> np.ndarray:
    """The range finder's random directions, the same every round (drawing them took 5 ms of
    the 1M-element layer's 37). 16 (width, count) pairs: a ResNet-18's eligible layers need
    7, and with room for 4 they were drawn again every round (1.9% of its compression); an
    entry is at most 72 x 4 bytes a column (1.3 MiB at 4608 columns)."""
    directions = np.random.default_rng(0).standard_normal((cols, count)).astype(np.float32)
    directions.flags.writeable = False
    return directions


def _codes_of(residual: np.ndarray, two_eb: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # (a bound far below the values: the clip takes the infinities)
        return np.clip(np.rint(residual.ravel() / two_eb), -FACTOR_LIMIT, FACTOR_LIMIT).astype(np.int32)


@numba.njit(cache=True, nogil=True)
def _residual_codes(values, sums, offset_scale, two_eb, codes):
    """codes = _codes_of(values - offset, two_eb), offset being float32(offset_scale x sums)
    (low_rank_offset's values), in one pass instead of numpy's seven: the same float32
    arithmetic (numpy divides a float32 array by a Python float in float32), so the same
    codes. Encoder only: the rank walk's size estimates."""
    divisor = np.float32(two_eb)
    for i in range(values.size):
        offset = np.float32(np.float64(sums[i]) * offset_scale)
        q = np.rint(np.float32(values[i] - offset) / divisor)
        codes[i] = np.int32(min(max(q, np.float32(-FACTOR_LIMIT)), np.float32(FACTOR_LIMIT)))
