"""Per-tensor codec: routes each tensor, composes predictor, quantizer, entropy coder and
lossless backend, and keeps whichever candidate encoding is smallest.

Routing: tensors of at most `min_lossy_elements` elements share one bundle record per round
and carry no predictor state: there, float tensors are quantized at their own bound without
prediction (unless `exact_small`) and the rest stored exactly. Larger non-float tensors are
stored losslessly (zstd). Every other tensor is quantized; the encoder tries no prediction, the EMA
magnitude-and-sign prediction (signs from the kernel bitmap), the linear prediction from the
last two reconstructions (weighted in all or per row), and coding contexts (from the state,
from this round's row and column scales, or both) and keeps the smallest, so prediction never makes a tensor worse; a
large tensor makes that choice on a sample. A large layer then tries a low-rank part of what
the chosen prediction leaves (predict/lowrank.py), kept where it is smaller. Such tensors carry predictor state, which is
advanced from the reconstruction only, identically in encoder and decoder. The state also
keeps the recipe of each tensor's last record (recipe_of); between full searches (every
`search_every` rounds) the encoder rebuilds only that recipe, fitted to the new round.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import numpy as np

from . import lossless
from .checksum import xxh64
from .container import compact_json_encoder
from .entropy import huffman, rans
from .errors import CorruptStreamError, InputError
from .fused_decode import decode_and_fold
from .fused_encode import reconstruct_and_fold
from .floats import LOSSY_DTYPES, as_float32, compute_dtype, narrow, original_bits, widen
from .parallel import MIN_SPAN, each, spans
from .predict.context import (MAX_MERGE_SHIFT, MAX_OFFSET, MAX_WEIGHT, N_MAGNITUDE_BUCKETS, N_SCALE_BUCKETS, fitted_weights,
                              magnitude_contexts, merged_contexts, merged_count, orient_by_sign, scale_contexts_on,
                              scale_fit_sums_on, scale_levels)
from .predict.linear import (MAX_LINEAR_WEIGHT, MIN_ROW_ELEMENTS, fitted_linear_weights, fitted_row_weights, linear_fit_sums_on,
                             linear_residual, row_weights_as_floats)
from .predict.lowrank import FACTOR_LIMIT, MAX_RANK, Factors, factor_contexts, fit_low_rank, low_rank_sums, sums_dtype
from .predict.lowrank import eligible as low_rank_eligible
from .predict.history import fold_round_on
from .predict.magnitude import DEFAULT_BETA, magnitude_stats
from .predict.sign import (DEFAULT_TAU, OSCILLATION_NONE, choose_oscillation, kernel_consistency, kernel_size, predicted_signs,
                           signs_from_bitmap)
from .quantize import (RADIUS, dequantize, dequantize_runs, escaped_deltas, finite_ranges, patch_escape_deltas, quantize,
                       quantize_runs, recheck_narrowed, value_range)
from .state import NO_HISTORY, TensorState, chained_digest
from .tensorio import as_bfloat16, dtype_name, element_count, numpy_dtype

# Tensors this small gain nothing from lossy coding (side information would dominate).
MIN_LOSSY_ELEMENTS = 1024
# A decoder refuses records claiming more elements per payload byte than this (no bombs);
# the encoder pads the rare payload that would be denser (huge constant tensors).
MAX_ELEMENTS_PER_PAYLOAD_BYTE = 1 << 10
# Beyond this share of escaped elements the bound is below the data's resolution: store exactly.
_ESCAPE_SHARE_FOR_LOSSLESS = 0.25
_NO_STATE = np.empty(0, np.float32)  # an EMA (or reconstruction) array for "no state"
# Larger tensors amortize a table per bucket; only smaller ones try merged buckets.
_MERGE_TRIAL_ELEMENTS = 1 << 17
# Smaller tensors do not try scale contexts: on the corpus they changed the ratio by 0.001%
# there (their side information costs what the contexts save) and cost 6 of 11 estimates.
_SCALE_MIN_ELEMENTS = 1 << 15
# A larger tensor fits its scale-context weights on every k-th row, about this many elements
# (_scale_fit_row_step).
_SCALE_FIT_ELEMENTS = 1 << 18
# The encoder searches every candidate on a tensor's first two rounds with history and every
# DEFAULT_SEARCH_EVERY-th round after them, and otherwise rebuilds the last round's recipe
# (refitted): on the bench corpus 4 compressed 10 rounds 1.28x faster (geometric mean) for
# 0.07% more bytes, 1.21x with the check against no prediction; see docs/design.md.
DEFAULT_SEARCH_EVERY = 4
NO_STREAM_KEY = 0  # the stream key (stream_key) of a record coded on its own, outside a stream
LOW_RANK_KINDS = ("linear", "values")  # a low-rank part added to a linear prediction, or the whole prediction
# Tensors above _SAMPLED_ABOVE elements choose their candidate on about SAMPLE_ELEMENTS.
# From 2^17 on (was 2^18): a 3.2M-parameter transformer's layers of 196K-262K elements
# compressed 1.15-1.25x faster for 0.013% more bytes, and the corpus's bytes did not change
# (2^16 with samples of 2^16 was faster still but cost cnn5fc-iid-long 0.35% at rel 1e-2).
SAMPLE_ELEMENTS = 1 << 17
_SAMPLED_ABOVE = 1 << 17
_MAX_HUFFMAN_BYTES_PER_CODE = 5  # codes are at most 32 bits plus table: a looser cap is a bomb
MODES = ("abs", "rel")
# What a `context` record's coding contexts come from: nothing (sign orientation only), the
# EMA-predicted magnitude, this round's row and column scales, or both (docs/format.md).
CONTEXT_SOURCES = ("none", "ema", "scale", "scale_ema")
CODERS = ("rans", "huffman")


@dataclass(frozen=True)
class CodecConfig:
    """Every setting that affects decoding; stored in each stream header as plain data."""

    error_bound: float = 1e-3
    mode: str = "rel"
    beta: float = DEFAULT_BETA
    tau: float = DEFAULT_TAU
    magnitude_prediction: bool = True
    sign_prediction: bool = True
    coder: str = "rans"  # or "huffman" (Huffman + zstd, as SZ3; no coding contexts)
    min_lossy_elements: int = MIN_LOSSY_ELEMENTS  # at most this many elements: no state, in the bundle
    exact_small: bool = False  # store the bundle's float tensors exactly instead of within the bound

    def __post_init__(self):
        for name, kind in (("error_bound", (int, float)), ("beta", (int, float)), ("tau", (int, float)),
                           ("min_lossy_elements", int), ("magnitude_prediction", bool), ("sign_prediction", bool),
                           ("exact_small", bool),
                           ("mode", str), ("coder", str)):
            value = getattr(self, name)
            if not isinstance(value, kind) or (kind != bool and isinstance(value, bool)):
                expected = "number" if isinstance(kind, tuple) else kind.__name__
                raise InputError(f"{name} must be a {expected}, not {value!r}")
        if self.mode not in MODES:
            raise InputError(f"error-bound mode must be 'abs' or 'rel', not {self.mode!r}")
        eb = self.error_bound
        if not isinstance(eb, (int, float)) or not math.isfinite(eb) or eb < 0:
            raise InputError(f"error bound must be a finite number >= 0, not {eb!r}")
        if self.mode == "rel" and eb >= 1:
            raise InputError(f"a relative error bound must be below 1, not {eb!r}")
        if not 0 < self.beta <= 1:
            raise InputError(f"beta must be in (0, 1], not {self.beta!r}")
        if not 0.5 < self.tau <= 1:
            raise InputError(f"tau must be in (0.5, 1], not {self.tau!r}")
        if self.coder not in CODERS:
            raise InputError(f"coder must be one of {', '.join(CODERS)}, not {self.coder!r}")
        if self.min_lossy_elements < 0:
            raise InputError(f"min_lossy_elements must be >= 0, not {self.min_lossy_elements!r}")

    def to_dict(self) -> dict:
        return dict(self._as_dict)  # (a fresh copy of a cached one: asdict took 9 us of every round's header)

    @functools.cached_property
    def _as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CodecConfig":
        # Every stream's header carries the settings, the same round after round: the last
        # ones read are kept by their repr (which tells 1 from True, as the checks do).
        shown = repr(data) if isinstance(data, dict) else None
        last_shown, last_config = _LAST_READ_CONFIG[0]  # (one read: another thread may replace it)
        if shown is not None and last_shown == shown:
            return last_config
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise CorruptStreamError("codec settings in the header are malformed")
        try:
            config = cls(**data)
        except (InputError, OverflowError, TypeError, ValueError) as exc:
            raise CorruptStreamError(f"codec settings in the header are invalid ({exc})") from None
        _LAST_READ_CONFIG[0] = (shown, config)
        return config


_LAST_READ_CONFIG: list[tuple] = [(None, None)]  # (repr of the last settings read, their CodecConfig)


def absolute_bound(values: np.ndarray, config: CodecConfig) -> float:
    """The per-tensor absolute bound: eb itself, or eb times the finite value range (rel)."""
    if config.mode == "abs":
        return float(config.error_bound)
    return _relative_bound(config, *value_range(values))


def _relative_bound(config: CodecConfig, count: int, lo: float, hi: float) -> float:
    """rel mode's bound from the finite values' count, min and max (0 where there are none)."""
    if count == 0:
        return 0.0
    # rel*hi - rel*lo cannot overflow where hi - lo can (values near the float max).
    return _rounded_down(config.error_bound * hi - config.error_bound * lo)


SIGNIFICANT_DIGITS = 6  # of the per-tensor numbers written into every record


_POWERS_OF_TEN = tuple(10 ** k for k in range(360))  # (a float's decimal exponent is within -324..308)


def _rounded_down(value: float) -> float:
    """value rounded down to SIGNIFICANT_DIGITS (at most 1e-5 smaller): a bound 17 digits long
    costs every record bytes, and a smaller bound is still within the user's."""
    if not (value > 0 and math.isfinite(value)):
        return value
    # The exact value's first digits, in integers: k = floor(value 10^m) with 10^(D-1) <= k <
    # 10^D, then k / 10^m correctly rounded (Python's int division). The same floats as
    # truncating its decimal repr (500,000 values compared, subnormals and the float max
    # among them) in 0.7 instead of 1.2 us: 20 bounds a small model's round.
    numerator, denominator = value.as_integer_ratio()
    shift = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(value))  # (log10 may be one off near a power of 10)
    while True:  # (at most one correction)
        if shift >= 0:
            kept = numerator * _POWERS_OF_TEN[shift] // denominator
        else:
            kept = numerator // (denominator * _POWERS_OF_TEN[-shift])
        if kept >= _POWERS_OF_TEN[SIGNIFICANT_DIGITS]:
            shift -= 1
        elif kept < _POWERS_OF_TEN[SIGNIFICANT_DIGITS - 1]:
            shift += 1
        else:
            break
    short = kept / _POWERS_OF_TEN[shift] if shift >= 0 else float(kept * _POWERS_OF_TEN[-shift])
    return short if 0 < short <= value else value


def _rounded(value: float) -> float:
    """A side-information statistic to SIGNIFICANT_DIGITS; encoder and decoder both use this value."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def carries_state(dtype: str, shape: tuple[int, ...], config: CodecConfig) -> bool:
    return dtype in LOSSY_DTYPES and element_count(shape) > config.min_lossy_elements


def bundled(dtype: str, shape: tuple[int, ...], config: CodecConfig) -> bool:
    """Small stateless tensors (biases, norms, counters) share one bundle record per round:
    one frame and one zstd frame instead of one each, which matters for small models."""
    return not carries_state(dtype, shape, config) and element_count(shape) <= config.min_lossy_elements


def _has_history(previous: TensorState | None, shape, dtype) -> bool:
    return previous is not None and previous.shape == tuple(shape) and previous.dtype == dtype and previous.rounds > 0


def advance_state(previous: TensorState | None, shape, dtype: str, recon: np.ndarray, config: CodecConfig,
                  recon_hash: int, recipe: list | None = None, threads: int = 1, own_recon: bool = False) -> TensorState:
    """A new TensorState after this round's reconstruction (recon: flat float32/float64; its
    full XXH64 as stored, recon_hash, names the new state) and the recipe of its record
    (threads: for a large tensor's element ranges). own_recon: recon is gradzip's own array
    (not a caller's input, which the caller may overwrite), so a float32 one becomes the new
    state's last reconstruction itself (the fold then has nothing to copy)."""
    shared = own_recon and recon.dtype == np.float32 and recon.flags.c_contiguous
    fold = _Fold.of(previous, shape, dtype, new_last=recon if shared else None)
    fold.fill(recon, config, threads)
    return fold.sealed(config, recon_hash, recipe)


class _Fold(NamedTuple):
    """A new state whose arrays are still to be folded (from `ema`, the previous EMA or
    zeros), then sealed: advance_state's two halves, which the fused decoder fills between."""

    state: TensorState
    previous: TensorState | None
    ema: np.ndarray
    first_round: bool
    recon_is_last: bool = False  # fill's recon is state.last itself (of's new_last): nothing to copy

    @classmethod
    def of(cls, previous: TensorState | None, shape, dtype: str, new_ema: np.ndarray | None = None,
           new_last: np.ndarray | None = None) -> "_Fold":
        """new_ema: memory for the new EMA (n contiguous float32, overwritten whole) instead of
        a new array (on a first round the fold also reads it as the old EMA, which that
        round's EMA ignores). new_last: the reconstruction itself as the new last one (n
        contiguous float32, which fill then leaves as it is), so the decoder keeps one copy
        of it, shared by the state and the array it returns."""
        if previous is not None and (previous.shape != tuple(shape) or previous.dtype != dtype):
            previous = None
        # Every new array is overwritten whole (the EMA from the old one); states are not
        # modified once built, so the new one shares the old one's last reconstruction. The
        # new arrays take the state's own dtypes and the tensor's size, whatever a state
        # built by hand holds.
        n = element_count(shape)
        state = TensorState.fresh(shape, dtype, new_ema, new_last) if previous is None else TensorState(
            previous.shape, dtype, previous.rounds, np.empty(n, np.float32) if new_ema is None else new_ema,
            np.empty(n, np.int8), np.empty(n, np.float32) if new_last is None else new_last, previous.last)
        return cls(state, previous, state.ema if previous is None else previous.ema, state.rounds == 0, new_last is not None)

    def fits(self, n: int) -> bool:
        """Whether the EMA the fold reads is what the fused decoder reads unchecked: n float32
        elements, contiguous (a state built by hand may hold another; the general path copes
        with it). The new arrays are made so (of)."""
        return self.ema.dtype == np.float32 and self.ema.size == n and self.ema.flags.c_contiguous

    def fill(self, recon: np.ndarray, config: CodecConfig, threads: int = 1) -> None:
        # An F64 value beyond float32 is kept as inf (NaN as NaN): its prediction escapes.
        fold_round_on(self.ema, recon, config.beta, self.first_round, self.state.ema, self.state.sign,
                      _NO_STATE if self.recon_is_last else self.state.last, threads)

    def sealed(self, config: CodecConfig, recon_hash: int, recipe: list | None) -> TensorState:
        state = self.state
        state.rounds += 1
        state.recipe = recipe
        state.chain = chained_digest(NO_HISTORY if self.previous is None else self.previous.digest(), state.rounds,
                                     config.beta, recon_hash)
        return state


def recipe_of(record: dict) -> list | None:
    """What a record chose, as the next round's encoder may rebuild it: [predictor, variant,
    low-rank kind, rank] (None for a lossless record). A `low_rank` record's prediction is its
    part alone, so its recipe is no prediction plus a "values" part. Encoder and decoder both
    take it from the record, so their states agree."""
    if record["method"] != "quantized":
        return None
    params = record["params"]
    rank = params.get("rank")
    rank = rank if type(rank) is int else None  # (1..MAX_RANK in any record the decoder accepts)
    if params["predictor"] == "low_rank":
        return ["none", None, "values", rank]
    variant = _variant(params)  # (a string in any record the decoder accepts that reads it)
    return [params["predictor"], variant if isinstance(variant, str) else None, "linear" if "rank" in params else None,
            rank]


def _reused_recipe(previous: TensorState | None, shape, dtype: str, search_every: int) -> list | None:
    """The last record's recipe where this round rebuilds it, else None (a full search): on
    the first two rounds with history (the linear prediction needs two reconstructions) and
    every search_every-th round after the second."""
    if search_every <= 1 or not _has_history(previous, shape, dtype) or previous.recipe is None:
        return None
    return None if previous.rounds <= 2 or (previous.rounds - 2) % search_every == 0 else previous.recipe


# ---------------------------------------------------------------- encoding


@dataclass
class Encoded:
    record: dict
    payload: bytes
    recon: np.ndarray  # what the decoder will return, in the tensor's dtype and shape
    state: TensorState | None  # the tensor's state after this round (None if it carries none)
    ideal_code_bits: float  # ideal length of the codes under the coder's model (0 if not coded)
    recon_hash: int = 0  # the XXH64 of recon's bytes as stored (the record's check is made from it: record_check)


@dataclass
class _Quantized:
    codes: np.ndarray  # int32
    recon: np.ndarray | None  # widened reconstruction, exactly as the decoder rebuilds it (None: deferred)
    escaped: np.ndarray  # bool
    n_escaped: int
    prediction: "_Prediction"  # what the codes are residuals of
    oriented_by: np.ndarray | None = None  # the signs the codes were multiplied by, in place
    deltas: np.ndarray | None = None  # F16/BF16: uint16, each escaped element's delta (recheck_narrowed); others unset


def encode_tensor(name: str, array: np.ndarray, config: CodecConfig, previous: TensorState | None,
                  measure_ideal: bool = False, threads: int = 1, low_rank: bool = True,
                  search_every: int = DEFAULT_SEARCH_EVERY, key: int = NO_STREAM_KEY, index: int = 0) -> Encoded:
    """Encode one tensor of one round against its previous state.

    measure_ideal: also compute the codes' ideal length under the coder's model (for reports).
    threads: for a large tensor's rANS segments and element ranges (the bytes do not depend on it).
    low_rank: whether a large layer may try a low-rank part. search_every: how often the
    encoder tries every candidate (1: every round) rather than the last round's recipe. Both
    are an encoder's choices, for speed: decoding needs no setting. key, index: the stream's
    key and the record's place in it, which its recon_check binds (record_check).
    """
    encoded = _encode_tensor(name, array, config, previous, measure_ideal, threads, low_rank, search_every)
    encoded.record["recon_check"] = record_check(key, index, _tensor_layout(encoded.record), encoded.recon_hash)
    return encoded


def _encode_tensor(name, array, config, previous, measure_ideal, threads, low_rank, search_every) -> Encoded:
    dtype = dtype_name(array)
    shape = tuple(int(s) for s in array.shape)
    if not carries_state(dtype, shape, config):
        return _lossless(name, array, dtype, shape)
    values = widen(array, dtype)
    eb = absolute_bound(values, config)
    reuse = _reused_recipe(previous, shape, dtype, search_every)
    tries_low_rank = low_rank and config.coder == "rans" and low_rank_eligible(shape) and eb > 0 and math.isfinite(eb)
    # between searches, only the kind of part the last record carried (if any), at its rank
    low_rank_kinds = (LOW_RANK_KINDS if reuse is None else reuse[2:3]) if tries_low_rank else ()
    rank = reuse[3] if reuse is not None and len(reuse) > 3 else None
    with _values_low_rank_part(values, shape, eb, threads, "values" in low_rank_kinds, rank) as values_part:
        encoded = _quantized_or_lossless(name, array, values, dtype, shape, eb, config, previous, measure_ideal, threads,
                                         values_part, _FitLowRank(rank) if "linear" in low_rank_kinds else None, reuse)
    if encoded.state is None:  # (a small tensor's reconstruction may have been folded as it was made)
        # (a lossless record's recon is the caller's array: the state keeps a copy of it)
        encoded.state = advance_state(previous, shape, dtype, widen(encoded.recon, dtype), config, encoded.recon_hash,
                                      recipe_of(encoded.record), threads, own_recon=encoded.record["method"] == "quantized")
    return encoded


def _lossless(name, array, dtype, shape) -> Encoded:
    raw = _little_endian_bytes(array, dtype)
    sections = [("data", lossless.compress(raw))]
    return _encoded(name, dtype, shape, "lossless", {}, sections, array, 0.0)


def _little_endian_bytes(array, dtype) -> memoryview:
    """The tensor's bytes as stored: little-endian, BF16 as its bit patterns (a view where possible)."""
    if _LITTLE_ENDIAN_HOST and array.dtype.isnative and array.flags.c_contiguous:  # as they are (a third of the time)
        return memoryview(array.reshape(-1).view(np.uint8))
    return memoryview(original_bits(array, dtype).view(np.uint8))


_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def _padded(sections: list, elements: int) -> list:
    """Sections plus zero padding where the payload would be denser than a decoder accepts."""
    shortfall = elements // MAX_ELEMENTS_PER_PAYLOAD_BYTE + 1 - sum(len(data) for _, data in sections)
    return sections + [("padding", bytes(shortfall))] if shortfall > 0 else sections


def _encoded(name, dtype, shape, method, params, sections, recon, ideal_code_bits, recon_hash=None) -> Encoded:
    """recon_hash: the XXH64 of recon's bytes where the caller has it."""
    sections = _padded(sections, element_count(shape))
    payload = b"".join(data for _, data in sections)
    recon = np.ascontiguousarray(recon).reshape(shape)
    if recon_hash is None:
        recon_hash = _recon_hash(recon, dtype)
    record = {"name": name, "dtype": dtype, "shape": list(shape), "method": method, "params": params,
              "sections": [[section, len(data)] for section, data in sections]}  # (encode_tensor adds recon_check)
    return Encoded(record, payload, recon, None, ideal_code_bits, recon_hash)


# A record's check is 32 bits (record_check): 64 would add about 5 bytes of JSON to every record.
_layout_json = compact_json_encoder()


def stream_key(round_index: int, state_digest: str, input_digest: str) -> int:
    """What a stream's record checks start from: the CRC-32 of its header's round, state
    digest and input digest, so a record copied from another round's or client's stream
    fails its check."""
    return zlib.crc32(_layout_json([round_index, state_digest, input_digest]).encode())


def record_check(key: int, index: int, layout: list, recon_hash: int) -> int:
    """A record's recon_check (format 12): the CRC-32, started from the stream's key, of the
    reconstruction's XXH64 (8 bytes, little-endian) and then the compact JSON of [index,
    *layout]. index is the record's place among the stream's records; layout is [name,
    dtype, shape] for a tensor record and [[position, name, dtype, shape] of each member]
    for a bundle. So the check binds what the decoder rebuilds (the bytes, and what they are
    named, typed, shaped as and where they go) to this record of this stream: an encoder and
    decoder that disagree on any of it, or a record spliced in from elsewhere, fail it.
    (CRC-32 rather than XXH64 here: 0.3 against 3 us a call on these few bytes, and as good
    a check of 32 bits for an accident; the 64-bit hash of the bytes is its input.)"""
    return zlib.crc32(_layout_json([index, *layout]).encode(), zlib.crc32(recon_hash.to_bytes(8, "little"), key))


def _tensor_layout(record: dict) -> list:
    return [record["name"], record["dtype"], record["shape"]]


def _bundle_layout(members: list) -> list:
    return [[member[:4] for member in members]]  # (not the bounds: what they change, the bytes show)


def _recon_hash(recon: np.ndarray, dtype: str) -> int:
    return xxh64(_little_endian_bytes(recon, dtype))


def _quantize(values, dtype, eb, prediction, keep_recon=True, threads=1) -> _Quantized:
    """prediction: _NO_PREDICTION or an EMA shift. keep_recon=False (F32/F64 only):
    recon is None until _reconstructed rebuilds it, so a large tensor's reconstruction is not
    held while its codes are coded. threads: a large tensor's element ranges (the same bits)."""
    n = values.size
    codes = np.empty(n, np.int32)
    keep_recon = keep_recon or dtype in ("F16", "BF16")
    recon = np.empty(n if keep_recon else 0, compute_dtype(dtype))
    escaped = np.empty(n, np.bool_)
    narrow_dtype = dtype in ("F16", "BF16")  # the bound must hold after the cast back: checked there
    narrowed_to = dtype if narrow_dtype else None
    deltas = np.empty(n if narrow_dtype else 0, np.uint16)
    check_bound = math.inf if narrow_dtype else eb
    args = prediction.kernel_args(threads) if prediction.low_rank is None else None
    if args is not None and len(_element_ranges(args, n, threads)) == 1:
        # (a small tensor: one call on the arrays themselves, without _over_ranges' views and
        # closures, which took 1 us of its 7)
        n_escaped = _quantized_into(values, args, eb, codes, recon, escaped, deltas, check_bound, narrowed_to)
    else:
        n_escaped = sum(_over_ranges(prediction, n, threads, lambda a, b, args: _quantized_into(
            values[a:b], args, eb, codes[a:b], recon[a:b] if keep_recon else recon, escaped[a:b],
            deltas[a:b] if narrow_dtype else deltas, check_bound, narrowed_to)))
    return _Quantized(codes, recon if keep_recon else None, escaped, n_escaped, prediction,
                      deltas=deltas if narrow_dtype else None)


def _quantized_into(values, args, eb, codes, recon, escaped, deltas, check_bound, narrowed_to) -> int:
    """quantize's escapes, and for an F16 or BF16 tensor (narrowed_to) the recheck's (element
    by element: the same bits in any ranges)."""
    count = quantize(values, *args, eb, codes, recon, escaped, check_bound)
    if narrowed_to is not None:
        count += _rechecked(values, args, eb, codes, recon, escaped, deltas, narrowed_to == "F16")
    return count


def _rechecked(values, args, eb, codes, recon, escaped, deltas, float16) -> int:
    """recheck_narrowed, then escaped_deltas where quantize escaped any element: how many
    escaped in the recheck."""
    added, escaped_before = recheck_narrowed(values, eb, recon, escaped, deltas, float16)
    if escaped_before:
        escaped_deltas(values, *args, eb, codes, recon, escaped, deltas, float16)
    return added


@dataclass(frozen=True)
class _Prediction:
    """w_last r[t-1] + w_second r[t-2] (+ the low-rank offset, where there is a part) where
    `last` is not empty (linear; one weight pair per row of row_length elements), else the
    offset alone where there is a part (low rank), else sign x |M std + mean| (EMA shift),
    or 0 where ema is empty too (_NO_PREDICTION): the quantizer computes it element by
    element, so no model-sized prediction buffer exists beyond the offset, which
    kernel_args builds from the factors for the one call that needs it."""

    ema: np.ndarray
    mean: float
    std: float
    signs: np.ndarray
    last: np.ndarray = field(default_factory=lambda: _NO_STATE)
    second_last: np.ndarray = field(default_factory=lambda: _NO_STATE)
    w_last: np.ndarray = field(default_factory=lambda: _NO_WEIGHTS)  # float64, one per row
    w_second: np.ndarray = field(default_factory=lambda: _NO_WEIGHTS)
    row_length: int = 1
    low_rank: Factors | None = None  # the low-rank part (added to a linear prediction, or alone)

    @classmethod
    def linear(cls, previous: TensorState, w_last: np.ndarray, w_second: np.ndarray,
               low_rank: Factors | None = None) -> "_Prediction":
        """One weight pair for the whole tensor (arrays of 1) or one per row of axis 0."""
        return cls(_NO_STATE, 0.0, 0.0, _NO_SIGNS, previous.last, previous.second_last, w_last, w_second,
                   previous.last.size // w_last.size, low_rank)

    def kernel_args(self, threads: int = 1, offset: np.ndarray | None = None) -> tuple:
        """The (de)quantizing kernels' prediction arguments; offset: the low-rank offset's
        sums to pass (the whole tensor's are built where it is None)."""
        if offset is None:
            offset = self.low_rank.offset_sums(threads) if self.low_rank is not None else _NO_STATE
        scale = self.low_rank.offset_scale if self.low_rank is not None else 0.0
        return (self.ema, self.mean, self.std, self.signs, self.last, self.second_last, self.w_last, self.w_second,
                self.row_length, offset, scale)


_NO_SIGNS = np.empty(0, np.int8)
_NO_KERNELS = np.empty(0, np.bool_)  # a kernel flag array where the shape has no kernels
_NO_WEIGHTS = np.empty(0, np.float64)
_NO_PREDICTION = _Prediction(_NO_STATE, 0.0, 0.0, _NO_SIGNS)


def _reconstructed(values, dtype, eb, quantized: _Quantized, threads: int = 1) -> np.ndarray:
    """The reconstruction a keep_recon=False quantization would have stored (the same
    expression as quantize's, then the escaped values). Undoes an in-place orientation of the
    codes first: call it once the codes are entropy-coded."""
    if quantized.oriented_by is not None:
        orient_by_sign(quantized.codes, quantized.oriented_by)
        quantized.oriented_by = None
    recon = np.empty(values.size, compute_dtype(dtype))
    _dequantized(quantized.codes, quantized.prediction, eb, recon, threads)
    if quantized.n_escaped:  # (the mask's pass costs more than a small tensor's dequantizing)
        recon[quantized.escaped] = values[quantized.escaped]
    return recon


def _dequantized(codes, prediction: _Prediction, eb, recon, threads: int = 1) -> None:
    """dequantize(codes, *the prediction's kernel arguments, eb, recon), a large tensor in
    ranges (_over_ranges): the same bits."""
    _over_ranges(prediction, codes.size, threads,
                 lambda a, b, args: dequantize(codes[a:b], *args, eb, recon[a:b]))


# A low-rank offset is built this many elements (whole rows) at a time, not for the whole tensor.
_OFFSET_BLOCK_ELEMENTS = 1 << 17


def _over_ranges(prediction: _Prediction, n: int, threads: int, run) -> list:
    """[run(a, b, args), ...] over element ranges [a, b) that cover the tensor, args being the
    prediction's kernel arguments for those elements: one range, or a large tensor's on up to
    `threads` threads (whole rows where the linear weights are per row). A large tensor's
    low-rank offset is built a block of whole rows at a time, each block's just before its
    elements are (de)quantized: no offset of the whole tensor is held (4 bytes an element less
    at the peak), and each block's is still in cache when it is read. The offset's elements
    are exact integer sums in any blocking (lowrank.low_rank_sums), so the bits are the same."""
    factors = prediction.low_rank
    if factors is None or n < 2 * _OFFSET_BLOCK_ELEMENTS:
        args = prediction.kernel_args(threads)
        ranges = _element_ranges(args, n, threads)
        if len(ranges) == 1:
            return [run(0, n, args)]
        return each(lambda span: run(*span, _ranged(args, *span)), ranges, threads)
    args = prediction.kernel_args(threads, offset=_NO_STATE)
    row = factors.right.shape[1]  # (axis 0's rows: the linear weights' rows too)
    block = max(1, _OFFSET_BLOCK_ELEMENTS // row) * row
    sums_type = sums_dtype(factors.left, factors.right)  # (any rows' sums are bounded alike)

    def in_blocks(span):
        start, stop = span
        buffer = np.empty(min(block, stop - start), sums_type)
        results = []
        for a in range(start, stop, block):
            b = min(a + block, stop)
            offset = buffer[: b - a]
            low_rank_sums(factors.left[:, a // row : b // row], factors.right, offset)
            results.append(run(a, b, _ranged(args, a, b)[:-2] + (offset, factors.offset_scale)))
        return results

    return [result for part in each(in_blocks, spans(n, threads, row), threads) for result in part]


def _element_ranges(args, n, threads) -> list[tuple[int, int]]:
    """The element ranges of a (de)quantization with kernel_args args on up to `threads`
    threads: whole rows where the linear weights are per row."""
    last, w_last, row_length = args[4], args[6], args[8]
    return spans(n, threads, row_length if last.size > 0 and w_last.size > 1 else 1)


def _ranged(args, a, b) -> tuple:
    """kernel_args args for the elements [a, b) (a range from _element_ranges)."""
    ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale = args

    def part(array):
        return array[a:b] if array.size else array

    rows = slice(a // row_length, -(-b // row_length)) if last.size > 0 and w_last.size > 1 else slice(None)
    return (part(ema), mean, std, part(signs), part(last), part(second_last), w_last[rows], w_second[rows], row_length,
            part(offset), offset_scale)


@dataclass
class _Candidate:
    """One way to encode a tensor, before its codes are entropy-coded."""

    predictor: str
    quantized: _Quantized
    side_params: dict
    side_sections: list
    codes: np.ndarray  # what the entropy coder sees (possibly sign-oriented)
    contexts: np.ndarray | None = None  # before merging: the merge is made when needed, so
    n_contexts: int = 1                 # the candidates of each merge share one array
    merge: int = 0
    merge_estimates: "_MergeEstimates | None" = None  # shared by the candidates of each merge
    coded: tuple | None = None  # (section, params, ideal bits) once entropy-coded
    estimate: float | None = None  # estimated_bytes, once asked (coder and itemsize are the tensor's)

    def coded_contexts(self) -> tuple[np.ndarray | None, int]:
        """(contexts, n_contexts) as the entropy coder sees them."""
        if self.contexts is None:
            return None, 1  # (one context: the coders take None for all zeros)
        return merged_contexts(self.contexts, self.merge, self.n_contexts) if self.merge else (self.contexts, self.n_contexts)

    def estimated_bytes(self, coder: str, itemsize: int, threads: int = 1) -> float:
        """Size estimate used to pick a candidate without entropy-coding every one (Huffman is
        cheap to run and has no estimate, so its coded section is kept for the winner); a
        candidate compared more than once (the best so far) is estimated once. threads: a
        large tensor's element ranges (the same estimate)."""
        if self.estimate is None:
            self.estimate = self._estimated_bytes(coder, itemsize, threads)
        return self.estimate

    def _estimated_bytes(self, coder: str, itemsize: int, threads: int) -> float:
        side = sum(len(data) for _, data in self.side_sections) + _escape_bytes(self.quantized, itemsize)
        if coder == "huffman":
            self.coded = _code(self.codes, coder, None, 1, False)
            return side + len(self.coded[0])
        if self.merge_estimates is not None:
            return side + self.merge_estimates.bits(self.merge, threads) / 8
        if self.contexts is None:
            return side + rans.estimated_bits(self.codes, None, 1, threads) / 8
        return side + rans.estimated_bits(self.codes, *self.coded_contexts(), threads) / 8


def _escape_bytes(quantized: _Quantized, itemsize: int) -> float:
    """Estimated size of a quantization's escapes: for a value stored whole, its bytes and 2
    for its position; for an F16 or BF16 element 2 in all (after zstd, its position took
    about 0.8 bytes and its delta 0.5 on the BF16 transformer at rel 1e-3; its code is
    counted with the others)."""
    return quantized.n_escaped * (2 if quantized.deltas is not None else itemsize + 2)


class _MergeEstimates:
    """The size estimate of every merge of one context array, from one pass on first use."""

    def __init__(self, codes, contexts, n_contexts):
        self.codes, self.contexts, self.n_contexts = codes, contexts, n_contexts
        self._bits = None

    def bits(self, merge: int, threads: int = 1) -> float:
        if self._bits is None:
            self._bits = rans.estimated_bits_by_merge(self.codes, self.contexts, self.n_contexts, MAX_MERGE_SHIFT, threads)
        return float(self._bits[merge])


def _quantized_or_lossless(name, array, values, dtype, shape, eb, config, previous, measure_ideal, threads=1,
                           values_part=None, linear_part: "_FitLowRank | None" = None, reuse=None) -> Encoded:
    """values_part: None, or a call that gives the values' own low-rank part (see
    _values_low_rank_part), where the tensor tries one; linear_part: None, or how to fit a
    part added to a linear prediction, where it tries one; reuse: the recipe to rebuild
    instead of searching."""
    if not (eb > 0 and math.isfinite(eb)):
        return _lossless(name, array, dtype, shape)
    if reuse is not None:
        recipe = (reuse[0], reuse[1], None, None)  # fit and merge chosen afresh
    else:
        # A large tensor picks its candidate on a sample of its rows, then builds only that one:
        # a fraction of the passes, and one candidate's arrays in memory instead of all of theirs.
        recipe = _choice_on_sample(values, dtype, shape, eb, config, previous) if values.size > _SAMPLED_ABOVE else None
    itemsize = numpy_dtype(dtype).itemsize
    # A rebuilt recipe still competes with no prediction, so a reusing round never codes a
    # tensor worse than without it (a sampled recipe trusts the sample). Only the estimate is
    # kept meanwhile: no prediction's arrays would add a candidate's memory to a large tensor,
    # which estimates it on a sample of its rows where the recipe shifts the codes, or where
    # it is no prediction plus the values' own low-rank part (then built only if that part
    # loses to it).
    shifted = recipe is not None and recipe[0] in ("ema", "linear")
    part_only = reuse is not None and recipe[0] == "none" and values_part is not None
    none_sampled = (shifted or part_only) and reuse is not None and values.size > _SAMPLED_ABOVE
    plain = (None if (shifted and reuse is None) or none_sampled
             else _quantize(values, dtype, eb, _NO_PREDICTION, keep_recon=False, threads=threads))
    if plain is not None and plain.n_escaped > _ESCAPE_SHARE_FOR_LOSSLESS * values.size:
        return _lossless(name, array, dtype, shape)  # bound below the data's resolution
    plain_checked = plain is not None
    none_bytes = math.inf
    if none_sampled:
        none_bytes = _sampled_none_bytes(values, dtype, shape, eb, config, itemsize)
    elif reuse is not None and reuse[0] != "none":
        none_bytes = _Candidate("none", plain, {}, [], plain.codes).estimated_bytes(config.coder, itemsize, threads)
        if shifted:
            plain = None
    candidates = [] if plain is None or (recipe and recipe[0] != "none") else [_Candidate("none", plain, {}, [], plain.codes)]
    # A large tensor's sampled linear recipe fits its low-rank part as it is built (one build,
    # one candidate's arrays); elsewhere the part is tried after the choice, below.
    low_rank_inside = linear_part is not None and bool(recipe) and recipe[0] == "linear"
    predicted = () if recipe and recipe[0] == "none" else _predicted_candidates(
        values, dtype, shape, eb, config, previous, plain, recipe, linear_part if low_rank_inside else None, threads)
    best = candidates[0] if candidates else None
    any_predicted = False
    for candidate in predicted:  # one at a time: a loser's arrays go before the next is built
        any_predicted = True
        if best is None or candidate.estimated_bytes(config.coder, itemsize, threads) < best.estimated_bytes(
                config.coder, itemsize, threads):
            best = candidate
        del candidate
    if reuse is not None and reuse[0] != "none" and not any_predicted:  # the last recipe does not apply this round: search
        return _quantized_or_lossless(name, array, values, dtype, shape, eb, config, previous, measure_ideal, threads,
                                      values_part, None if linear_part is None else _FitLowRank(None))
    if best is None and not (part_only and none_sampled):  # the sample's choice is not available on the whole tensor
        return _quantized_or_lossless(name, array, values, dtype, shape, eb, config, None, measure_ideal, threads,
                                      values_part, linear_part)
    del candidates, predicted, plain  # the losers' arrays go before a low-rank candidate is built
    if best is not None and none_bytes < best.estimated_bytes(config.coder, itemsize, threads):
        best = None  # (a context recipe oriented the plain codes in place: quantized again)
        plain = _quantize(values, dtype, eb, _NO_PREDICTION, keep_recon=False, threads=threads)
        best = _Candidate("none", plain, {}, [], plain.codes)
    if values_part is not None or (linear_part is not None and not low_rank_inside):
        best = _with_low_rank(values, dtype, shape, eb, config, previous, best, itemsize, threads, values_part,
                              on_linear=linear_part is not None and not low_rank_inside, best_bytes=none_bytes)
    if best is None:  # no prediction's sampled estimate beat the low-rank part: build it
        plain = _quantize(values, dtype, eb, _NO_PREDICTION, keep_recon=False, threads=threads)
        best = _Candidate("none", plain, {}, [], plain.codes)
    if not plain_checked and best.quantized.n_escaped > _ESCAPE_SHARE_FOR_LOSSLESS * values.size:
        return _lossless(name, array, dtype, shape)
    codes_section, coder_params, bits = best.coded or _code(best.codes, config.coder, *best.coded_contexts(), measure_ideal,
                                                            threads)
    params = {"eb": eb, "predictor": best.predictor, **coder_params, **best.side_params, "escaped": best.quantized.n_escaped}
    sections = [("codes", codes_section), *best.side_sections, *_escape_sections(array, dtype, best.quantized)]
    recon = best.quantized.recon
    if recon is None:
        if _fused_fits(dtype, values.size):
            return _fused_tail(name, values, dtype, shape, eb, config, previous, best.quantized, params, sections, bits)
        recon = _reconstructed(values, dtype, eb, best.quantized, threads)
    return _encoded(name, dtype, shape, "quantized", params, sections, narrow(recon, dtype), bits)


def _fused_tail(name, values, dtype, shape, eb, config, previous, quantized: _Quantized, params, sections, bits) -> Encoded:
    """The Encoded of a small tensor whose codes are entropy-coded, with its new state: what
    _reconstructed, _encoded and advance_state give, from one kernel call (fused_encode.py).
    The codes are spent: their memory becomes the new EMA (the new arrays would otherwise add
    5 bytes an element to a small model's peak)."""
    n = values.size
    codes = quantized.codes
    reusable = codes.dtype == np.int32 and codes.size == n and codes.flags.c_contiguous
    fold = _Fold.of(previous, shape, dtype, codes.view(np.float32) if reusable else None)
    if not fold.fits(n):  # (a state built by hand: the general path copes with it)
        return _encoded(name, dtype, shape, "quantized", params, sections,
                        narrow(_reconstructed(values, dtype, eb, quantized), dtype), bits)
    escape_index, escape_values = _NO_ESCAPES if not quantized.n_escaped else (
        np.flatnonzero(quantized.escaped), values[quantized.escaped])
    # a float32 reconstruction is built in the new state's last one (one copy, 4 bytes an element)
    shared = compute_dtype(dtype) == np.float32
    recon = fold.state.last if shared else np.empty(n, compute_dtype(dtype))
    orient_signs = _NO_SIGNS if quantized.oriented_by is None else quantized.oriented_by
    quantized.oriented_by = None
    recon_hash = int(reconstruct_and_fold(codes, orient_signs, *quantized.prediction.kernel_args(), eb, recon,
                                          escape_index, escape_values.astype(recon.dtype, copy=False), _NO_DELTAS, fold.ema,
                                          config.beta, fold.first_round, fold.state.ema, fold.state.sign,
                                          _NO_STATE if shared else fold.state.last, _NOT_NARROWED, False))
    encoded = _encoded(name, dtype, shape, "quantized", params, sections, recon, bits, recon_hash)
    encoded.state = fold.sealed(config, recon_hash, recipe_of(encoded.record))
    return encoded


def _with_low_rank(values, dtype, shape, eb, config, previous, best: _Candidate | None, itemsize, threads, values_part,
                   on_linear=True, best_bytes=math.inf) -> _Candidate | None:
    """The best candidate, or one with a low-rank part where that is smaller (the factors'
    section included): the part of what a linear best's prediction leaves, added to it (same
    recipe, fit and merge; unless on_linear is False: already tried), and the part of the
    values themselves as the whole prediction (predictor `low_rank`, plain or under the
    residual's scale contexts). The second often wins on a layer with a linear best: the
    reconstructions the linear prediction is made of carry their quantization noise, which
    is not low rank."""
    # One challenger at a time against the best so far, so a loser's arrays (codes, escape
    # mask, contexts: 6 bytes an element) are freed before the next is built. best may be
    # None, an estimate of best_bytes not built (None is returned if nothing beats it).
    if best is not None:
        best_bytes = best.estimated_bytes(config.coder, itemsize, threads)

    def smaller(challengers, best):
        nonlocal best_bytes
        for challenger in challengers:
            challenger_bytes = challenger.estimated_bytes(config.coder, itemsize, threads)
            if challenger_bytes < best_bytes:
                best, best_bytes = challenger, challenger_bytes
        return best

    if on_linear and best is not None and best.predictor == "linear":
        low_rank = _low_rank_part(values, shape, eb, best.quantized.prediction, threads)
        if low_rank is not None:
            fit = best.side_params.get("fit")
            recipe = ("linear", _variant(best.side_params), best.side_params.get("context_merge", 0), tuple(fit) if fit else None)
            best = smaller(_predicted_candidates(values, dtype, shape, eb, config, previous, None, recipe, low_rank,
                                                 threads), best)
    low_rank = values_part() if values_part is not None else None
    if low_rank is not None:
        factors, params, sections = low_rank
        quantized = _quantize(values, dtype, eb, _Prediction(_NO_STATE, 0.0, 0.0, _NO_SIGNS, low_rank=factors), keep_recon=False,
                              threads=threads)
        alone = _Candidate("low_rank", quantized, params, sections, quantized.codes)
        best = smaller([alone], best)
        best = smaller(_residual_scale_candidates(alone, shape, eb, _NO_STATE, 0.0, 0.0,
                                                  {**params, "contexts": "scale", "sign_oriented": False}, None, threads), best)
    return best


class _FitLowRank(NamedTuple):
    """For _linear_candidates: fit a low-rank part to the prediction's own residual, at this
    rank (the last search's, between searches) or, with None, at the rank the fit finds."""

    rank: int | None


@contextlib.contextmanager
def _values_low_rank_part(values, shape, eb, threads, wanted, rank=None):
    """Yields None where the tensor tries no low-rank part, else a call that returns the
    values' own part (_low_rank_part with no linear prediction). With more than one thread
    that fit runs in the background from the start, beside the choice of the best candidate,
    which it does not depend on; the block waits for it on leaving, however it leaves."""
    if not wanted:
        yield None
        return
    if threads <= 1:
        yield lambda: _low_rank_part(values, shape, eb, None, threads, rank)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_low_rank_part, values, shape, eb, None, threads, rank)
        yield future.result


def _low_rank_part(values, shape, eb, linear: "_Prediction | None", threads, rank=None):
    """(factors, params, sections) of the low-rank part of what the linear prediction (or
    none) leaves of values, or None where the factors would not pay for themselves (rank: as
    fit_low_rank's)."""
    rows = shape[0]
    if linear is None:
        residual = values.astype(np.float32, copy=False)
    else:
        residual = np.empty(values.size, np.float32)
        linear_residual(values, linear.last, linear.second_last, linear.w_last, linear.w_second, linear.row_length, residual)
    factors = fit_low_rank(residual.reshape(rows, -1), eb, rans.estimated_bits, rank, threads)
    del residual
    if factors is None:
        return None
    rank, cols = factors.right.shape
    factor_codes = np.concatenate([factors.left.ravel(), factors.right.ravel()]).astype(np.int32)
    sections = [("low_rank", rans.encode(factor_codes, factor_contexts(rank, rows, cols), rank, threads))]
    return factors, {"rank": rank, "rank_step": factors.step}, sections


def _sampler(shape, size) -> tuple:
    """(step, sample shape, side section not scaled up, take): take(flat) is every step-th row
    (or column, or element) of a tensor, about SAMPLE_ELEMENTS elements; the side section
    covers the unsampled axis whole."""
    step = -(-size // SAMPLE_ELEMENTS)
    if len(shape) >= 2 and shape[0] // step >= 8:
        def take(flat):
            return np.ascontiguousarray(flat.reshape(shape[0], -1)[::step]).reshape(-1)
        return step, (-(-shape[0] // step),) + tuple(shape[1:]), "col_scale", take
    if len(shape) == 2 and shape[1] // step >= 8:
        def take(flat):
            return np.ascontiguousarray(flat.reshape(shape)[:, ::step]).reshape(-1)
        return step, (shape[0], -(-shape[1] // step)), "row_scale", take
    def take(flat):
        return np.ascontiguousarray(flat[::step])
    return step, (-(-size // step),), None, take


def _sampled_none_bytes(values, dtype, shape, eb, config, itemsize) -> float:
    """No prediction's estimated size, from a sample of the tensor: the payload scaled up,
    the frequency table once."""
    step, _, _, take = _sampler(shape, values.size)
    plain = _quantize(take(values), dtype, eb, _NO_PREDICTION, keep_recon=False)
    if config.coder != "rans":
        return _Candidate("none", plain, {}, [], plain.codes).estimated_bytes(config.coder, itemsize) * step
    ideal, table = rans.ideal_and_table_bits(plain.codes, np.zeros(plain.codes.size, np.uint8), 1)
    return step * (ideal / 8 + _escape_bytes(plain, itemsize)) + table / 8


def _choice_on_sample(values, dtype, shape, eb, config, previous) -> tuple:
    """(predictor, variant, merge, fit) of the smallest candidate on about SAMPLE_ELEMENTS
    elements: every k-th row (or column, or element) of the tensor. The variant is the context
    source or shift signs, prefixed by "rows," for linear weights per row."""
    step, sample_shape, whole, take = _sampler(shape, values.size)
    sample = take(values)
    sample_previous = None
    if _has_history(previous, shape, dtype):
        sample_previous = TensorState(sample_shape, dtype, previous.rounds, take(previous.ema), take(previous.sign),
                                      take(previous.last), take(previous.second_last), previous.recipe)
    plain = _quantize(sample, dtype, eb, _NO_PREDICTION, keep_recon=False)

    def whole_tensor_bytes(candidate):
        unscaled = sum(len(data) for section, data in candidate.side_sections if section == whole)
        return (candidate.estimated_bytes(config.coder, numpy_dtype(dtype).itemsize) - unscaled) * step + unscaled

    # min over the generator keeps one candidate besides the best (a sample's arrays, by 8 or so)
    best = min(itertools.chain([_Candidate("none", plain, {}, [], plain.codes)],
                               _predicted_candidates(sample, dtype, sample_shape, eb, config, sample_previous, plain, None)),
               key=whole_tensor_bytes)
    # The sample's tables weigh more than the whole tensor's: scale contexts try every merge
    # again on the whole tensor (with the sample's fit); other large tensors use no merge.
    fit = best.side_params.get("fit")
    return best.predictor, _variant(best.side_params), None if fit else 0, tuple(fit) if fit else None


def _variant(params: dict) -> str | None:
    """A recipe's variant, from a candidate's side parameters or a record's: the context
    source or shift signs, prefixed by "rows," for linear weights per row."""
    variant = params.get("contexts", params.get("signs"))
    if params.get("weights") == "rows":
        variant = "rows" + (f",{variant}" if variant else "")
    return variant


def _predicted_candidates(values, dtype, shape, eb, config, previous, plain, recipe=None, low_rank=None,
                          threads=1) -> Iterator[_Candidate]:
    """The coding-context candidates (from this round's row and column scales, from the
    state, or both), the EMA-shift candidate and the linear candidates (plain and under scale
    contexts), where the shape and the state allow them; with a recipe (predictor, variant,
    merge, fit), only that candidate (in every merge if its merge is None), built with the
    plain codes oriented in place (nothing else uses them then). low_rank: (factors, params,
    sections) of a low-rank part added to the linear prediction, or a _FitLowRank to fit one.
    A generator: a caller that keeps only the best so far holds one candidate's arrays at a
    time (plus the plain codes the context candidates share)."""
    def wanted(predictor, source=None):
        return recipe is None or (recipe[0], recipe[1]) == (predictor, source)

    history = _has_history(previous, shape, dtype) and (config.magnitude_prediction or config.sign_prediction)
    wants_scale = (config.coder == "rans" and _has_scales(shape, values.size)
                   and (recipe is None or (recipe[1] or "").split(",")[-1].startswith("scale")))
    # The values' own levels only where a context candidate reads them (a linear one takes its
    # residual's): a reusing linear round of cnn5fc's FC layer built them for nothing, 1.3 ms.
    scales = _scale_side(values, shape) if wants_scale and (recipe is None or recipe[0] == "context") else None
    if not history:
        if scales is not None and wanted("context", "scale"):
            yield from _scale_candidates(values, plain.codes, plain, scales, eb, _NO_STATE, 0.0, 0.0,
                                         {"contexts": "scale", "sign_oriented": False}, recipe, threads=threads)
        return
    mean, std = magnitude_stats(values)
    if not (math.isfinite(mean) and math.isfinite(std)):
        return  # statistics overflow only for values near the float max
    mean, std = _rounded(mean), _rounded(std)
    side = {"mean": mean, "std": std}
    # Once the linear prediction has won a tensor's search, its later searches skip the EMA
    # shift and the EMA contexts: on the corpus at rel 1e-2 and 1e-3 those two won 4 of the
    # 141 searches that followed a linear win, saving 0.0024% of the streams, and took 11% of
    # a small CNN's compression, 6% of a transformer's (docs/design.md). A tensor's first
    # search tries them.
    ema_candidates = recipe is not None or previous.recipe is None or previous.recipe[0] != "linear"
    if config.coder == "rans" and (recipe is None or recipe[0] == "context"):
        oriented = plain.codes if recipe else plain.codes.copy()
        if config.sign_prediction:
            orient_by_sign(oriented, previous.sign)
            if oriented is plain.codes:
                plain.oriented_by = previous.sign
        params = {**side, "sign_oriented": config.sign_prediction}
        own = "ema" if config.magnitude_prediction else "none"
        if wanted("context", own) and (ema_candidates or own != "ema"):
            contexts = np.zeros(values.size, np.uint8)
            if config.magnitude_prediction:
                magnitude_contexts(previous.ema, mean, std, eb, contexts)
            yield from _context_candidates(plain, oriented, contexts, {**params, "contexts": own}, [], values.size,
                                           recipe, N_MAGNITUDE_BUCKETS if config.magnitude_prediction else 1)
            del contexts
        if scales is not None:
            for source, ema in (("scale", _NO_STATE), ("scale_ema", previous.ema)):
                if (source == "scale_ema" and not config.magnitude_prediction) or not wanted("context", source):
                    continue
                yield from _scale_candidates(values, oriented, plain, scales, eb, ema, mean, std,
                                             {**params, "contexts": source}, recipe, threads=threads)
        del oriented
    if config.magnitude_prediction and config.sign_prediction and wanted("ema", "kernel") and ema_candidates:
        sign_prediction = _sign_prediction(values, shape, config.tau, previous.sign)
        if sign_prediction is not None:
            signs, shift_params, shift_sections = sign_prediction
            shifted = _quantize(values, dtype, eb, _Prediction(previous.ema, mean, std, signs), keep_recon=False,
                                threads=threads)
            yield _Candidate("ema", shifted, {**side, "signs": "kernel", **shift_params}, shift_sections, shifted.codes)
            del shifted
    if config.magnitude_prediction and config.sign_prediction:
        for by_row in (False, True) if _rows_weighted(shape) else (False,):
            plain_variant, scale_variant = ("rows", "rows,scale_ema") if by_row else (None, "scale_ema")
            if not (wanted("linear", plain_variant) or (wants_scale and wanted("linear", scale_variant))):
                continue
            linear = _linear_candidates(values, dtype, eb, previous, by_row, keep_recon=False, low_rank=low_rank,
                                        threads=threads)
            if wanted("linear", plain_variant):
                yield from linear
            if linear and wants_scale and wanted("linear", scale_variant):
                # Late in training updates persist so strongly that the prediction pays even
                # on top of the scale contexts (the 1M-element FC layer). The row and column
                # scales are the residual's: a row that persists has a small residual however
                # large its values (3.0-3.4% of the cnn5fc streams at rel 1e-3).
                params = {**side, **linear[0].side_params, "sign_oriented": True, "contexts": "scale_ema"}
                yield from _residual_scale_candidates(linear[0], shape, eb, previous.ema, mean, std, params, recipe, threads)
            del linear


def _residual_scale_candidates(base: _Candidate, shape, eb, ema, mean, std, params, recipe, threads=1) -> list[_Candidate]:
    """Scale-context candidates of a prediction's residual (linear or low rank): the row and
    column levels and the fit are taken of |q| 2eb rather than |x|, and the prediction's own
    side sections are sent along. Empty where the shape has no scales."""
    scales = _scale_side(base.codes, shape, 2.0 * eb)
    if scales is None:
        return []
    return _scale_candidates(base.codes, base.codes, base.quantized, scales, eb, ema, mean, std, params, recipe,
                             predictor=base.predictor, extra_sections=base.side_sections, threads=threads)


def _rows_weighted(shape) -> bool:
    """Whether a tensor's linear prediction may weight each row (axis 0) on its own: where
    rows are long enough that 4 bytes each can pay. It also tries one pair in all, which
    wins on the small models (on the FC layer of cnn5fc the rows win by 2-4%)."""
    return len(shape) >= 2 and shape[0] >= 2 and element_count(shape) // shape[0] >= MIN_ROW_ELEMENTS


def _linear_candidates(values, dtype, eb, previous, by_row, keep_recon=True, low_rank=None, threads=1) -> list[_Candidate]:
    """The last two reconstructions weighted by least squares (in all or per row), codes
    oriented by the prediction's sign. Empty when the fit gives no usable weights."""
    rows = previous.shape[0] if by_row else 1
    sums = np.zeros((rows, 5))
    linear_fit_sums_on(values, previous.last, previous.second_last, values.size // rows, sums, threads)
    if by_row:
        weights = fitted_row_weights(sums, previous.rounds >= 2)
        params, sections = {"weights": "rows"}, [("row_weights", lossless.compress(weights.astype("<i2").tobytes()))]
        w_last, w_second = row_weights_as_floats(weights)
    else:
        fit = fitted_linear_weights(sums[0], previous.rounds >= 2)
        if fit is None:
            return []
        params, sections = {"weights": [_rounded(fit[0]), _rounded(fit[1])]}, []
        w_last, w_second = np.array(params["weights"][:1]), np.array(params["weights"][1:])
    prediction = _Prediction.linear(previous, w_last, w_second)
    if isinstance(low_rank, _FitLowRank):
        low_rank = _low_rank_part(values, previous.shape, eb, prediction, threads, low_rank.rank)
    if low_rank is not None:
        params, sections = {**params, **low_rank[1]}, sections + low_rank[2]
        prediction = _Prediction.linear(previous, w_last, w_second, low_rank[0])
    quantized = _quantize(values, dtype, eb, prediction, keep_recon, threads)  # codes oriented by the kernel
    return [_Candidate("linear", quantized, params, sections, quantized.codes)]


def _scale_candidates(values, codes, quantized, scales, eb, ema, mean, std, params, recipe, predictor="context",
                      extra_sections=(), threads=1) -> list[_Candidate]:
    """Scale-context candidates: the weights of the row-and-column level and the predicted
    level are fitted to this tensor (or taken from the recipe), then every merge is tried.
    extra_sections: the prediction's own side sections, sent along. threads: a large
    tensor's rows."""
    if recipe and recipe[3] is not None:
        weights = recipe[3]
    else:
        sums = np.zeros(9)
        scale_fit_sums_on(values, scales.unit, scales.rows, scales.cols, scales.taps, eb, ema, mean, std, sums, threads,
                          row_step=_scale_fit_row_step(values.size, scales.rows.size))
        weights = fitted_weights(sums, ema.size > 0)
    contexts = np.empty(values.size, np.uint8)  # (scale_contexts writes every element, as the decoder's)
    scale_contexts_on(scales.rows, scales.cols, scales.taps, eb, ema, mean, std, *weights, contexts, threads)
    return _context_candidates(quantized, codes, contexts, {**params, "fit": list(weights)}, [*extra_sections, *scales.sections],
                               values.size, recipe, N_SCALE_BUCKETS, every_merge=True, predictor=predictor)


def _context_candidates(quantized, codes, contexts, params, side_sections, n, recipe, n_contexts=N_MAGNITUDE_BUCKETS,
                        every_merge=False, predictor="context") -> list[_Candidate]:
    """A context candidate, plus merged-bucket variants for tensors too small to pay for a
    frequency table per bucket, or always where every_merge (with a recipe: its merge only,
    unless that is None)."""
    if recipe and recipe[2] is not None:
        merges = [recipe[2]]
    elif n_contexts > 1 and (every_merge or n < _MERGE_TRIAL_ELEMENTS):
        merges = range(MAX_MERGE_SHIFT + 1)
    else:
        merges = [0]
    estimates = _MergeEstimates(codes, contexts, n_contexts) if len(merges) > 1 else None
    candidates = []
    for merge in merges:
        candidates.append(_Candidate(predictor, quantized, {**params, "context_merge": merge}, side_sections, codes, contexts,
                                     n_contexts, merge, estimates))
    return candidates


class _Scales(NamedTuple):
    rows: np.ndarray  # int16 levels
    cols: np.ndarray
    taps: np.ndarray  # a conv's kernel positions (empty for a tensor of two axes or 1 x 1 kernels)
    sections: list
    unit: float  # what scale_levels took: 1.0 for the tensor, 2 eb for a prediction's codes


def _tap_count(shape) -> int:
    """A scale-context tensor's kernel positions with a level each: the product of the axes
    after the second where it is above 1, else 0."""
    taps = element_count(shape[2:])
    return taps if taps > 1 else 0


def _scale_fit_row_step(size: int, rows: int) -> int:
    """Every how many rows a tensor fits its scale-context weights: about _SCALE_FIT_ELEMENTS
    elements, and at least 8 rows (as _sampler's row samples)."""
    return max(1, min(size // _SCALE_FIT_ELEMENTS, rows // 8))


def _has_scales(shape, size: int) -> bool:
    """Whether a tensor tries scale contexts: 2 or more dimensions, at least _SCALE_MIN_ELEMENTS."""
    return len(shape) >= 2 and shape[0] * shape[1] != 0 and size >= _SCALE_MIN_ELEMENTS


def _scale_side(values, shape, unit=1.0) -> "_Scales | None":
    """The row, column and tap levels and their sections (the taps' behind the columns', in
    one zstd frame) for a tensor of 2 or more dimensions and at least _SCALE_MIN_ELEMENTS
    elements, else None. values and unit: the tensor (1.0) or a prediction's codes (2 eb; see
    scale_levels)."""
    if not _has_scales(shape, values.size):
        return None
    rows, cols = shape[0], shape[1]
    row_levels = np.empty(rows, np.int16)
    col_and_tap_levels = np.empty(cols + _tap_count(shape), np.int16)
    col_levels, tap_levels = col_and_tap_levels[:cols], col_and_tap_levels[cols:]
    scale_levels(values, unit, rows, cols, row_levels, col_levels, tap_levels)
    sections = [("row_scale", lossless.compress(row_levels.astype("<i2").tobytes())),
                ("col_scale", lossless.compress(col_and_tap_levels.astype("<i2").tobytes()))]
    return _Scales(row_levels, col_levels, tap_levels, sections, unit)


def _sign_prediction(values, shape, tau, previous_sign):
    """Predicted sign per element, its parameters and bitmap section, or None if none is predicted."""
    size = kernel_size(shape)
    n_kernels = values.size // size if size else 0
    predictable = np.zeros(n_kernels, np.bool_)
    kernel_sign = np.zeros(n_kernels, np.bool_)
    if size:
        kernel_consistency(values, size, tau, predictable, kernel_sign)
    oscillation = choose_oscillation(values, previous_sign, tau)
    if oscillation == OSCILLATION_NONE and not predictable.any():
        return None
    signs = np.empty(values.size, np.int8)
    sections = []
    if size:
        bitmap = np.packbits(predictable).tobytes() + np.packbits(kernel_sign[predictable]).tobytes()
        # the decoder's kernel on the bitmap it will read: one body on both sides, and a
        # compressor's warm-up loads it for its own decoder (a kernel first used on a later
        # round's record loads then, adding about 0.45 MiB to that call)
        if not signs_from_bitmap(previous_sign, oscillation, size, np.frombuffer(bitmap, np.uint8), signs):
            raise AssertionError("kernel bitmap does not match its flags")
        sections.append(("kernel_bitmap", lossless.compress(bitmap)))
    else:
        predicted_signs(previous_sign, oscillation, size, predictable, kernel_sign, signs)
    params = {"oscillation": int(oscillation), "kernel_size": size, "kernel_bitmap_bytes": len(bitmap) if size else 0}
    return signs, params, sections


def _code(codes, coder, contexts, n_contexts, measure_ideal, threads=1):
    """Entropy-code the quantization codes: (section bytes, params, ideal bits under the model or 0)."""
    if coder == "huffman":
        raw = huffman.encode(codes + RADIUS)
        return lossless.compress(raw), {"coder": "huffman", "huffman_bytes": len(raw)}, 0.0
    if measure_ideal:
        ideal = rans.ideal_bits(codes, np.zeros(codes.size, np.uint8) if contexts is None else contexts, n_contexts)
    else:
        ideal = 0.0
    return rans.encode(codes, contexts, n_contexts, threads), {"coder": "rans"}, ideal


def _escape_sections(array, dtype, quantized: _Quantized) -> list:
    if not quantized.n_escaped:
        return []
    index = np.flatnonzero(quantized.escaped)
    gaps = np.diff(index, prepend=0).astype("<u8")  # small, zstd-friendly
    positions = ("escape_index", lossless.compress(gaps.tobytes()))
    if quantized.deltas is not None:  # F16/BF16: differences from the decoder's narrowed values
        return [positions, ("escape_delta", lossless.compress(quantized.deltas[index].astype("<u2").tobytes()))]
    return [positions, ("escape_value", lossless.compress(original_bits(array, dtype)[index].tobytes()))]


@dataclass
class EncodedBundle:
    record: dict
    payload: bytes
    recons: dict[str, np.ndarray]  # what the decoder will return per member
    recon_hash: int  # XXH64 of the members' reconstructed bytes, back to back in member order


def encode_bundle(members: list[tuple[int, str, np.ndarray]], config: CodecConfig, key: int = NO_STREAM_KEY,
                  index: int = 0) -> EncodedBundle:
    """One record for the small tensors of a round; members are (position, name, array).

    Float members are quantized at their own bound without prediction (they carry no state)
    and their codes share one rANS stream; the rest, and float members that would escape any
    element, are stored exactly. If quantizing does not beat the exact bytes, all are exact.
    key, index: as encode_tensor's."""
    bundle = _smaller_bundle(members, config)
    bundle.record["recon_check"] = record_check(key, index, _bundle_layout(bundle.record["members"]), bundle.recon_hash)
    return bundle


def _smaller_bundle(members, config) -> EncodedBundle:
    dtypes = [dtype_name(array) for _, _, array in members]
    quantized = _bundle_members_quantized(members, dtypes, config)
    if any(q is not None for q in quantized):
        lossy = _bundle(members, dtypes, quantized)
        # The exact bundle is built only where it wins: its size alone is a zstd call.
        if len(lossy.payload) < _exact_bundle_bytes(members, dtypes):
            return lossy
    return _bundle(members, dtypes, [None] * len(members))


class _BundleMember(NamedTuple):
    """A float32 member's codes and reconstruction (slices of the fused arrays)."""

    codes: np.ndarray
    recon: np.ndarray


def _bundle_members_quantized(members, dtypes, config) -> list:
    """_bundle_member_quantized of every member: the float32 ones (nearly all, in practice)
    in two kernel calls over their concatenated values, the same codes and bounds as one at
    a time (15 calls of 7 us each on a small CNN's round took half the bundle's time)."""
    quantized = [None] * len(members)
    fused = [i for i, ((_, _, array), dtype) in enumerate(zip(members, dtypes))
             if dtype == "F32" and array.size and not config.exact_small]
    for i in set(range(len(members))) - set(fused):
        quantized[i] = _bundle_member_quantized(members[i][2], dtypes[i], config)
    if not fused:
        return quantized
    values = np.concatenate([np.ascontiguousarray(members[i][2]).reshape(-1) for i in fused]).astype(np.float32, copy=False)
    run_ends = np.fromiter(itertools.accumulate(members[i][2].size for i in fused), np.int64, len(fused))
    if config.mode == "abs":
        ebs = np.full(len(fused), float(config.error_bound))
    else:
        counts, los, his = finite_ranges(values, run_ends)
        ebs = np.array([_relative_bound(config, *run) for run in zip(counts.tolist(), los.tolist(), his.tolist())])
    codes = np.empty(values.size, np.int32)
    recon = np.empty(values.size, np.float32)
    escapes = quantize_runs(values, run_ends, ebs, codes, recon)
    start = 0
    for i, stop, eb, n_escaped in zip(fused, run_ends.tolist(), ebs.tolist(), escapes.tolist()):
        if eb > 0 and math.isfinite(eb) and not n_escaped:
            quantized[i] = (eb, _BundleMember(codes[start:stop], recon[start:stop]))
        start = stop
    return quantized


def _bundle_member_quantized(array, dtype, config) -> tuple[float, _Quantized] | None:
    """(eb, quantized) for a float member coded lossily, or None to store it exactly."""
    if config.exact_small or dtype not in LOSSY_DTYPES or array.size == 0:
        return None
    values = widen(array, dtype)
    eb = absolute_bound(values, config)
    if not (eb > 0 and math.isfinite(eb)):
        return None
    quantized = _quantize(values, dtype, eb, _NO_PREDICTION)
    return None if quantized.n_escaped else (eb, quantized)


def _exact_data(members, dtypes) -> tuple[bytes, bytes, bool]:
    """(raw bytes of the members stored exactly, the data section, whether it is zstd)."""
    raw = _joined_little_endian([array for _, _, array in members], dtypes)
    packed = lossless.compress(raw) if raw else b""
    use_zstd = len(packed) < len(raw)  # float noise does not compress; skip zstd's frame then
    return raw, packed if use_zstd else raw, use_zstd


def _exact_bundle_bytes(members, dtypes) -> int:
    """The payload size of the bundle with every member exact (as _bundle would pad it)."""
    raw, data, _ = _exact_data(members, dtypes)
    return max(len(data), len(raw) // MAX_ELEMENTS_PER_PAYLOAD_BYTE + 1)


def _joined_little_endian(arrays, dtypes) -> bytes:
    """The arrays' stored bytes (_little_endian_bytes), one after another, without a call per
    array where it is its stored bytes already (native and contiguous on a little-endian
    host, BF16 included: its bit patterns): a bundle's members are small."""
    return b"".join(array if _LITTLE_ENDIAN_HOST and array.dtype.isnative and array.flags.c_contiguous
                    else _little_endian_bytes(array, dtype) for array, dtype in zip(arrays, dtypes))


def _bundle(members, dtypes, quantized) -> EncodedBundle:
    entries, exact_members, codes, recons = [], [], [], {}
    for (position, name, array), dtype, coded in zip(members, dtypes, quantized):
        entries.append([position, name, dtype, [int(s) for s in array.shape], coded[0] if coded else 0.0])
        if coded:
            codes.append(coded[1].codes)
            recons[name] = narrow(coded[1].recon, dtype).reshape(array.shape)
        else:
            exact_members.append(((position, name, array), dtype))
            recons[name] = array
    raw, data, use_zstd = _exact_data([m for m, _ in exact_members], [d for _, d in exact_members])
    sections = [("data", data)]
    n_coded = sum(c.size for c in codes)
    if n_coded:
        all_codes = np.concatenate(codes)
        sections.append(("codes", rans.encode(all_codes, None, 1)))
    sections = _padded(sections, len(raw) + n_coded)
    # Members are small: one join and one hash beat a hash update per member.
    ordered = [recons[name] for _, name, _ in members]
    recon_hash = xxh64(_joined_little_endian(ordered, dtypes))
    record = {"method": "bundle", "members": entries, "params": {"zstd": use_zstd, "raw_bytes": len(raw), "coded": n_coded},
              "sections": [[section, len(data)] for section, data in sections]}  # (encode_bundle adds recon_check)
    return EncodedBundle(record, b"".join(data for _, data in sections), recons, recon_hash)


def decode_bundle(record: dict, payload: bytes, key: int = NO_STREAM_KEY, index: int = 0) -> list[tuple[int, str, np.ndarray]]:
    """The (position, name, array) members of a bundle record (key, index: its stream's key
    and its place in the stream, which its recon_check binds). Raises CorruptStreamError."""
    try:
        return _decode_bundle(record, payload, key, index)
    except CorruptStreamError as exc:
        raise CorruptStreamError(f"small-tensor bundle: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, InputError) as exc:
        raise CorruptStreamError(f"small-tensor bundle: malformed record ({type(exc).__name__}: {exc})") from None


def _decode_bundle(record, payload, key, index):
    layout, run_ends, run_ebs = [], [], []
    raw_total = coded_total = 0
    all_float32 = True  # every member coded and F32: the reconstruction's bytes are values_float32's
    limit = (len(payload) + 1) * MAX_ELEMENTS_PER_PAYLOAD_BYTE
    for position, name, dtype, shape, eb in record["members"]:
        shape = tuple(shape)
        if not isinstance(name, str) or not isinstance(position, int) or position < 0:
            raise CorruptStreamError("bad member")
        for size in shape:  # (a loop: all() over a generator cost a microsecond a member)
            if not isinstance(size, int) or size < 0:
                raise CorruptStreamError(f"bad shape for {name!r}")
        if not isinstance(eb, float) or not (eb == 0.0 or (eb > 0 and math.isfinite(eb) and dtype in LOSSY_DTYPES)):
            raise CorruptStreamError(f"bad error bound for {name!r}")
        n = element_count(shape)
        if eb:
            np_dtype = None  # (a lossy dtype, checked above)
            coded_total += n
            run_ends.append(coded_total)
            run_ebs.append(eb)
            all_float32 = all_float32 and dtype == "F32"
        else:
            np_dtype = numpy_dtype(dtype)
            raw_total += n * np_dtype.itemsize
            all_float32 = False
        if raw_total + coded_total > limit:
            raise CorruptStreamError("members are too large for the payload")
        layout.append((position, name, dtype, np_dtype, shape, n, eb))
    params = record["params"]
    if params["raw_bytes"] != raw_total or params["coded"] != coded_total:
        raise CorruptStreamError("member sizes do not match the record")
    sections = _split_sections(record["sections"], payload)
    data = sections["data"]
    raw = lossless.decompress(data, raw_total) if params["zstd"] is True else data
    if len(raw) != raw_total:
        raise CorruptStreamError("payload size does not match the members")
    values = None
    if coded_total:  # every coded member's values in one kernel call
        codes = rans.decode_one_context(sections["codes"], coded_total)
        values = np.empty(coded_total, np.float64)
        dequantize_runs(codes, np.array(run_ends, np.int64), np.array(run_ebs), values)
    # F32 members are views of it (an F64 member beyond float32's range reads `values`)
    values_float32 = as_float32(values) if values is not None else None
    members, raw_offset, code_offset = [], 0, 0
    for position, name, dtype, np_dtype, shape, n, eb in layout:
        if eb:
            run = values[code_offset : code_offset + n] if dtype == "F64" else values_float32[code_offset : code_offset + n]
            array = (run.copy() if dtype == "F64" else narrow(run, dtype)).reshape(shape)
            code_offset += n
        else:
            nbytes = n * np_dtype.itemsize
            array = _from_little_endian(raw[raw_offset : raw_offset + nbytes], np_dtype, shape)
            raw_offset += nbytes
        members.append((position, name, array))
    if all_float32 and coded_total and _LITTLE_ENDIAN_HOST:  # (the members are consecutive views of it)
        recon_bytes = values_float32
    else:
        recon_bytes = _joined_little_endian([array for _, _, array in members], [dtype for _, _, dtype, *_ in layout])
    if record_check(key, index, _bundle_layout(record["members"]), xxh64(recon_bytes)) != record["recon_check"]:
        raise CorruptStreamError("reconstruction checksum mismatch")
    return members


# ---------------------------------------------------------------- decoding


def decode_tensor(record: dict, payload: bytes, config: CodecConfig, previous: TensorState | None, threads: int = 1,
                  key: int = NO_STREAM_KEY, index: int = 0):
    """Rebuild one tensor: (array, state after this round or None); threads for the rANS
    segments of a large tensor; key, index: its stream's key and its record's place in the
    stream, which its recon_check binds (record_check). Raises CorruptStreamError."""
    name = record.get("name", "?")
    try:
        array, state, recon_hash = _decode(record, payload, config, previous, threads)
    except CorruptStreamError as exc:
        raise CorruptStreamError(f"tensor {name!r}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, InputError) as exc:
        raise CorruptStreamError(f"tensor {name!r}: malformed record ({type(exc).__name__}: {exc})") from None
    if record_check(key, index, _tensor_layout(record), recon_hash) != record.get("recon_check"):
        raise CorruptStreamError(f"tensor {name!r}: reconstruction checksum mismatch (encoder and decoder disagree)")
    return array, state


def _decode(record, payload, config, previous, threads=1):
    dtype = record["dtype"]
    if not isinstance(record["name"], str) or not isinstance(dtype, str):
        raise CorruptStreamError("bad name or dtype")
    np_dtype = numpy_dtype(dtype)
    shape = tuple(record["shape"])
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CorruptStreamError("bad shape")
    n = element_count(shape)
    if n > (len(payload) + 1) * MAX_ELEMENTS_PER_PAYLOAD_BYTE:
        raise CorruptStreamError(f"shape {list(shape)} is too large for a {len(payload)}-byte payload")
    sections = _split_sections(record["sections"], payload)
    params = record["params"]
    if not isinstance(params, dict):  # (the round's report, built later, reads it too)
        raise CorruptStreamError("bad params")
    method = record["method"]
    stateful = carries_state(dtype, shape, config)
    if method == "lossless":
        array = _from_little_endian(lossless.decompress(sections["data"], n * np_dtype.itemsize), np_dtype, shape)
    elif method == "quantized" and stateful:
        # The fused decoder fills the new state's arrays; elsewhere they are made after
        # decoding, when the codes are gone (4 bytes an element less at the peak).
        fold = _Fold.of(previous, shape, dtype) if _fused_decode_fits(params, dtype, n) else None
        array, recon_hash = _decode_quantized(params, sections, dtype, shape, n, config, previous, threads, fold)
        if recon_hash is None:  # (else the fused decoder hashed it and filled the state)
            recon_hash = _recon_hash(array, dtype)
            widened = widen(array, dtype)
            if fold is None:  # (one that the fused decoder passed up is still untouched)
                fold = _Fold.of(previous, shape, dtype, new_last=widened if widened.dtype == np.float32 else None)
            fold.fill(widened, config, threads)
        return array, fold.sealed(config, recon_hash, recipe_of(record)), recon_hash
    else:
        raise CorruptStreamError(f"unknown method {method!r}")
    recon_hash = _recon_hash(array, dtype)
    state = (advance_state(previous, shape, dtype, widen(array, dtype), config, recon_hash, recipe_of(record), threads,
                           own_recon=True) if stateful else None)
    return array, state, recon_hash


def _from_little_endian(raw, np_dtype, shape) -> np.ndarray:
    """A tensor (own, writable, native byte order) from its stored little-endian bytes."""
    le = np_dtype.newbyteorder("<") if np_dtype.itemsize > 1 else np_dtype
    return np.frombuffer(raw, le).astype(np_dtype, copy=True).reshape(shape)


def _split_sections(declared, payload) -> dict[str, memoryview]:
    payload = memoryview(payload)  # sections are views, not copies
    sections = {}
    offset = 0
    for section, length in declared:
        if not isinstance(section, str) or not isinstance(length, int) or length < 0 or section in sections:
            raise CorruptStreamError("bad section table")
        sections[section] = payload[offset : offset + length]
        offset += length
    if offset != len(payload):
        raise CorruptStreamError("section lengths do not add up to the payload")
    return sections


def _decode_quantized(params, sections, dtype, shape, n, config, previous, threads=1, fold: _Fold | None = None):
    """(the tensor, None), or where fold is given and the record fits the fused decoder
    (_fused_decode_fits), (the tensor, its reconstruction's XXH64) with fold's state filled."""
    eb = params["eb"]
    if not (isinstance(eb, float) and eb > 0 and math.isfinite(eb)):  # (a JSON number: never a string)
        raise CorruptStreamError("bad error bound")
    predictor = params["predictor"]
    prediction = _NO_PREDICTION
    contexts, n_contexts, orient = None, 1, False
    if predictor == "linear":
        if not _has_history(previous, shape, dtype):
            raise CorruptStreamError("stream uses a prediction but the state has no history for this tensor")
        weights = params["weights"]
        if weights == "rows":
            if not _rows_weighted(shape):
                raise CorruptStreamError("row weights on a tensor without rows")
            raw = lossless.decompress(sections["row_weights"], 4 * shape[0])
            w_last, w_second = row_weights_as_floats(np.frombuffer(raw, "<i2").reshape(shape[0], 2))
        elif (isinstance(weights, list) and len(weights) == 2 and all(isinstance(w, float) for w in weights)
                and all(abs(w) <= MAX_LINEAR_WEIGHT for w in weights) and weights[0] != 0.0):
            w_last, w_second = np.array(weights[:1]), np.array(weights[1:])
        else:
            raise CorruptStreamError("bad linear weights")
        factors = _decoded_low_rank(params, sections, shape, threads) if "rank" in params else None
        prediction = _Prediction.linear(previous, w_last, w_second, factors)  # dequantize orients the codes back
        if "contexts" in params:  # coded under contexts, as a `context` record's
            contexts, n_contexts, oriented = _decoded_contexts(params, sections, shape, dtype, n, eb, previous, threads)
            if not oriented:
                raise CorruptStreamError("a linear prediction orients its codes")
    elif predictor == "ema":
        if not _has_history(previous, shape, dtype):
            raise CorruptStreamError("stream uses a prediction but the state has no history for this tensor")
        mean, std = _magnitude_statistics(params)
        if params["signs"] != "kernel" or "contexts" in params:
            raise CorruptStreamError("bad shift signs")
        prediction = _Prediction(previous.ema, mean, std, _decoded_signs(params, sections, shape, previous.sign))
    elif predictor == "low_rank":
        prediction = _Prediction(_NO_STATE, 0.0, 0.0, _NO_SIGNS, low_rank=_decoded_low_rank(params, sections, shape, threads))
        if "contexts" in params:  # the residual's scales; codes oriented by the offset's sign, not the previous one
            if params["contexts"] != "scale" or params["sign_oriented"] is not False:
                raise CorruptStreamError("bad low-rank contexts")
            contexts, n_contexts, _ = _decoded_contexts(params, sections, shape, dtype, n, eb, previous, threads)
    elif predictor == "context":
        contexts, n_contexts, orient = _decoded_contexts(params, sections, shape, dtype, n, eb, previous, threads)
    elif predictor != "none":
        raise CorruptStreamError(f"unknown predictor {predictor!r}")
    if predictor in ("none", "ema", "context") and ("rank" in params or "rank_step" in params):
        # (the rank would go into the new state's recipe, which the next load refuses: bricked)
        raise CorruptStreamError(f"a low-rank part on a {predictor!r} record")

    escape_index, escape_values, escape_deltas = _decoded_escapes(params, sections, dtype, n)
    shared = fold is not None and fold.fits(n) and compute_dtype(dtype) == np.float32
    # (float32: the kernel builds the reconstruction in the new state's last array)
    recon = fold.state.last if shared else np.empty(n, compute_dtype(dtype))
    if fold is not None and fold.fits(n):
        inputs = rans.decode_inputs(sections["codes"], contexts, n_contexts, n)
        if inputs is not None:
            narrowed = np.empty(n, np.uint16) if dtype in ("BF16", "F16") else _NOT_NARROWED
            status, recon_hash = decode_and_fold(*inputs, previous.sign if orient else _NO_SIGNS, *prediction.kernel_args(threads),
                                                 eb, recon, escape_index, escape_values, escape_deltas, fold.ema,
                                                 config.beta, fold.first_round, fold.state.ema, fold.state.sign,
                                                 _NO_STATE if shared else fold.state.last, narrowed, dtype == "F16")
            rans.check_status(status)
            array = recon if not narrowed.size else as_bfloat16(narrowed) if dtype == "BF16" else narrowed.view(np.float16)
            return array.reshape(shape), int(recon_hash)
    codes = _decode_codes(params, sections["codes"], n, contexts, n_contexts, threads)
    if orient:
        orient_by_sign(codes, previous.sign)
    _dequantized(codes, prediction, eb, recon, threads)
    if escape_deltas.size:
        patch_escape_deltas(recon, escape_index, escape_deltas, dtype == "F16")
    elif escape_index.size:
        recon[escape_index] = escape_values
    return narrow(recon, dtype).reshape(shape), None


_NO_ESCAPES = (np.empty(0, np.int64), np.empty(0, np.float32))
_NO_DELTAS = np.empty(0, np.uint16)  # the escapes' deltas of an F32 or F64 tensor
_NOT_NARROWED = np.empty(0, np.uint16)  # the fused kernels' `narrowed` for F32 and F64 tensors


def _decoded_escapes(params, sections, dtype, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions as int64, values in the computed dtype, writable; deltas) of a record's
    escaped elements, positions checked in range and in order. An F16 or BF16 record stores
    deltas (recheck_narrowed; values then empty), others values (deltas then empty); all
    empty where none escaped."""
    n_escaped = params["escaped"]
    if not isinstance(n_escaped, int) or not 0 <= n_escaped <= n:
        raise CorruptStreamError("bad escape count")
    if not n_escaped:
        return _NO_ESCAPES[0], np.empty(0, compute_dtype(dtype)), _NO_DELTAS
    index = np.cumsum(np.frombuffer(lossless.decompress(sections["escape_index"], 8 * n_escaped), "<u8"), dtype=np.uint64)
    if index[-1] >= n or (n_escaped > 1 and not np.all(index[1:] > index[:-1])):
        raise CorruptStreamError("escape positions out of order or out of range")
    if dtype in ("F16", "BF16"):
        deltas = np.frombuffer(lossless.decompress(sections["escape_delta"], 2 * n_escaped), "<u2").astype(np.uint16)
        return index.astype(np.int64), np.empty(0, np.float32), deltas
    exact = np.frombuffer(lossless.decompress(sections["escape_value"], n_escaped * numpy_dtype(dtype).itemsize),
                          numpy_dtype(dtype).newbyteorder("<"))
    return index.astype(np.int64), np.array(widen(exact, dtype), copy=True), _NO_DELTAS


def _fused_fits(dtype, n, dtypes=("F32", "F64")) -> bool:
    """Whether the fused kernels (fused_encode.py, fused_decode.py) give a tensor's bits: one
    of dtypes, hashed as native bytes (little-endian hosts), and few enough elements that
    dequantizing and folding would each be one call on any thread count. The encoder's
    tail takes F32 and F64, whose computed values are their own (it keeps a BF16 tensor's
    reconstruction for the check after narrowing, so that tail is the general one)."""
    return dtype in dtypes and _LITTLE_ENDIAN_HOST and 0 < n < 2 * MIN_SPAN


def _fused_decode_fits(params, dtype, n) -> bool:
    """Whether the fused decoder takes this record: rANS codes, and _fused_fits with BF16
    and F16 too (narrowed in the kernel)."""
    return params.get("coder") == "rans" and _fused_fits(dtype, n, ("F32", "F64", "BF16", "F16"))


def _decoded_low_rank(params, sections, shape, threads) -> Factors:
    """The low-rank factors of a `linear` or `low_rank` record, as the encoder sent them."""
    rank, step = params["rank"], params["rank_step"]
    if (not low_rank_eligible(shape) or not isinstance(rank, int) or isinstance(rank, bool)
            or not 1 <= rank <= min(MAX_RANK, shape[0], element_count(shape) // shape[0])):
        raise CorruptStreamError("bad low-rank rank")
    if not isinstance(step, float) or not (step > 0 and math.isfinite(step)):
        raise CorruptStreamError("bad low-rank step")
    rows = shape[0]
    cols = element_count(shape) // rows
    codes = rans.decode(sections["low_rank"], factor_contexts(rank, rows, cols), rank, threads)
    if codes.size and int(np.abs(codes).max()) > FACTOR_LIMIT:
        raise CorruptStreamError("low-rank factor out of range")  # the offset is exact only below it
    return Factors(codes[: rank * rows].reshape(rank, rows), codes[rank * rows :].reshape(rank, cols), step)


def _magnitude_statistics(params) -> tuple[float, float]:
    """A record's EMA mean and std, which the encoder writes as finite JSON numbers (floats)."""
    mean, std = params["mean"], params["std"]
    if not (isinstance(mean, float) and isinstance(std, float) and math.isfinite(mean) and math.isfinite(std)):
        raise CorruptStreamError("bad magnitude statistics")
    return mean, std


def _decoded_contexts(params, sections, shape, dtype, n, eb, previous, threads=1):
    """(contexts, n_contexts, sign_oriented) of a `context` record, as the encoder built them."""
    source = params["contexts"]
    orient = params["sign_oriented"]
    if source not in CONTEXT_SOURCES or not isinstance(orient, bool):
        raise CorruptStreamError("bad context settings")
    if (orient or source in ("ema", "scale_ema")) and not _has_history(previous, shape, dtype):
        raise CorruptStreamError("stream uses a prediction but the state has no history for this tensor")
    if source == "none":
        return np.zeros(n, np.uint8), 1, orient
    # (scale_contexts writes every element of a tensor of this shape; magnitude_contexts as many as the EMA has)
    contexts = np.zeros(n, np.uint8) if source == "ema" else np.empty(n, np.uint8)
    mean, std = _magnitude_statistics(params) if source in ("ema", "scale_ema") else (0.0, 0.0)
    if source == "ema":
        magnitude_contexts(previous.ema, mean, std, eb, contexts)
    else:
        if len(shape) < 2 or shape[0] * shape[1] == 0:
            raise CorruptStreamError("scale contexts need two dimensions")
        row_levels = _decoded_levels(sections["row_scale"], shape[0])
        col_and_tap_levels = _decoded_levels(sections["col_scale"], shape[1] + _tap_count(shape))
        col_levels, tap_levels = col_and_tap_levels[:shape[1]], col_and_tap_levels[shape[1]:]
        fit = params["fit"]
        if (not isinstance(fit, list) or len(fit) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in fit)
                or not all(0 <= w <= MAX_WEIGHT for w in fit[:2]) or not -MAX_OFFSET <= fit[2] <= MAX_OFFSET
                or (source == "scale" and fit[1] != 0)):
            raise CorruptStreamError("bad scale-context fit")
        scale_contexts_on(row_levels, col_levels, tap_levels, eb, previous.ema if source == "scale_ema" else _NO_STATE, mean, std,
                          fit[0], fit[1], fit[2], contexts, threads)
    shift = params["context_merge"]
    if shift not in range(MAX_MERGE_SHIFT + 1) or isinstance(shift, bool):
        raise CorruptStreamError("bad context merge")
    n_buckets = N_MAGNITUDE_BUCKETS if source == "ema" else N_SCALE_BUCKETS
    if shift:  # merged_contexts' buckets, in place (the array is this call's own: no copy)
        contexts >>= np.uint8(shift)
    return contexts, merged_count(n_buckets, shift), orient


def _decoded_levels(section, count) -> np.ndarray:
    return np.frombuffer(lossless.decompress(section, 2 * count), "<i2").astype(np.int16)


def _decoded_signs(params, sections, shape, previous_sign):
    size = kernel_size(shape)
    if params["kernel_size"] != size:
        raise CorruptStreamError("kernel size does not match the shape")
    oscillation = params["oscillation"]
    if oscillation not in (0, 1, 2):
        raise CorruptStreamError("bad oscillation mode")
    signs = np.empty(previous_sign.size, np.int8)
    if not size:
        predicted_signs(previous_sign, oscillation, size, _NO_KERNELS, _NO_KERNELS, signs)
        return signs
    head = (previous_sign.size // size + 7) // 8
    declared = params["kernel_bitmap_bytes"]
    if not isinstance(declared, int) or not head <= declared <= 2 * head:
        raise CorruptStreamError("bad kernel bitmap size")
    bitmap = np.frombuffer(lossless.decompress(sections["kernel_bitmap"], declared), np.uint8)
    if not signs_from_bitmap(previous_sign, oscillation, size, bitmap, signs):
        raise CorruptStreamError("kernel bitmap has the wrong size")
    return signs


def _decode_codes(params, section, n, contexts, n_contexts, threads=1):
    coder = params["coder"]
    if coder == "huffman":
        if contexts is not None:
            raise CorruptStreamError("huffman codes cannot carry contexts")
        declared = params["huffman_bytes"]
        if not isinstance(declared, int) or not 0 <= declared <= _MAX_HUFFMAN_BYTES_PER_CODE * n + (1 << 20):
            raise CorruptStreamError("bad huffman section size")
        raw = lossless.decompress(section, declared)
        return huffman.decode(raw, n) - np.int32(RADIUS)
    if coder == "rans":
        if contexts is None:
            return rans.decode_one_context(section, n, threads)
        return rans.decode(section, contexts, n_contexts, threads)
    raise CorruptStreamError(f"unknown coder {coder!r}")
