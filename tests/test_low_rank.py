"""The low-rank part of a linear prediction: chosen where a layer's updates are close to low
rank, exact on both sides, within the bound in every dtype, and refused when tampered with."""
import numpy as np
import pytest

import gradzip
from gradzip.container import join_stream, split_stream
from gradzip.entropy import rans
from gradzip.predict.lowrank import MAX_RANK, RANKS, eligible, factor_contexts, fit_low_rank, low_rank_offset

from test_core_roundtrip import run_rounds


def _low_rank_rounds(shape, count=5, rank=6, noise=0.05, seed=31, dtype="float32", gz=None):
    """An FC layer's updates: a persistent part plus, every round, a fresh rank-`rank` part
    (new outer products of deltas and inputs) and a little full-rank noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    update = np.zeros((rows, cols))
    rounds = []
    for _ in range(count):
        fresh = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) / np.sqrt(rank)
        update = 0.8 * update + fresh + noise * rng.normal(size=(rows, cols))
        values = update.reshape(shape).astype(np.float32)
        if dtype == "bfloat16":
            values = gz.bfloat16_from_float32(values)
        elif dtype == "float16":
            values = values.astype(np.float16)
        elif dtype == "float64":
            values = update.reshape(shape)
        rounds.append({"fc.weight": values})
    return rounds


@pytest.mark.parametrize("eb", [1e-2, 1e-3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("shape", [(96, 2048), (600, 1000), (64, 16, 8, 8)])
def test_low_rank_part_is_chosen_for_low_rank_updates_and_round_trips(gz, shape, dtype, eb):
    """(600, 1000) goes through the sampled choice and rANS segments; (64, 16, 8, 8) is a
    conv layer viewed as 64 rows of 1024."""
    rounds = _low_rank_rounds(shape, dtype=dtype, gz=gz)
    _, _, blobs, decoded = run_rounds(rounds, eb, "rel")  # also checks the two states agree
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], eb, "rel", f"round {r}")
    params = [split_stream(b)[1][0][0]["params"] for b in blobs]
    assert all(1 <= p.get("rank", 0) <= MAX_RANK for p in params), params  # every round
    assert params[0]["predictor"] == "low_rank"  # no history: the low-rank part is the whole prediction
    assert all(p["predictor"] == "linear" for p in params[2:]), params  # on top of the linear one
    assert all(dict(split_stream(b)[1][0][0]["sections"]).get("low_rank", 0) > 0 for b in blobs)


def test_low_rank_part_makes_low_rank_updates_smaller():
    """Against the same stream without it (the factors are on the encoder's side only, so a
    stream can be rebuilt without them by turning the tensor into a 1-D one of the same size)."""
    rounds = _low_rank_rounds((96, 2048), count=4)
    flat = [{"fc.weight": t["fc.weight"].reshape(-1)} for t in rounds]
    with_rank = sum(len(b) for b in run_rounds(rounds, 1e-3, "rel")[2])
    without = sum(len(b) for b in run_rounds(flat, 1e-3, "rel")[2])
    assert with_rank < 0.8 * without, (with_rank, without)


def test_full_rank_noise_gets_no_low_rank_part():
    rng = np.random.default_rng(5)
    update = rng.normal(size=(128, 1024))
    rounds = []
    for _ in range(4):
        update = 0.9 * update + 0.4 * rng.normal(size=update.shape)
        rounds.append({"fc.weight": update.astype(np.float32)})
    blobs = run_rounds(rounds, 1e-3, "rel")[2]
    assert not any("rank" in split_stream(b)[1][0][0]["params"] for b in blobs)


def _fit(residual, eb, rank=None):
    """(factors, ranks whose size was estimated) of one fit."""
    estimated = []

    def counting(codes, contexts, n_contexts):
        if n_contexts > 1:  # the factors' estimate (one context per component), once per rank tried
            estimated.append(n_contexts)
        return rans.estimated_bits(codes, contexts, n_contexts)

    return fit_low_rank(residual, eb, counting, rank), estimated


def test_a_rank_hint_starts_the_walk_there_and_keeps_the_walk_s_choice():
    """Between searches the encoder passes the last rank as a hint: the walk starts there (so
    fewer sizes are estimated when the rank holds) and still ends at the same rank; a hint
    that is not one of RANKS, or does not fit the layer, is ignored."""
    rng = np.random.default_rng(8)
    rows, cols = 256, 2048
    residual = (rng.normal(size=(rows, 12)) @ rng.normal(size=(12, cols)) / 3 + 0.05 * rng.normal(size=(rows, cols)))
    residual = residual.astype(np.float32)
    eb = 1e-3 * float(residual.max() - residual.min())
    walked, walked_ranks = _fit(residual, eb)
    assert walked is not None
    chosen = walked.left.shape[0]
    hinted, hinted_ranks = _fit(residual, eb, chosen)
    assert hinted.left.shape[0] == chosen
    assert len(hinted_ranks) < len(walked_ranks), (hinted_ranks, walked_ranks)
    for ignored in (5, 0, MAX_RANK * 2):
        again, _ = _fit(residual, eb, ignored)
        assert np.array_equal(again.left, walked.left) and np.array_equal(again.right, walked.right)
    small, small_ranks = _fit(residual, eb, RANKS[0])  # sketches at most 4x the hint: ranks up to 16
    assert small is not None and max(small_ranks) <= 4 * RANKS[0]


def test_only_large_two_sided_views_are_eligible():
    assert eligible((256, 4096)) and eligible((64, 1024)) and eligible((64, 16, 8, 8))
    assert not eligible((32, 4096))  # too few rows
    assert not eligible((4096, 32))  # too few columns
    assert not eligible((200, 200))  # too few elements
    assert not eligible((1 << 20,))  # no rows at all


def test_low_rank_offset_is_the_exact_integer_product():
    rng = np.random.default_rng(3)
    rank, rows, cols = 7, 70, 130
    left = rng.integers(-30000, 30000, size=(rank, rows))
    right = rng.integers(-30000, 30000, size=(rank, cols))
    step = 3.7e-6
    out = np.empty(rows * cols, np.float32)
    low_rank_offset(left.astype(np.float64), right.astype(np.float64), step, out)
    exact = (left.T.astype(np.int64) @ right.astype(np.int64)).astype(np.float64) * (step * step)
    assert np.array_equal(out, exact.astype(np.float32).reshape(-1))
    contexts = factor_contexts(rank, rows, cols)
    assert contexts.size == rank * (rows + cols) and contexts.max() == rank - 1


def _first_low_rank_round(predictor="linear"):
    decompressor = gradzip.Decompressor()
    compressor = gradzip.Compressor(1e-2)
    for tensors in _low_rank_rounds((96, 2048)):
        blob = compressor.compress(tensors)
        header, records, trailer = split_stream(blob)
        if "rank" in records[0][0]["params"] and records[0][0]["params"]["predictor"] == predictor:
            return decompressor, header, records, trailer
        decompressor.decompress(blob)
    pytest.fail(f"no round chose a low-rank part with the {predictor} predictor")


def _flip_factor_byte(record, payload):
    start = 0
    for name, length in record["sections"]:
        if name == "low_rank":
            middle = start + length // 2
            return record, payload[:middle] + bytes([payload[middle] ^ 0x10]) + payload[middle + 1:]
        start += length
    raise AssertionError("no low_rank section")


@pytest.mark.parametrize("tamper", [
    lambda p: p.__setitem__("rank", 0),
    lambda p: p.__setitem__("rank", MAX_RANK + 1),
    lambda p: p.__setitem__("rank", "4"),
    lambda p: p.__setitem__("rank", True),
    lambda p: p.__setitem__("rank", p["rank"] + 1),  # well-formed, but not what was coded
    lambda p: p.__setitem__("rank_step", -p["rank_step"]),
    lambda p: p.__setitem__("rank_step", 0.0),
    lambda p: p.__setitem__("rank_step", 1),
    lambda p: p.__setitem__("rank_step", p["rank_step"] * 1.5),
    lambda p: p.pop("rank_step"),
])
@pytest.mark.parametrize("predictor", ["linear", "low_rank"])
def test_tampered_low_rank_parameters_are_a_corrupt_stream(tamper, predictor):
    decompressor, header, records, trailer = _first_low_rank_round(predictor)
    tamper(records[0][0]["params"])
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


@pytest.mark.parametrize("tamper", [
    lambda r, p: (r, p) if r.__setitem__("shape", [96 * 2048]) is None else None,  # a low-rank part needs rows
    lambda r, p: (r, p) if r.__setitem__("shape", [32, 6144]) is None else None,  # too few rows to be eligible
    lambda r, p: (r, p) if r.__setitem__("sections", [[("row_scale" if n == "low_rank" else n), l]
                                                      for n, l in r["sections"]]) is None else None,
    _flip_factor_byte,
])
def test_tampered_low_rank_record_or_factors_are_a_corrupt_stream(tamper):
    decompressor, header, records, trailer = _first_low_rank_round()
    records[0] = tamper(*records[0])
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


@pytest.mark.parametrize("tamper", [
    lambda p: p.pop("rank"),  # the offset is the whole prediction: it cannot be missing
    lambda p: p.__setitem__("contexts", "scale_ema"),  # a low-rank record's contexts are the residual's scales
    lambda p: p.update(contexts="scale", sign_oriented=True),  # oriented by the offset, not the previous signs
    lambda p: p.__setitem__("predictor", "context"),  # the same codes without the offset
])
def test_tampered_low_rank_alone_is_a_corrupt_stream(tamper):
    decompressor, header, records, trailer = _first_low_rank_round("low_rank")
    tamper(records[0][0]["params"])
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


@pytest.mark.parametrize("eb", [1e-2, 1e-3])
def test_low_rank_alone_under_the_residuals_scale_contexts_round_trips(gz, eb):
    """A first round with rows and columns of very different scales: the offset is the whole
    prediction, and the codes are coded under the scales of what it leaves."""
    rng = np.random.default_rng(4)
    low_rank = rng.normal(size=(128, 4)) @ rng.normal(size=(4, 2048))
    scales = np.exp(rng.normal(0, 1.5, (128, 1))) * np.exp(rng.normal(0, 1.0, (1, 2048)))
    tensors = {"fc.weight": (low_rank + 0.05 * rng.normal(size=low_rank.shape) * scales).astype(np.float32)}
    _, _, blobs, decoded = run_rounds([tensors], eb, "rel")
    gz.assert_within_bound(tensors["fc.weight"], decoded[0]["fc.weight"], eb, "rel", "fc.weight")
    params = split_stream(blobs[0])[1][0][0]["params"]
    assert params["predictor"] == "low_rank" and params["contexts"] == "scale" and params["sign_oriented"] is False


def test_factors_beyond_the_exact_range_are_a_corrupt_stream():
    """A well-formed rANS section whose factors reach 2**15: their products could round, so
    two machines might disagree; the decoder refuses them rather than trust the sum."""
    from gradzip.entropy import rans
    from gradzip.predict.lowrank import FACTOR_LIMIT
    decompressor, header, records, trailer = _first_low_rank_round()
    record, payload = records[0]
    rank, rows, cols = record["params"]["rank"], record["shape"][0], int(np.prod(record["shape"][1:]))
    factors = np.zeros(rank * (rows + cols), np.int32)
    factors[5] = FACTOR_LIMIT + 1
    section = rans.encode(factors, factor_contexts(rank, rows, cols), rank)
    parts, start = [], 0
    for name, length in record["sections"]:
        parts.append((name, section if name == "low_rank" else payload[start:start + length]))
        start += length
    record["sections"] = [[name, len(data)] for name, data in parts]
    records[0] = (record, b"".join(data for _, data in parts))
    with pytest.raises(gradzip.CorruptStreamError, match="factor out of range"):
        decompressor.decompress(join_stream(header, records, trailer))


@pytest.mark.parametrize("case", ["zeros", "nan", "tiny", "huge"])
def test_eligible_layers_without_a_usable_low_rank_part_round_trip(gz, case):
    """All-zero updates, a NaN, values near the smallest normal and near the float32 limit:
    the part is skipped or kept, and the bound holds either way."""
    rounds = _low_rank_rounds((96, 2048), count=3)
    for tensors in rounds:
        w = tensors["fc.weight"]
        if case == "zeros":
            w[:] = 0.0
        elif case == "nan":
            w[3, 7] = np.nan
        elif case == "tiny":
            w *= np.float32(1e-36)
        else:
            w *= np.float32(3e37) / np.abs(w).max()
    _, _, _, decoded = run_rounds(rounds, 1e-3, "rel", allow_repeat=True)  # three rounds of zeros are alike
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], 1e-3, "rel", f"round {r}")


def test_low_rank_can_be_turned_off_and_the_decoder_needs_no_setting(gz, tmp_path):
    """Compressor(low_rank=False) and `gradzip compress --no-low-rank`: no record carries a
    low-rank part, the stream is larger, and a default decompressor reads both."""
    rounds = _low_rank_rounds((96, 2048), count=3)
    _, _, with_part, _ = run_rounds(rounds, 1e-3, "rel")
    _, _, without, decoded = run_rounds(rounds, 1e-3, "rel", low_rank=False)
    assert all("rank" not in split_stream(b)[1][0][0]["params"] for b in without)
    assert sum(map(len, without)) > sum(map(len, with_part))
    for tensors, out in zip(rounds, decoded):
        gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], 1e-3, "rel", "fc.weight")
    with pytest.raises(gradzip.InputError):
        gradzip.Compressor(low_rank="no")
    path = gz.write_safetensors(tmp_path / "round.safetensors", rounds[0])
    gz.assert_cli_ok(gz.run("compress", "--no-low-rank", "-q", "-s", tmp_path / "s.gzs", path))
    blob = (tmp_path / "round.safetensors.grz").read_bytes()
    assert "rank" not in split_stream(blob)[1][0][0]["params"]


def test_noise_is_screened_out_before_the_rank_search():
    """A residual whose top component is no higher than noise's (the Marchenko-Pastur edge)
    gets no part, without a single size estimate; a low-rank one is estimated and fitted."""
    from gradzip.entropy import rans
    from gradzip.predict.lowrank import fit_low_rank
    rng = np.random.default_rng(6)
    calls = []

    def estimated_bits(codes, contexts, n_contexts):
        calls.append(codes.size)
        return rans.estimated_bits(codes, contexts, n_contexts)

    noise = rng.normal(size=(128, 1024)).astype(np.float32)
    assert fit_low_rank(noise, 1e-3 * float(np.ptp(noise)), estimated_bits) is None and not calls
    structured = (rng.normal(size=(128, 3)) @ rng.normal(size=(3, 1024)) + 0.01 * noise).astype(np.float32)
    left, right, step = fit_low_rank(structured, 1e-3 * float(np.ptp(structured)), estimated_bits)
    assert calls and left.shape[0] >= 3 and right.shape == (left.shape[0], 1024) and step > 0


@pytest.mark.parametrize("shape", [(512, 4608), (4096, 512), (64, 1024)])
def test_noise_is_screened_out_before_the_range_finder(monkeypatch, shape):
    """Full-rank noise (a ResNet conv or transformer layer's residual) costs a row sample's
    Gram matrix, not the range finder; a rank-3 signal under the same noise still gets a part."""
    from gradzip.entropy import rans
    from gradzip.predict import lowrank

    sketches = []
    real_directions = lowrank._directions
    monkeypatch.setattr(lowrank, "_directions", lambda cols, count: sketches.append(cols) or real_directions(cols, count))
    rng = np.random.default_rng(5)
    noise = rng.normal(size=shape).astype(np.float32)
    assert lowrank.fit_low_rank(noise, 1e-3 * float(np.ptp(noise)), rans.estimated_bits) is None and not sketches
    # a hinted fit (between searches) skips the screen; the full test after the range finder still refuses noise
    assert lowrank.fit_low_rank(noise, 1e-3 * float(np.ptp(noise)), rans.estimated_bits, rank=8) is None and sketches
    sketches.clear()
    signal = (rng.normal(size=(shape[0], 3)) @ rng.normal(size=(3, shape[1])) + 0.05 * noise).astype(np.float32)
    assert lowrank.fit_low_rank(signal, 1e-3 * float(np.ptp(signal)), rans.estimated_bits) is not None and sketches


def test_the_background_fit_on_more_threads_gives_the_same_bytes_and_states():
    """With more than one thread the values' own low-rank fit runs beside the choice of the
    best candidate: the streams and states must be those of one thread, round after round."""
    rounds = _low_rank_rounds((600, 1000))
    one, many = gradzip.Compressor(1e-3, "rel", threads=1), gradzip.Compressor(1e-3, "rel", threads=4)
    for tensors in rounds:
        blob = one.compress(tensors)
        assert many.compress(tensors) == blob
        assert any("rank" in record["params"] for record, _ in split_stream(blob)[1] if "params" in record)
    assert many.state.digest() == one.state.digest()


@pytest.mark.parametrize("true_rank", [2, 12, 40])
def test_the_rank_walk_finds_what_trying_every_rank_finds(monkeypatch, true_rank):
    """The walk from the middle rank stops where the estimate stops falling; on low-rank
    residuals (whose estimate falls, then rises) it must pick the rank an exhaustive search
    over RANKS picks, each rank's size taken from a fit allowed only that rank."""
    from gradzip.entropy import rans
    from gradzip.predict import lowrank

    rng = np.random.default_rng(true_rank)
    rows, cols = 256, 2048
    residual = (rng.normal(size=(rows, true_rank)) @ rng.normal(size=(true_rank, cols))
                + 0.05 * rng.normal(size=(rows, cols))).astype(np.float32)
    eb = 1e-3 * float(np.ptp(residual))
    scale = len(range(0, rows, max(1, rows // lowrank._SAMPLE_ROWS))) / rows
    walked = lowrank.fit_low_rank(residual, eb, rans.estimated_bits)
    sizes = {}
    for rank in lowrank.RANKS:
        calls = []
        monkeypatch.setattr(lowrank, "RANKS", (rank,))
        lowrank.fit_low_rank(residual, eb, lambda *args: calls.append(rans.estimated_bits(*args)) or calls[-1])
        sizes[rank] = calls[1] / scale + calls[2]  # (calls[0] is the no-part size) sampled codes + factors
    assert walked is not None and walked.left.shape[0] == min(sizes, key=sizes.get)


@pytest.mark.parametrize("rows", [256, 1024])
def test_the_sketch_basis_is_orthonormal_and_spans_the_sketch(rows, monkeypatch):
    """The Cholesky route gives an orthonormal basis of the sketch's columns, without numpy's
    QR; a sketch with a singular Gram matrix (two equal columns) falls back to the QR."""
    from gradzip.predict import lowrank

    rng = np.random.default_rng(14)
    sketch = (rng.standard_normal((rows, 72)) * np.logspace(0, -2, 72)).astype(np.float32)
    qr = np.linalg.qr
    qr_calls = []
    monkeypatch.setattr(np.linalg, "qr", lambda a, *args: qr_calls.append(a.shape) or qr(a, *args))
    basis = lowrank._orthonormal(sketch).astype(np.float64)
    assert qr_calls == []
    assert basis.shape == (rows, 72)
    assert np.abs(basis.T @ basis - np.eye(72)).max() < 1e-4
    assert np.abs(sketch - basis @ (basis.T @ sketch)).max() < 1e-4 * np.abs(sketch).max()
    deficient = sketch.copy()
    deficient[:, 1] = deficient[:, 0]  # singular Gram matrix
    basis = lowrank._orthonormal(deficient).astype(np.float64)
    assert qr_calls == [(rows, 72)]
    assert np.isfinite(basis).all() and np.allclose(basis, qr(deficient)[0].astype(np.float64))


def test_a_search_round_frees_the_losers_before_the_low_rank_candidates():
    """Memory target: a compress call holds at most a few tensors beside the new state. A
    search round of a large layer whose fresh low-rank update beats every prediction from
    the last rounds compares its candidates (scale contexts win on the sample), frees the
    losers, then builds the low-rank ones: numpy's allocations beside the state stay under
    2.5 tensor sizes (1.82-1.85 with the losers freed; 3.1 when a list still held them)."""
    import tracemalloc

    rng = np.random.default_rng(12)
    rows, cols = 256, 4096
    scale = np.exp(rng.normal(0, 1, rows))[:, None]
    rounds = [{"fc.weight": (scale * (rng.normal(size=(rows, 6)) @ rng.normal(size=(6, cols))
                                      + 0.05 * rng.normal(size=(rows, cols)))).astype(np.float32)} for _ in range(4)]
    compressor = gradzip.Compressor(1e-2, "rel", threads=1, report_errors=False, search_every=1)
    compressor.compress(rounds[0])
    tensor_bytes = rounds[0]["fc.weight"].nbytes
    for tensors in rounds[1:]:
        tracemalloc.start()
        try:
            blob = compressor.compress(tensors)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        state = compressor.state.tensors["fc.weight"]
        beside_state = peak - (state.ema.nbytes + state.sign.nbytes + state.last.nbytes)
        assert "rank" in split_stream(blob)[1][0][0]["params"]
        assert beside_state < 2.5 * tensor_bytes, beside_state / tensor_bytes


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("by_row", [False, True])
@pytest.mark.parametrize("largest", [300, 3000])  # the offset's sums in float32, and in float64
def test_quantizing_with_the_offset_in_blocks_of_rows_gives_the_whole_offsets_bits(threads, by_row, largest):
    """A large tensor's low-rank offset is built a block of rows at a time (codec._over_ranges):
    codes, escapes and reconstruction equal the kernels' on the whole tensor's offset, with a
    last block shorter than the others and linear weights per row."""
    from gradzip import codec
    from gradzip.predict.lowrank import Factors, sums_dtype
    from gradzip.quantize import dequantize, quantize
    from gradzip.state import TensorState

    rows, cols, rank = 600, 1000, 5  # 600,000 elements: blocks of 131 rows, the last of 76
    assert rows * cols >= 2 * codec._OFFSET_BLOCK_ELEMENTS and rows % (codec._OFFSET_BLOCK_ELEMENTS // cols)
    rng = np.random.default_rng(4)
    factors = Factors(rng.integers(-largest, largest, (rank, rows)).astype(np.int16),
                      rng.integers(-largest, largest, (rank, cols)).astype(np.int16), 3.1e-4 * 3000 / largest)
    assert sums_dtype(factors.left, factors.right) == (np.float32 if largest == 300 else np.float64)
    last, second = (rng.normal(size=rows * cols).astype(np.float32) for _ in range(2))
    offset = np.empty(rows * cols, np.float32)
    low_rank_offset(factors.left, factors.right, factors.step, offset)
    values = (offset + 0.3 * last + rng.normal(scale=0.05, size=rows * cols)).astype(np.float32)
    values[[7, 333_333]] = [np.inf, 1e30]  # escapes, one in a later block
    weights = (rng.uniform(0.1, 0.5, rows), rng.uniform(-0.2, 0.2, rows)) if by_row else (np.array([0.3]), np.array([0.1]))
    previous = TensorState((rows, cols), "F32", 2, np.zeros(rows * cols, np.float32), np.zeros(rows * cols, np.int8), last, second)
    prediction = codec._Prediction.linear(previous, *weights, factors)
    eb = 1e-3
    got = codec._quantize(values, "F32", eb, prediction, keep_recon=True, threads=threads)
    codes, recon, escaped = np.empty(values.size, np.int32), np.empty(values.size, np.float32), np.empty(values.size, np.bool_)
    n_escaped = quantize(values, *prediction.kernel_args(), eb, codes, recon, escaped, eb)  # the whole offset at once
    assert got.n_escaped == n_escaped >= 2
    assert np.array_equal(got.codes, codes) and np.array_equal(got.escaped, escaped)
    assert got.recon.tobytes() == recon.tobytes()
    rebuilt, expected = np.empty(values.size, np.float32), np.empty(values.size, np.float32)
    codec._dequantized(codes, prediction, eb, rebuilt, threads)
    dequantize(codes, *prediction.kernel_args(), eb, expected)
    assert rebuilt.tobytes() == expected.tobytes()


def test_the_rank_walks_residual_codes_are_numpys():
    """The fit's one-pass kernel gives _codes_of(values - offset) exactly: float32 arithmetic,
    ties rounded to even (48 of the values put near half steps land exactly on one), and
    codes clipped at the factor limit."""
    from gradzip.predict.lowrank import FACTOR_LIMIT, _codes_of, _residual_codes, low_rank_sums, sums_dtype

    rng = np.random.default_rng(12)
    rank, rows, cols, step, two_eb = 3, 40, 700, 3e-3, 2e-3
    left = rng.integers(-400, 400, (rank, rows)).astype(np.int16)
    right = rng.integers(-400, 400, (rank, cols)).astype(np.int16)
    offset = np.empty(rows * cols, np.float32)
    low_rank_offset(left, right, step, offset)
    values = (offset + rng.normal(scale=0.01, size=rows * cols)).astype(np.float32)
    values[:200] = offset[:200] + np.float32(two_eb) * (np.arange(200, dtype=np.float32) - 100.5)  # (near) ties
    values[200:210] = offset[200:210] + np.float32(1e3)  # far beyond the limit
    sums = np.empty(rows * cols, sums_dtype(left, right))
    low_rank_sums(left, right, sums)
    codes = np.empty(rows * cols, np.int32)
    _residual_codes(values, sums, step * step, two_eb, codes)
    expected = _codes_of(values - offset, two_eb)
    assert np.array_equal(codes, expected)
    assert np.all(codes[200:210] == FACTOR_LIMIT) and np.any(codes[:200] % 2 == 0)


def test_the_factor_kernels_give_numpys_codes_and_largest_magnitude():
    """The rank walk's one-pass kernels: round(factor / step) clipped to the factor limit as
    numpy computes it (ties to even, and values beyond the limit), and the largest |value| of
    both factors, NaN where either holds one (the walk then sends no part)."""
    from gradzip.predict.lowrank import FACTOR_LIMIT, _factor_codes, _largest_magnitude

    rng = np.random.default_rng(5)
    factor = rng.normal(scale=50.0, size=(4, 300))
    factor[0, :8] = np.arange(8) + 0.5  # ties
    factor[1, :3] = [4e6, -4e6, 1e300]  # beyond the limit
    for step in (1.0, 0.37, 2.5e-3):
        for array in (factor, factor.T.copy().T[:3]):  # (the walk's factors are rows of a transposed array)
            expected = np.clip(np.rint(array / step), -FACTOR_LIMIT, FACTOR_LIMIT).astype(np.int16)
            assert np.array_equal(_factor_codes(array, step), expected)
    left, right = factor[:, :100], rng.normal(size=(4, 50))
    assert _largest_magnitude(np.ascontiguousarray(left), right) == max(np.abs(left).max(), np.abs(right).max())
    right[2, 7] = np.nan
    assert np.isnan(_largest_magnitude(np.ascontiguousarray(left), right))
    assert np.isnan(_largest_magnitude(right, np.ascontiguousarray(left)))
