"""Regressions for problems found in code review; each failed before its fix."""
import io
import struct
import zlib

import numpy as np
import pytest
import zstandard

import gradzip
from gradzip.api import describe_stream
from gradzip.container import FORMAT_VERSION, MAGIC, _frame_compressor, _varint, join_stream, split_stream
from gradzip.tensorio import as_bfloat16


def _rewrite_header(blob: bytes, change) -> bytes:
    header, records, trailer = split_stream(blob)
    change(header)
    return join_stream(header, records, trailer)


def test_dense_small_tensor_bundle_is_padded_so_the_decoder_accepts_it():
    tensors = {f"z{i}": np.zeros(1024, np.float64) for i in range(400)}
    compressor, decompressor = gradzip.Compressor(), gradzip.Decompressor()
    out = decompressor.decompress(compressor.compress(tensors))
    assert all(np.array_equal(out[name], tensors[name]) for name in tensors)
    assert compressor.state.to_bytes() == decompressor.state.to_bytes()


def test_bfloat16_signalling_nan_keeps_its_bits_in_a_lossy_tensor():
    bits = (np.random.default_rng(0).standard_normal(4096).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bits[[5, 77, 4000]] = [0x7F81, 0xFF81, 0x7FC3]  # signalling, negative signalling, quiet with payload
    tensors = {"w": as_bfloat16(bits)}
    out = gradzip.Decompressor().decompress(gradzip.Compressor(1e-2).compress(tensors))
    assert out["w"].view(np.uint16)[[5, 77, 4000]].tolist() == [0x7F81, 0xFF81, 0x7FC3]


def test_header_with_an_overflowing_bound_is_a_corrupt_stream():
    blob = gradzip.Compressor().compress({"w": np.ones(2000, np.float32)})
    damaged = _rewrite_header(blob, lambda h: h["codec"].update(error_bound=10**400))
    with pytest.raises(gradzip.CorruptStreamError):
        gradzip.Decompressor().decompress(damaged)


def test_header_with_non_string_metadata_is_a_corrupt_stream():
    blob = gradzip.Compressor().compress({"w": np.ones(2000, np.float32)})
    damaged = _rewrite_header(blob, lambda h: h.update(metadata={"a": [1, 2]}))
    with pytest.raises(gradzip.CorruptStreamError):
        gradzip.Decompressor().decompress(damaged)


def test_deeply_nested_frame_json_is_a_corrupt_stream():
    nested = (b"[" * 100_000) + (b"]" * 100_000)
    zstd = _frame_compressor().compressobj()
    frame = zstd.compress(nested) + zstd.flush()
    frame = _varint(len(frame)) + frame
    blob = MAGIC + struct.pack("<H", FORMAT_VERSION) + frame + struct.pack("<I", zlib.crc32(frame))
    with pytest.raises(gradzip.CorruptStreamError, match="JSON"):
        gradzip.Decompressor().decompress(blob)


def test_frame_that_inflates_beyond_the_limit_is_rejected_without_allocating():
    """A header frame of RLE blocks (4 bytes each inflate to 128 KiB) is cut off at the limit."""
    import tracemalloc
    zstd = _frame_compressor().compressobj()
    start = zstd.compress(b"{") + zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # frame header + one block
    rle_block = (((128 * 1024) << 3) | (1 << 1)).to_bytes(3, "little") + b" "  # not last, RLE, 128 KiB of spaces
    frame = start + rle_block * 4000  # 500 MiB once inflated
    frame = _varint(len(frame)) + frame
    blob = MAGIC + struct.pack("<H", FORMAT_VERSION) + frame + struct.pack("<I", zlib.crc32(frame))
    tracemalloc.start()
    try:
        with pytest.raises(gradzip.CorruptStreamError, match="limit"):
            gradzip.Decompressor().decompress(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024
    with pytest.raises(gradzip.CorruptStreamError):
        gradzip.Decompressor().decompress(blob)


def test_metadata_that_is_not_strings_is_refused_before_writing():
    out = io.BytesIO()
    with pytest.raises(gradzip.InputError):
        gradzip.Compressor().compress_to({"w": np.ones(10, np.float32)}, out, metadata={"lr": 0.1})
    assert out.getvalue() == b""


def _bundle_stream() -> tuple[bytes, dict]:
    rng = np.random.default_rng(1)
    tensors = {"bias": rng.normal(size=40).astype(np.float32), "steps": np.array([3, 4], np.int64),
               "norm": rng.normal(size=24).astype(np.float32)}
    return gradzip.Compressor(1e-2).compress(tensors), tensors


@pytest.mark.parametrize("tamper", [
    lambda r: r["members"][0].__setitem__(4, -1e-3),  # negative bound
    lambda r: r["members"][0].__setitem__(4, 1),  # not a float
    lambda r: r["members"][1].__setitem__(4, 1e-3),  # a bound on an integer member
    lambda r: r["members"][0].__setitem__(4, 0.0),  # quantized member claimed exact
    lambda r: r["params"].__setitem__("coded", r["params"]["coded"] + 1),
    lambda r: r["members"][0].pop(),  # old 4-field member
])
def test_tampered_bundle_members_are_a_corrupt_stream(tamper):
    blob, _ = _bundle_stream()
    header, records, trailer = split_stream(blob)
    assert records[0][0]["method"] == "bundle" and records[0][0]["members"][0][4] > 0
    tamper(records[0][0])
    with pytest.raises(gradzip.CorruptStreamError, match="bundle"):
        gradzip.Decompressor().decompress(join_stream(header, records, trailer))


def test_bundle_quantizes_small_floats_within_their_own_bounds():
    blob, tensors = _bundle_stream()
    out = gradzip.Decompressor().decompress(blob)
    for name in ("bias", "norm"):
        bound = 1e-2 * (float(tensors[name].max()) - float(tensors[name].min()))
        assert 0 < np.abs(out[name].astype(np.float64) - tensors[name]).max() <= bound, name
    assert np.array_equal(out["steps"], tensors["steps"])


def _rank_one_rounds(count: int):
    """A linear layer's gradients: outer products of per-row and per-column scales (new each
    round, so the state's magnitudes are stale) times noise."""
    rng = np.random.default_rng(6)
    rounds = []
    for _ in range(count):
        rows, cols = np.exp(rng.normal(0, 1.5, 192)), np.exp(rng.normal(0, 1.5, 180))  # over _SCALE_MIN_ELEMENTS
        rounds.append({"fc.weight": (np.outer(rows, cols) * rng.normal(size=(192, 180))).astype(np.float32)})
    return rounds


def test_scale_contexts_are_chosen_for_outer_product_gradients_and_round_trip(gz):
    rounds = _rank_one_rounds(3)
    compressor, decompressor = gradzip.Compressor(1e-3), gradzip.Decompressor()
    for tensors in rounds:
        blob = compressor.compress(tensors)
        out = decompressor.decompress(blob)
        gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], 1e-3, "rel", "fc.weight")
        record = split_stream(blob)[1][0][0]
        # Scale contexts, on the plain codes or under the linear prediction.
        assert record["params"]["predictor"] in ("context", "linear") and record["params"]["contexts"].startswith("scale"), record["params"]
    assert compressor.state.to_bytes() == decompressor.state.to_bytes()


def test_scale_context_fit_follows_the_data_and_decodes_with_the_sent_weights():
    """The fitted weights are the encoder's choice, sent with the record: a decoder given
    other weights builds other contexts, and the reconstruction check catches it."""
    rounds = _rank_one_rounds(3)
    compressor, decompressor = gradzip.Compressor(1e-3), gradzip.Decompressor()
    fits = []
    for tensors in rounds[:-1]:
        blob = compressor.compress(tensors)
        decompressor.decompress(blob)
        fits.append(split_stream(blob)[1][0][0]["params"]["fit"])
    # Without history only the scale level is weighted; a rank-one gradient's |x| tracks it
    # at about one quarter octave per level (16 sixteenths), give or take the noise.
    assert fits[0][1] == 0 and 8 <= fits[0][0] <= 24, fits
    header, records, trailer = split_stream(compressor.compress(rounds[-1]))
    w_scale, w_ema, offset = records[0][0]["params"]["fit"]
    records[0][0]["params"]["fit"] = [w_scale + 8, w_ema, offset - 96]
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


def test_eb_is_rounded_down_to_six_digits_and_stays_within_the_bound():
    tensors = _rank_one_rounds(1)[0]
    record = split_stream(gradzip.Compressor(1e-3).compress(tensors))[1][0][0]
    exact = 1e-3 * (float(tensors["fc.weight"].max()) - float(tensors["fc.weight"].min()))
    eb = record["params"]["eb"]
    assert exact * (1 - 1e-5) <= eb <= exact and len(repr(eb).replace("e-0", "e-").lstrip("0.")) <= 11


@pytest.mark.parametrize("tamper", [
    lambda r: r["params"].__setitem__("contexts", "rows"),
    lambda r: r["params"].__setitem__("context_merge", True),
    lambda r: r["params"].__setitem__("sign_oriented", 1),
    lambda r: r["params"].__setitem__("fit", [16, 0]),
    lambda r: r["params"].__setitem__("fit", [16, 0, 1.5]),
    lambda r: r["params"].__setitem__("fit", [-1, 0, 0]),
    lambda r: r["params"].__setitem__("fit", [16, 8, 0]),  # `scale` alone has no predicted level
    lambda r: r["params"].__setitem__("fit", [16, 0, 1 << 20]),
    lambda r: r["params"].pop("fit"),
    lambda r: r.__setitem__("shape", [192 * 180]),  # scale contexts need two dimensions
    lambda r: r.__setitem__("sections", [[n, l] for n, l in r["sections"] if n != "col_scale"] + [["col_scale", 0]]),
])
def test_tampered_scale_context_records_are_a_corrupt_stream(tamper):
    rounds = _rank_one_rounds(1)
    blob = gradzip.Compressor(1e-3).compress(rounds[0])
    header, records, trailer = split_stream(blob)
    assert records[0][0]["params"]["contexts"] == "scale"
    tamper(records[0][0])
    with pytest.raises(gradzip.CorruptStreamError):
        gradzip.Decompressor().decompress(join_stream(header, records, trailer))


def _persistent_rounds(count: int, persistence: float = 0.8):
    """Updates that persist across rounds: each round keeps `persistence` of the last one and
    adds fresh noise, so consecutive rounds correlate in value, not only in magnitude."""
    rng = np.random.default_rng(11)
    update = rng.normal(size=(64, 40))
    rounds = []
    for _ in range(count):
        update = persistence * update + np.sqrt(1 - persistence**2) * rng.normal(size=update.shape)
        rounds.append({"fc.weight": update.astype(np.float32)})
    return rounds


def test_linear_prediction_is_chosen_for_persistent_updates_and_round_trips(gz):
    rounds = _persistent_rounds(5)
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    chosen = []
    for tensors in rounds:
        blob = compressor.compress(tensors)
        out = decompressor.decompress(blob)
        gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], 1e-2, "rel", "fc.weight")
        chosen.append(split_stream(blob)[1][0][0]["params"])
        assert compressor.state.to_bytes() == decompressor.state.to_bytes()
    # Reports (gradzip stats) name the variant, not only the predictor.
    report = gradzip.api.describe_stream(io.BytesIO(blob), len(blob))
    expected = ",".join((["rows"] if chosen[-1].get("weights") == "rows" else [])
                        + [chosen[-1][key] for key in ("signs", "contexts") if key in chosen[-1]])
    assert report.tensors[0].variant == expected
    linear = [p for p in chosen if p["predictor"] == "linear"]
    assert len(linear) >= 3, chosen
    # Every row keeps 0.8 of the last round: one pair of weights in all says it as well as one
    # per row, and the fit finds that weight on the last round and next to nothing before it.
    assert all(p["weights"] != "rows" for p in linear), linear
    assert all(0.6 < p["weights"][0] < 1.0 and abs(p["weights"][1]) < 0.2 for p in linear), linear
    assert linear[0]["weights"][1] == 0.0 or len(chosen) - len(linear) < 2  # one round of history: w_last only


@pytest.mark.parametrize("tamper", [
    lambda p: p.__setitem__("weights", [0.0, 0.1]),
    lambda p: p.__setitem__("weights", [9.0, 0.0]),
    lambda p: p.__setitem__("weights", ["0.5", 0.0]),
    lambda p: p.__setitem__("weights", [p["weights"][0], -1e300]),
    lambda p: p.__setitem__("weights", [0.5]),
    lambda p: p.__setitem__("weights", 0.5),
    lambda p: p.pop("weights"),
    lambda p: p.__setitem__("weights", [round(p["weights"][0] * 1.5, 6), p["weights"][1]]),  # well-formed but not what was coded
])
def test_tampered_linear_prediction_is_a_corrupt_stream(tamper):
    rounds = _persistent_rounds(5)
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    for tensors in rounds:
        blob = compressor.compress(tensors)
        header, records, trailer = split_stream(blob)
        if records[0][0]["params"]["predictor"] == "linear":
            break
        decompressor.decompress(blob)
    else:
        pytest.fail("no round chose the linear prediction")
    tamper(records[0][0]["params"])
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


def _persistent_rank_one_rounds(count: int, persistence: float = 0.95):
    """A linear layer late in training: fixed row and column scales, and updates that mostly
    persist from round to round."""
    rng = np.random.default_rng(12)
    rows, cols = np.exp(rng.normal(0, 0.5, 192)), np.exp(rng.normal(0, 0.5, 180))
    noise = rng.normal(size=(192, 180))
    rounds = []
    for _ in range(count):
        noise = persistence * noise + np.sqrt(1 - persistence**2) * rng.normal(size=noise.shape)
        rounds.append({"fc.weight": (np.outer(rows, cols) * noise).astype(np.float32)})
    return rounds


def _first_shift_with_contexts(compressor, decompressor, rounds):
    for tensors in rounds:
        blob = compressor.compress(tensors)
        header, records, trailer = split_stream(blob)
        params = records[0][0]["params"]
        if params["predictor"] == "linear" and "contexts" in params:
            return tensors, blob, (header, records, trailer)
        decompressor.decompress(blob)
    pytest.fail("no round chose the linear prediction under scale contexts")


def test_linear_prediction_under_scale_contexts_is_chosen_for_persistent_rank_one_updates_and_round_trips(gz):
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    tensors, blob, (_, records, _) = _first_shift_with_contexts(compressor, decompressor, _persistent_rank_one_rounds(6))
    params = records[0][0]["params"]
    assert params["contexts"] == "scale_ema" and params["sign_oriented"] is True and len(params["weights"]) == 2
    out = decompressor.decompress(blob)
    gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], 1e-2, "rel", "fc.weight")
    assert compressor.state.to_bytes() == decompressor.state.to_bytes()


@pytest.mark.parametrize("tamper", [
    lambda p: p.__setitem__("sign_oriented", False),
    lambda p: p.__setitem__("predictor", "ema"),  # EMA shifts never carry contexts
    lambda p: p.__setitem__("contexts", "ema"),  # other contexts than the ones coded
    lambda p: p.pop("fit"),
])
def test_tampered_linear_prediction_under_scale_contexts_is_a_corrupt_stream(tamper):
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    _, _, (header, records, trailer) = _first_shift_with_contexts(compressor, decompressor, _persistent_rank_one_rounds(6))
    tamper(records[0][0]["params"])
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


def test_linear_fit_recovers_the_weights_of_a_two_round_recurrence():
    from gradzip.predict.linear import fitted_linear_weights, fitted_row_weights, linear_fit_sums, row_weights_as_floats
    rng = np.random.default_rng(13)
    second, last = rng.normal(size=(2, 50000)).astype(np.float32)
    values = (0.7 * last - 0.25 * second + 0.1 * rng.normal(size=50000)).astype(np.float32)
    values[:3] = [np.nan, np.inf, -np.inf]  # left out of the sums
    sums = np.zeros((1, 5))
    linear_fit_sums(values, last, second, values.size, sums)
    w_last, w_second = fitted_linear_weights(sums[0], two_rounds=True)
    assert abs(w_last - 0.7) < 0.01 and abs(w_second + 0.25) < 0.01
    assert fitted_linear_weights(sums[0], two_rounds=False)[1] == 0.0  # one round of history: w_last only
    assert fitted_linear_weights(np.zeros(5), two_rounds=True) is None  # no history to weigh
    collinear = np.zeros((1, 5))
    linear_fit_sums(values, last, last, values.size, collinear)
    assert fitted_linear_weights(collinear[0], two_rounds=True)[1] == 0.0
    # Per row: each of 100 rows of 500 keeps its own share of the last round.
    persistence = np.linspace(-0.5, 1.5, 100)
    values = (np.repeat(persistence, 500) * last + 0.1 * rng.normal(size=50000)).astype(np.float32)
    rows = np.zeros((100, 5))
    linear_fit_sums(values, last, second, 500, rows)
    w_last, w_second = row_weights_as_floats(fitted_row_weights(rows, two_rounds=True))
    assert np.abs(w_last - persistence).max() < 0.03 and np.abs(w_second).max() < 0.03


def test_rows_that_persist_differently_get_weights_of_their_own(gz):
    """An FC layer whose output neurons keep different shares of their last update: one
    weight pair per row wins, and the stream round-trips within the bound."""
    rng = np.random.default_rng(17)
    persistence = rng.choice([0.0, 0.95], size=(48, 1))  # dead and persistent neurons
    update = rng.normal(size=(48, 2000))
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    chosen = []
    for _ in range(4):
        update = persistence * update + np.sqrt(1 - persistence**2) * rng.normal(size=update.shape)
        tensors = {"fc.weight": update.astype(np.float32)}
        blob = compressor.compress(tensors)
        out = decompressor.decompress(blob)
        gz.assert_within_bound(tensors["fc.weight"], out["fc.weight"], 1e-2, "rel", "fc.weight")
        chosen.append(split_stream(blob)[1][0][0])
    assert compressor.state.to_bytes() == decompressor.state.to_bytes()
    assert chosen[-1]["params"]["weights"] == "rows", chosen[-1]
    assert "row_weights" in dict(chosen[-1]["sections"])
    report = gradzip.api.describe_stream(io.BytesIO(blob), len(blob))
    assert report.tensors[0].variant.startswith("rows")


@pytest.mark.parametrize("tamper", [
    lambda r: r["params"].__setitem__("weights", "columns"),
    lambda r: r.__setitem__("sections", [[n, l] for n, l in r["sections"] if n != "row_weights"] + [["row_weights", 0]]),
    lambda r: r.__setitem__("shape", [48 * 2000]),  # row weights need rows
])
def test_tampered_row_weights_are_a_corrupt_stream(tamper):
    rng = np.random.default_rng(17)
    persistence = rng.choice([0.0, 0.95], size=(48, 1))  # dead and persistent neurons
    update = rng.normal(size=(48, 2000))
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    for _ in range(4):
        update = persistence * update + np.sqrt(1 - persistence**2) * rng.normal(size=update.shape)
        blob = compressor.compress({"fc.weight": update.astype(np.float32)})
        header, records, trailer = split_stream(blob)
        if records[0][0]["params"].get("weights") == "rows":
            break
        decompressor.decompress(blob)
    else:
        pytest.fail("no round chose row weights")
    tamper(records[0][0])
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))


def test_state_keeps_the_last_two_reconstructions(gz):
    rounds = _persistent_rounds(3)
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor()
    outputs = []
    for tensors in rounds:
        outputs.append(decompressor.decompress(compressor.compress(tensors))["fc.weight"].reshape(-1))
    state = gradzip.state.PredictorState.from_bytes(decompressor.state.to_bytes())
    np.testing.assert_array_equal(state.tensors["fc.weight"].last, outputs[-1])
    np.testing.assert_array_equal(state.tensors["fc.weight"].second_last, outputs[-2])


# A black-box review of the CLI and the API (2026-11-29) found these; each failed before its fix.


def test_a_record_over_the_frame_limit_is_refused_by_the_encoder_and_the_state_stays():
    """A 20M-character tensor name made a record frame no decoder reads; the compressor wrote
    it and advanced its state, leaving sender and receiver apart for good."""
    compressor = gradzip.Compressor()
    before = compressor.state
    with pytest.raises(gradzip.InputError, match="limit"):
        compressor.compress({"x" * 20_000_000: np.ones(3000, np.float32)})
    assert compressor.state is before


def test_api_inputs_of_the_wrong_kind_are_input_errors():
    with pytest.raises(gradzip.InputError, match="masked"):
        gradzip.Compressor().compress({"a": np.ma.masked_array(np.ones(5000, np.float32), mask=[0, 1] * 2500)})
    with pytest.raises(gradzip.InputError, match="PredictorState"):
        gradzip.Decompressor(state="x")
    with pytest.raises(gradzip.InputError, match="PredictorState"):
        gradzip.Compressor(state={})
    for blob in (None, "a string"):
        with pytest.raises(gradzip.InputError, match="bytes"):
            gradzip.Decompressor().decompress(blob)
    with pytest.raises(gradzip.InputError, match="must be a number"):
        gradzip.Compressor("1e-3")


def test_a_small_f64_tensor_beyond_float32s_range_decodes_without_a_warning(recwarn):
    values = np.random.default_rng(0).standard_normal(50)
    values[0] = 1e300
    out = gradzip.Decompressor().decompress(gradzip.Compressor(1e-3).compress({"b": values}))
    assert np.abs(out["b"] - values).max() <= 1e-3 * (values.max() - values.min())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# ---- from the decoder fuzzing of 2026-11-29 (every test failed before its fix) ----

def _lossless_and_quantized_stream():
    rng = np.random.default_rng(11)
    tensors = {"w": rng.normal(size=(64, 64)).astype(np.float32), "steps": rng.integers(0, 9, 5000).astype(np.int32),
               "b": rng.normal(size=16).astype(np.float32)}
    return gradzip.Compressor(1e-2, threads=1).compress(tensors)


def test_a_record_without_its_reconstruction_check_is_a_corrupt_stream():
    header, records, trailer = split_stream(_lossless_and_quantized_stream())
    record = next(r for r, _ in records if r.get("name") == "w")
    del record["recon_check"]  # was a KeyError traceback, which a Flower server did not catch
    with pytest.raises(gradzip.CorruptStreamError, match="checksum"):
        gradzip.Decompressor().decompress(join_stream(header, records, trailer))


@pytest.mark.parametrize("where", ["record", "bundle member"])
@pytest.mark.parametrize("shape", [[10**200, 10**200], [64, 10**400], [True, 4]])
def test_stats_refuses_shapes_no_payload_could_hold(where, shape):
    header, records, trailer = split_stream(_lossless_and_quantized_stream())
    if where == "record":
        next(r for r, _ in records if r.get("name") == "w")["shape"] = shape
    else:
        next(r for r, _ in records if r["method"] == "bundle")["members"][0][3] = shape
    with pytest.raises(gradzip.CorruptStreamError, match="malformed"):  # was an OverflowError traceback
        describe_stream(io.BytesIO(join_stream(header, records, trailer)))


def test_bytes_after_a_sections_zstd_frame_are_a_corrupt_stream():
    header, records, trailer = split_stream(_lossless_and_quantized_stream())
    index = next(i for i, (r, _) in enumerate(records) if r.get("name") == "steps")
    record, payload = records[index]
    assert record["method"] == "lossless" and record["sections"] == [["data", len(payload)]]
    record["sections"][0][1] += 4
    records[index] = (record, bytes(payload) + b"junk")  # decoded before, the junk unread and unchecked
    with pytest.raises(gradzip.CorruptStreamError, match="unused data"):
        gradzip.Decompressor().decompress(join_stream(header, records, trailer))


@pytest.mark.parametrize("rank", [True, 0, 10**6, 3])
def test_a_rank_on_a_record_without_a_low_rank_part_is_a_corrupt_stream(rank):
    # It went into the receiver's new state, whose next load refused it: the state was lost.
    header, records, trailer = split_stream(_lossless_and_quantized_stream())
    record = next(r for r, _ in records if r.get("name") == "w")
    assert record["params"]["predictor"] == "none"
    record["params"]["rank"] = rank
    with pytest.raises(gradzip.CorruptStreamError, match="low-rank part"):
        gradzip.Decompressor().decompress(join_stream(header, records, trailer))


def test_a_state_whose_round_counter_cannot_advance_is_refused_on_load():
    from gradzip.state import PredictorState

    with pytest.raises(gradzip.GradzipError, match="malformed"):  # its next save was unloadable
        PredictorState.from_bytes(PredictorState(round=(1 << 63) - 1).to_bytes())
    assert PredictorState.from_bytes(PredictorState(round=(1 << 63) - 2).to_bytes()).round == (1 << 63) - 2


def test_loading_a_missing_state_file_is_an_error(tmp_path):
    # Compressor/Decompressor.load_state of a typo'd path silently started from round 0.
    for codec in (gradzip.Compressor(), gradzip.Decompressor()):
        with pytest.raises(gradzip.InputError, match="not found"):
            codec.load_state(tmp_path / "typo.state")
