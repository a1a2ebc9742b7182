"""The fused decoder (one kernel per small record) gives the general path's tensors and states,
bit for bit, for every kind of record it takes, and fails as the general path does."""
from collections import Counter

import numpy as np
import pytest
import zstandard
from safetensors.numpy import load_file

import gradzip
from gradzip import codec
from gradzip.container import join_stream, split_stream


def _rank_one_rounds(count, rng, dtype=np.float32):
    rounds = []
    for _ in range(count):
        rows, cols = np.exp(rng.normal(0, 1.5, 192)), np.exp(rng.normal(0, 1.5, 180))
        rounds.append((np.outer(rows, cols) * rng.normal(size=(192, 180))).astype(dtype))
    return rounds


def _sequences(sample_rounds):
    """Rounds that make the encoder pick every predictor the fused path serves."""
    rng = np.random.default_rng(21)
    yield "sample_data", [load_file(path) for path in sample_rounds[:5]]
    base = rng.standard_normal((256, 300)).astype(np.float32)  # 76800 elements: low rank is eligible
    low_rank = [(np.outer(rng.standard_normal(256), rng.standard_normal(300)) * 5 + 0.01 * base).astype(np.float32)
                for _ in range(4)]
    yield "mixed", [{"outer": outer, "outer64": outer64, "low_rank": part, "kernel": rng.standard_normal((64, 32, 3, 3)).astype(np.float32)}
                    for outer, outer64, part in zip(_rank_one_rounds(4, rng), _rank_one_rounds(4, rng, np.float64), low_rank)]


def _count_calls(monkeypatch, kernel_name, counter, key, escape_index_at=None):
    """Replace one of codec's fused kernels by one that counts its calls under counter[key]
    (with escape_index_at, only the calls whose argument there, the escape index, is not
    empty)."""
    kernel = getattr(codec, kernel_name)

    def counted(*args):
        counter[key] += 1 if escape_index_at is None else int(args[escape_index_at].size > 0)
        return kernel(*args)

    monkeypatch.setattr(codec, kernel_name, counted)


@pytest.mark.parametrize("bound", [1e-2, 1e-4])
def test_fused_decoding_gives_the_general_paths_tensors_and_states(sample_rounds, monkeypatch, bound):
    taken = Counter()
    _count_calls(monkeypatch, "decode_and_fold", taken, "records")
    predictors = Counter()
    for name, rounds in _sequences(sample_rounds):
        compressor = gradzip.Compressor(bound)
        fused_side, general_side = gradzip.Decompressor(threads=1), gradzip.Decompressor(threads=1)
        for tensors in rounds:
            blob = compressor.compress(tensors)
            predictors.update(r["params"].get("predictor") for r, _ in split_stream(blob)[1] if r.get("method") == "quantized")
            out = fused_side.decompress(blob)
            with monkeypatch.context() as general:
                general.setattr(codec, "_fused_decode_fits", lambda *args: False)
                expected = general_side.decompress(blob)
            for tensor in expected:
                assert out[tensor].dtype == expected[tensor].dtype and out[tensor].tobytes() == expected[tensor].tobytes(), (name, tensor)
            assert fused_side.state.to_bytes() == general_side.state.to_bytes() == compressor.state.to_bytes(), name
    assert taken["records"] >= 20
    assert {"linear", "context", "low_rank"} <= set(predictors), predictors


def test_damaged_codes_fail_on_the_fused_path_and_leave_the_state(sample_rounds):
    rounds = [load_file(path) for path in sample_rounds[:3]]
    compressor, decompressor = gradzip.Compressor(1e-3), gradzip.Decompressor(threads=1)
    for tensors in rounds[:2]:
        decompressor.decompress(compressor.compress(tensors))
    header, records, trailer = split_stream(compressor.compress(rounds[2]))
    record, payload = next((r, p) for r, p in records if r.get("method") == "quantized")
    assert codec._fused_decode_fits(record["params"], record["dtype"], int(np.prod(record["shape"])))
    before = decompressor.state.to_bytes()
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0x10  # inside the codes section
    index = records.index((record, payload))
    records[index] = (record, bytes(damaged))
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, records, trailer))
    assert decompressor.state.to_bytes() == before


@pytest.mark.parametrize("odd", ["float64 ema", "strided ema"])
def test_a_hand_built_state_with_an_odd_ema_decodes_on_the_general_path(odd):
    """TensorState documents a float32 EMA of the tensor's size, but a caller may build one
    otherwise; the fused decoder, which reads it unchecked, must not take it (a float64 EMA
    once made it read past its arrays: SIGSEGV)."""
    from gradzip.state import PredictorState, TensorState

    rng = np.random.default_rng(5)
    rounds = [{"w": rng.standard_normal((100, 50)).astype(np.float32)} for _ in range(3)]
    compressor, decompressor = gradzip.Compressor(1e-2), gradzip.Decompressor(threads=1)
    for tensors in rounds[:2]:
        decompressor.decompress(compressor.compress(tensors))
    blob = compressor.compress(rounds[2])
    old = decompressor.state.tensors["w"]
    ema = old.ema.astype(np.float64) if odd == "float64 ema" else np.repeat(old.ema, 2)[::2]
    hand = TensorState(old.shape, old.dtype, old.rounds, ema, old.sign, old.last, old.second_last, old.recipe, old.chain)
    assert not codec._Fold.of(hand, old.shape, old.dtype).fits(old.ema.size)
    state = PredictorState(decompressor.state.round, {"w": hand}, decompressor.state.last_input_digest)
    decoded = gradzip.Decompressor(state, threads=1)
    out = decoded.decompress(blob)
    reference = gradzip.Decompressor(decompressor.state, threads=1)
    assert np.array_equal(out["w"], reference.decompress(blob)["w"])
    assert decoded.state.to_bytes() == reference.state.to_bytes()


@pytest.mark.parametrize("bound", [1e-2, 1e-4])
def test_the_fused_encoder_tail_gives_the_general_paths_streams_and_states(sample_rounds, monkeypatch, bound):
    """The encoder's one-kernel tail (reconstruct, hash, fold) against its three calls: the
    same records, payloads and states round after round, for every predictor it serves."""
    taken = Counter()
    _count_calls(monkeypatch, "reconstruct_and_fold", taken, "tensors")
    for name, rounds in _sequences(sample_rounds):
        fused_side, general_side = gradzip.Compressor(bound, threads=1), gradzip.Compressor(bound, threads=1)
        for tensors in rounds:
            blob = fused_side.compress(tensors)
            with monkeypatch.context() as general:
                general.setattr(codec, "_fused_fits", lambda *args: False)
                expected = general_side.compress(tensors)
            assert blob == expected, name
            assert fused_side.state.to_bytes() == general_side.state.to_bytes(), name
            for report, general_report in zip(fused_side.last_report.tensors, general_side.last_report.tensors):
                assert report == general_report, (name, report.name)
    assert taken["tensors"] >= 20


def _rounds_with_escapes(count=5):
    """Small float32 and float64 tensors whose NaN, infinities and (at an absolute bound) huge
    values escape the quantizer, at new positions every round."""
    rng = np.random.default_rng(5)
    rounds = []
    for _ in range(count):
        tensors = {}
        for name, dtype in (("w32", np.float32), ("w64", np.float64)):
            values = rng.standard_normal((48, 90)).astype(dtype)
            flat = values.reshape(-1)
            flat[rng.choice(flat.size, 12, replace=False)] = [np.nan, np.inf, -np.inf, 3e38, -3e38, 1e30] * 2
            tensors[name] = values
        rounds.append(tensors)
    return rounds


@pytest.mark.parametrize("bound, mode", [(1e-2, "rel"), (1e-3, "abs")])
def test_the_fused_paths_patch_escaped_values_as_the_general_ones(monkeypatch, bound, mode):
    seen = Counter()
    _count_calls(monkeypatch, "reconstruct_and_fold", seen, "encoded with escapes", escape_index_at=15)
    _count_calls(monkeypatch, "decode_and_fold", seen, "decoded with escapes", escape_index_at=17)
    fused_side, general_side = gradzip.Compressor(bound, mode, threads=1), gradzip.Compressor(bound, mode, threads=1)
    fused_reader, general_reader = gradzip.Decompressor(threads=1), gradzip.Decompressor(threads=1)
    for tensors in _rounds_with_escapes():
        blob = fused_side.compress(tensors)
        out = fused_reader.decompress(blob)
        with monkeypatch.context() as general:
            general.setattr(codec, "_fused_fits", lambda *args: False)
            assert general_side.compress(tensors) == blob
            expected = general_reader.decompress(blob)
        for name, original in tensors.items():
            assert out[name].tobytes() == expected[name].tobytes(), name
            exact = ~np.isfinite(original)
            assert np.array_equal(out[name][exact], original[exact], equal_nan=True), name
        assert (fused_side.state.to_bytes() == general_side.state.to_bytes() == fused_reader.state.to_bytes()
                == general_reader.state.to_bytes())
    assert seen["encoded with escapes"] >= 4 and seen["decoded with escapes"] >= 4, seen


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("bound, mode", [(1e-2, "rel"), (1e-4, "rel"), (1e-3, "abs")])
def test_fused_narrow_float_decoding_gives_the_general_paths_tensors_and_states(sample_rounds, gz, monkeypatch, dtype,
                                                                                 bound, mode):
    """A BF16 or F16 record decodes in the fused kernel, narrowed there: the general path's
    tensors (their bits), states and errors, escapes (NaN, infinities, values near the
    dtype's maximum, stored as deltas from the narrowed reconstruction) included."""
    from gradzip.tensorio import dtype_name

    narrowed = Counter()

    def counted(*args, kernel=codec.decode_and_fold):
        narrowed["records"] += int(args[-2].size > 0)
        return kernel(*args)

    def cast(values):
        return gz.bfloat16_from_float32(values) if dtype == "BF16" else np.asarray(values, np.float32).astype(np.float16)

    monkeypatch.setattr(codec, "decode_and_fold", counted)
    rng = np.random.default_rng(8)
    compressor = gradzip.Compressor(bound, mode, threads=1)
    fused_side, general_side = gradzip.Decompressor(threads=1), gradzip.Decompressor(threads=1)
    largest = 3.38e38 if dtype == "BF16" else 65500.0
    for path in sample_rounds[:5]:
        tensors = {name: cast(values) for name, values in load_file(path).items()}
        odd = rng.standard_normal((40, 60)).astype(np.float32)
        odd.reshape(-1)[rng.choice(odd.size, 6, replace=False)] = [np.nan, np.inf, -np.inf, largest, -largest, 1e3]
        tensors["odd"] = cast(odd)
        blob = compressor.compress(tensors)
        narrowed["escape deltas"] += sum(any(section == "escape_delta" for section, _ in record["sections"])
                                         for record, _ in split_stream(blob)[1])
        out = fused_side.decompress(blob)
        with monkeypatch.context() as general:
            general.setattr(codec, "_fused_decode_fits", lambda *args: False)
            expected = general_side.decompress(blob)
        for name, original in tensors.items():
            assert dtype_name(out[name]) == dtype_name(expected[name]) == dtype, name
            assert out[name].tobytes() == expected[name].tobytes(), name
        gz.assert_within_bound(tensors["odd"], out["odd"], bound, mode)
        assert fused_side.state.to_bytes() == general_side.state.to_bytes() == compressor.state.to_bytes()
    assert narrowed["records"] >= 20 and narrowed["escape deltas"] >= 5, narrowed


@pytest.mark.parametrize("damage", ["section renamed escape_value", "delta changed", "delta section shortened"])
def test_a_narrow_records_escape_deltas_are_checked(gz, damage):
    """A BF16 record's escape_delta section, renamed to the values' section, one delta changed
    or a delta short: a CorruptStreamError, and the state stays as it was."""
    rng = np.random.default_rng(4)
    compressor, decompressor = gradzip.Compressor(1e-3), gradzip.Decompressor(threads=1)
    values = rng.standard_normal((64, 96)).astype(np.float32)
    for _ in range(2):
        tensors = {"w": gz.bfloat16_from_float32(values)}
        decompressor.decompress(compressor.compress(tensors))
        values = values * 0.9 + rng.standard_normal(values.shape).astype(np.float32) * 0.3
    header, records, trailer = split_stream(compressor.compress({"w": gz.bfloat16_from_float32(values)}))
    (record, payload), = records
    names = [name for name, _ in record["sections"]]
    assert "escape_delta" in names and record["params"]["escaped"] > 10, record
    start = sum(size for _, size in record["sections"][:names.index("escape_delta")])
    size = dict(record["sections"])["escape_delta"]
    if damage == "section renamed escape_value":
        record = {**record, "sections": [["escape_value" if name == "escape_delta" else name, size]
                                         for name, size in record["sections"]]}
    elif damage == "delta changed":
        deltas = bytearray(zstandard.ZstdDecompressor().decompress(payload[start:start + size]))
        deltas[6] ^= 1
        frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(deltas))
        payload = payload[:start] + frame + payload[start + size:]
        record = {**record, "sections": [[name, len(frame) if name == "escape_delta" else n]
                                         for name, n in record["sections"]]}
    else:
        deltas = zstandard.ZstdDecompressor().decompress(payload[start:start + size])
        frame = zstandard.ZstdCompressor(write_content_size=True).compress(deltas[:-2])
        payload = payload[:start] + frame + payload[start + size:]
        record = {**record, "sections": [[name, len(frame) if name == "escape_delta" else n]
                                         for name, n in record["sections"]]}
    before = decompressor.state.to_bytes()
    with pytest.raises(gradzip.CorruptStreamError):
        decompressor.decompress(join_stream(header, [(record, payload)], trailer))
    assert decompressor.state.to_bytes() == before
