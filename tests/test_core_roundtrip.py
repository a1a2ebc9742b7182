"""Core API round trips: the bound, exactness where promised, layout, closed-loop state.

Every test runs several rounds through one Compressor and one Decompressor, so the
predictors (EMA magnitude, kernel/oscillation signs, contexts) are exercised, and checks
after every round that the compressor's and decompressor's states are byte-identical.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import gradzip
from gradzip import Compressor, Decompressor, GradzipWarning
from gradzip.api import describe_stream
from gradzip.container import split_stream
from gradzip.state import PredictorState
from gradzip.tensorio import as_bfloat16

LOSSY_MIN = 1025  # gradzip stores tensors of <= 1024 elements exactly


def run_rounds(rounds, eb=1e-3, mode="rel", gz=None, **kwargs):
    """Compress and decompress rounds in order; returns (compressor, decompressor, blobs, decoded)."""
    c, d = Compressor(eb, mode, **kwargs), Decompressor()
    blobs, decoded = [], []
    for tensors in rounds:
        blob = c.compress(tensors)
        out = d.decompress(blob)
        assert c.state.to_bytes() == d.state.to_bytes(), "compressor and decompressor states diverged"
        blobs.append(blob)
        decoded.append(out)
    return c, d, blobs, decoded


def methods(blob: bytes) -> dict[str, str]:
    report = describe_stream(io.BytesIO(blob), len(blob))
    return {t.name: t.method for t in report.tensors}


def predictors(blob: bytes) -> dict[str, str]:
    report = describe_stream(io.BytesIO(blob), len(blob))
    return {t.name: t.predictor for t in report.tensors}


# ----------------------------------------------------------------------------- bound over rounds


@pytest.mark.parametrize("coder", ["rans", "huffman"])
@pytest.mark.parametrize("mode,eb", [("rel", 1e-2), ("rel", 1e-3), ("rel", 1e-4), ("abs", 1e-4), ("abs", 1e-6)])
def test_synthetic_rounds_stay_within_bound_and_states_match(gz, mode, eb, coder):
    rounds = gz.make_rounds(5, seed=1)
    c, d, blobs, decoded = run_rounds(rounds, eb, mode, coder=coder)
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_same_layout(tensors, out)
        for name, array in tensors.items():
            if array.dtype.kind == "f":
                gz.assert_within_bound(array, out[name], eb, mode, f"round {r} {name}")
            else:
                gz.assert_bit_exact(array, out[name], f"round {r} {name}")
    assert c.state.round == d.state.round == len(rounds)
    # Lossy coding really happens, and prediction is really used after the first round.
    assert methods(blobs[0])["fc.weight"] == "quantized"
    assert predictors(blobs[0])["fc.weight"] == "none"


def test_prediction_is_used_on_correlated_rounds(gz):
    """A slowly changing sequence is predicted (not just quantized) after round 0."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(32, 16, 3, 3)).astype(np.float32)
    rounds = [{"w": (base * (1 + 0.01 * r) + 0.01 * rng.normal(size=base.shape)).astype(np.float32)} for r in range(4)]
    _, _, blobs, decoded = run_rounds(rounds, 1e-3, "rel")
    for tensors, out in zip(rounds, decoded):
        gz.assert_within_bound(tensors["w"], out["w"], 1e-3, "rel", "w")
    assert predictors(blobs[0])["w"] == "none"
    assert any(predictors(b)["w"] != "none" for b in blobs[1:]), [predictors(b) for b in blobs]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("mode,eb", [("rel", 1e-3), ("abs", 1e-3)])
def test_every_float_dtype_round_trips_within_bound(gz, dtype, mode, eb):
    rng = np.random.default_rng(3)
    rounds = []
    for r in range(3):
        values = rng.normal(scale=0.5, size=(24, 8, 3, 3)).astype(np.float32)
        tensor = gz.bfloat16_from_float32(values) if dtype == "bfloat16" else values.astype(dtype)
        rounds.append({"w": tensor, "small": tensor.reshape(-1)[:100].copy()})
    c, d, blobs, decoded = run_rounds(rounds, eb, mode)
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_same_layout(tensors, out)
        gz.assert_within_bound(tensors["w"], out["w"], eb, mode, f"round {r} w")
        gz.assert_within_bound(tensors["small"], out["small"], eb, mode, f"round {r} small")
        assert gz.is_bf16(out["w"]) == (dtype == "bfloat16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_dtype_bound_holds_after_cast_back(gz, dtype):
    """The bound is checked in the original dtype: an abs bound just above half an ulp of the
    narrow dtype makes the float32 reconstruction round to a neighbour that would break it."""
    rng = np.random.default_rng(11)
    values = rng.uniform(1.0, 2.0, size=5000).astype(np.float32)
    tensor = gz.bfloat16_from_float32(values) if dtype == "bfloat16" else values.astype(np.float16)
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10  # spacing in [1, 2)
    for eb in (0.5 * ulp, 0.6 * ulp, 0.9 * ulp, 1.4 * ulp, 3.3 * ulp):
        _, _, _, decoded = run_rounds([{"x": tensor}], eb, "abs")
        gz.assert_within_bound(tensor, decoded[0]["x"], eb, "abs", f"{dtype} eb={eb}")


def test_names_dtypes_shapes_and_order_survive_exactly(gz):
    rng = np.random.default_rng(5)
    tensors = {
        "z.last_in_alphabet_first_in_file": rng.normal(size=(33, 40)).astype(np.float32),
        "a.weight": rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float64),
        "unicode.ünïcödé/名前": rng.normal(size=1500).astype(np.float16),
        "m.bf16": gz.bfloat16_from_float32(rng.normal(size=(40, 30))),
        "ints.i8": rng.integers(-128, 127, size=(7, 3), dtype=np.int8),
        "ints.u64": rng.integers(0, 2**63, size=2000, dtype=np.uint64),
        "flags": rng.random(1200) < 0.3,
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((3, 0, 5), dtype=np.float32),
        "column": rng.normal(size=(2048, 1)).astype(np.float32),
    }
    for name, dtype in [("i16", np.int16), ("i32", np.int32), ("i64", np.int64), ("u8", np.uint8),
                        ("u16", np.uint16), ("u32", np.uint32)]:
        tensors[f"ints.{name}"] = rng.integers(0, 100, size=1100).astype(dtype)
    _, _, _, decoded = run_rounds([tensors, {k: v.copy() for k, v in reversed(list(tensors.items()))}], 1e-3, "rel")
    gz.assert_same_layout(tensors, decoded[0])
    assert list(decoded[1]) == list(reversed(list(tensors)))
    for name, array in tensors.items():
        if array.dtype.kind == "f" or gz.is_bf16(array):
            gz.assert_within_bound(array, decoded[0][name], 1e-3, "rel", name)
        else:
            gz.assert_bit_exact(array, decoded[0][name], name)


def test_non_float_tensors_are_bit_exact_and_small_floats_within_bound(gz):
    rng = np.random.default_rng(2)
    rounds = []
    for r in range(3):
        rounds.append({
            "small.f32": rng.normal(size=1024).astype(np.float32),  # exactly at the bundle limit
            "small.f64": rng.normal(size=(4, 4)),
            "small.f16": rng.normal(size=10).astype(np.float16),
            "small.bf16": gz.bfloat16_from_float32(rng.normal(size=17)),
            "small.i64": rng.integers(-5, 5, size=3),
            "big.i32": rng.integers(-2**31, 2**31 - 1, size=5000, dtype=np.int32),
            "big.bool": rng.random((50, 50)) < 0.5,
            "big.u16": rng.integers(0, 2**16, size=4096, dtype=np.uint16),
        })
    _, _, blobs, decoded = run_rounds(rounds, 1e-1, "rel")
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_same_layout(tensors, out)
        for name, array in tensors.items():
            if name.startswith("small.f") or name.startswith("small.bf"):
                gz.assert_within_bound(array, out[name], 1e-1, "rel", f"round {r} {name}")
            else:
                gz.assert_bit_exact(array, out[name], f"round {r} {name}")
        kinds = methods(blobs[r])
        assert {kinds[n] for n in tensors if n.startswith("small.f") or n.startswith("small.bf")} == {"quantized"}
        assert {kinds[n] for n in tensors if not n.startswith("small.f") and not n.startswith("small.bf")} == {"lossless"}


def test_small_float_tensor_with_a_non_finite_value_is_stored_exactly(gz):
    """A small tensor would need escapes for NaN/Inf; the bundle stores it exactly instead."""
    rng = np.random.default_rng(4)
    odd = rng.normal(size=50).astype(np.float32)
    odd[[3, 9]] = [np.nan, -np.inf]
    plain = rng.normal(size=50).astype(np.float32)
    _, _, blobs, decoded = run_rounds([{"odd": odd, "plain": plain}], 1e-2, "rel")
    gz.assert_bit_exact(odd, decoded[0]["odd"], "odd")
    gz.assert_within_bound(plain, decoded[0]["plain"], 1e-2, "rel", "plain")
    assert methods(blobs[0]) == {"odd": "lossless", "plain": "quantized"}


def test_first_lossy_size_is_quantized(gz):
    """1025 float elements are over the lossless limit and coded lossily (still within bound)."""
    x = np.random.default_rng(0).normal(size=LOSSY_MIN).astype(np.float32)
    _, _, blobs, decoded = run_rounds([{"x": x}], 1e-2, "rel")
    assert methods(blobs[0]) == {"x": "quantized"}
    gz.assert_within_bound(x, decoded[0]["x"], 1e-2, "rel", "x")


# ----------------------------------------------------------------------------- special values


def special_tensor(rng, dtype=np.float32, n=4096):
    x = rng.normal(size=n).astype(dtype)
    idx = rng.permutation(n)
    info = np.finfo(dtype)
    x[idx[0:20]] = np.nan
    x[idx[20:30]] = np.inf
    x[idx[30:40]] = -np.inf
    x[idx[40:60]] = -0.0
    x[idx[60:80]] = 0.0
    x[idx[80:100]] = info.smallest_subnormal * rng.integers(1, 50, size=20)
    x[idx[100:120]] = -info.smallest_subnormal * rng.integers(1, 50, size=20)
    x[idx[120:140]] = info.tiny
    return x, idx


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("mode,eb", [("rel", 1e-3), ("abs", 1e-4)])
def test_nan_inf_are_bit_exact_and_finite_values_within_bound(gz, dtype, mode, eb):
    rng = np.random.default_rng(4)
    rounds = [{"x": special_tensor(rng, dtype)[0]} for _ in range(3)]
    # A NaN with a payload and a negative-signed NaN must keep their exact bits too.
    bits = rounds[1]["x"].view(f"u{np.dtype(dtype).itemsize}")
    payload_nan = {np.float16: 0xFE01, np.float32: 0xFFC00123, np.float64: 0xFFF8000000000ABC}[dtype]
    bits[7] = payload_nan
    _, _, _, decoded = run_rounds(rounds, eb, mode)
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["x"], out["x"], eb, mode, f"round {r}")
    assert decoded[1]["x"].view(bits.dtype)[7] == payload_nan


def test_special_values_in_bfloat16(gz):
    rng = np.random.default_rng(6)
    values, _ = special_tensor(rng, np.float32)
    tensor = gz.bfloat16_from_float32(values)
    _, _, _, decoded = run_rounds([{"x": tensor}, {"x": gz.bfloat16_from_float32(values[::-1].copy())}], 1e-3, "rel")
    gz.assert_within_bound(tensor, decoded[0]["x"], 1e-3, "rel", "bf16")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_negative_zero_keeps_its_sign(gz, dtype):
    """-0.0 must come back as -0.0, in small tensors (stored exactly: -0.0 would escape) and in lossy ones."""
    rng = np.random.default_rng(8)
    lossy = rng.normal(size=3000).astype(dtype)
    lossy[::7] = -0.0
    small = np.array([-0.0, 0.0, 1.0, -0.0], dtype=dtype)
    _, _, _, decoded = run_rounds([{"lossy": lossy, "small": small}], 1e-3, "rel")
    gz.assert_bit_exact(small, decoded[0]["small"], "small")
    out = decoded[0]["lossy"]
    gz.assert_within_bound(lossy, out, 1e-3, "rel", "lossy")
    flipped = int((~np.signbit(out[::7])).sum())
    assert flipped == 0, f"{flipped} of {lossy[::7].size} -0.0 elements in a lossy tensor came back as +0.0"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,eb", [("rel", 1e-3), ("abs", 1e-45)])
def test_subnormal_only_tensor(gz, dtype, mode, eb):
    rng = np.random.default_rng(9)
    tiny = np.finfo(dtype).smallest_subnormal
    rounds = [{"x": (rng.integers(-10**6, 10**6, size=3000) * tiny).astype(dtype)} for _ in range(3)]
    _, _, _, decoded = run_rounds(rounds, eb, mode)
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["x"], out["x"], eb, mode, f"round {r}")


@pytest.mark.parametrize("mode", ["rel", "abs"])
@pytest.mark.parametrize("value", [0.0, -0.0, 3.25, -1e30])
def test_constant_and_all_zero_tensors(gz, mode, value):
    rounds = [{"c": np.full((64, 64), value, np.float32), "c64": np.full(2000, value, np.float64),
               "step": np.array(r, np.int64)} for r in range(3)]  # "step" keeps rounds distinct
    _, _, _, decoded = run_rounds(rounds, 1e-3, mode)
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        for name, array in tensors.items():
            # rel of a zero range is a zero bound: constants must come back exactly.
            gz.assert_within_bound(array, out[name], 1e-3, mode, f"round {r} {name}")
            if mode == "rel":
                gz.assert_bit_exact(array, out[name], f"round {r} {name}")


def test_all_nonfinite_lossy_tensor_is_exact(gz):
    x = np.full(3000, np.nan, np.float32)
    x[::3] = np.inf
    x[1::3] = -np.inf
    _, _, _, decoded = run_rounds([{"x": x}], 1e-3, "rel")
    gz.assert_bit_exact(x, decoded[0]["x"], "x")


@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0, 5), (2, 3, 0, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "bool", "bfloat16"])
def test_empty_tensors(gz, shape, dtype):
    empty = gz.bfloat16_from_float32(np.zeros(shape, np.float32)) if dtype == "bfloat16" else np.zeros(shape, dtype)
    rng = np.random.default_rng(0)
    rounds = [{"empty": empty, "w": rng.normal(size=2000).astype(np.float32) * (r + 1)} for r in range(2)]
    _, _, _, decoded = run_rounds(rounds, 1e-3, "rel")
    for out in decoded:
        gz.assert_same_layout(rounds[0], out)
        gz.assert_bit_exact(empty, out["empty"], "empty")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "bool", "bfloat16"])
def test_zero_dimensional_scalars(gz, dtype):
    for value in (1.5, -0.0, np.nan, np.inf):
        if dtype in ("int32", "bool") and not np.isfinite(value):
            continue
        scalar = gz.bfloat16_from_float32(np.array(value, np.float32)) if dtype == "bfloat16" else np.array(value).astype(dtype)
        assert scalar.shape == ()
        _, _, _, decoded = run_rounds([{"s": scalar}], 1e-3, "rel")
        assert decoded[0]["s"].shape == ()
        gz.assert_bit_exact(scalar, decoded[0]["s"], f"{dtype} {value}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("eb", [1e-3, 0.3, 0.9])
def test_huge_magnitudes_where_range_overflows(gz, dtype, eb):
    """Values near the float max: max - min overflows, the rel bound must not."""
    rng = np.random.default_rng(10)
    big = np.finfo(dtype).max
    x = (rng.uniform(-1, 1, size=3000) * float(big)).astype(dtype)
    x[0], x[1] = big, -big
    with np.errstate(over="ignore"):
        assert not np.isfinite(x.max() - x.min())
    rounds = [{"x": x}, {"x": (x * dtype(0.5)).astype(dtype)}]
    _, _, _, decoded = run_rounds(rounds, eb, "rel")
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["x"], out["x"], eb, "rel", f"round {r}")


def test_abs_bound_so_large_that_twice_it_overflows(gz):
    x = np.random.default_rng(0).normal(size=3000) * 1e300
    for eb in (1e307, 1.7e308):
        _, _, _, decoded = run_rounds([{"x": x}], eb, "abs")
        gz.assert_within_bound(x, decoded[0]["x"], eb, "abs", f"eb={eb}")


@pytest.mark.parametrize("dtype,eb", [(np.float32, 1e-12), (np.float64, 1e-300), (np.float16, 1e-6)])
def test_bound_below_dtype_resolution_stores_exactly(gz, dtype, eb):
    rng = np.random.default_rng(12)
    rounds = [{"x": rng.uniform(1, 2, size=3000).astype(dtype)} for _ in range(3)]
    _, _, blobs, decoded = run_rounds(rounds, eb, "abs")
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["x"], out["x"], eb, "abs", f"round {r}")
        gz.assert_bit_exact(tensors["x"], out["x"], f"round {r}")


def test_zero_abs_bound_is_lossless(gz):
    rounds = gz.make_rounds(3, seed=4)
    _, _, _, decoded = run_rounds(rounds, 0.0, "abs")
    for tensors, out in zip(rounds, decoded):
        for name, array in tensors.items():
            gz.assert_bit_exact(array, out[name], name)


def test_non_contiguous_and_big_endian_inputs(gz):
    rng = np.random.default_rng(13)
    base = rng.normal(size=(80, 60))
    tensors = {"transposed": base.T.astype(np.float32), "strided": base[:, ::2], "big_endian": base.astype(">f4"),
               "big_endian_int": np.arange(2000, dtype=">i4")}
    _, _, _, decoded = run_rounds([tensors], 1e-3, "rel")
    for name, array in tensors.items():
        native = array.astype(array.dtype.newbyteorder("="))
        if array.dtype.kind == "f":
            gz.assert_within_bound(native, decoded[0][name], 1e-3, "rel", name)
        else:
            gz.assert_bit_exact(native, decoded[0][name], name)


# ----------------------------------------------------------------------------- changing tensor sets


def test_tensor_set_changes_between_rounds(gz):
    rng = np.random.default_rng(14)

    def t(*shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    rounds = [
        {"a": t(64, 32), "b": t(2048), "c": t(40, 40), "d": t(3000)},
        {"a": t(64, 32), "c": t(1600), "new": t(16, 8, 3, 3), "d": t(3000, dtype=np.float64)},  # b missing, c reshaped, d retyped
        {"b": t(2048), "a": t(64, 32), "c": t(1600), "new": t(16, 8, 3, 3), "d": t(3000, dtype=np.float64)},
        {"a": t(32, 64), "c": t(10), "b": t(2048)},  # a transposed shape, c now too small to be lossy
        {"a": t(32, 64), "c": t(40, 40), "b": t(2048)},
    ]
    c, d = Compressor(1e-3, "rel"), Decompressor()
    expected_warnings = [set(), {"c", "d"}, set(), {"a"}, {"c"}]
    for r, tensors in enumerate(rounds):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            blob = c.compress(tensors)
        warned = {name for name in tensors for w in caught
                  if issubclass(w.category, GradzipWarning) and repr(name) in str(w.message)}
        assert warned == expected_warnings[r], (r, [str(w.message) for w in caught])
        out = d.decompress(blob)
        assert c.state.to_bytes() == d.state.to_bytes(), f"round {r}: states diverged"
        gz.assert_same_layout(tensors, out)
        for name, array in tensors.items():
            gz.assert_within_bound(array, out[name], 1e-3, "rel", f"round {r} {name}")
        for name in expected_warnings[r]:  # prediction restarted: a fresh history of one round
            assert c.state.tensors[name].rounds == 1
            assert c.state.tensors[name].shape == tensors[name].shape
    assert c.state.tensors["b"].rounds == 4


def test_reshaped_tensor_is_not_predicted_from_its_old_shape(gz):
    rng = np.random.default_rng(15)
    x = rng.normal(size=(64, 64)).astype(np.float32)
    c = Compressor(1e-3, "rel")
    c.compress({"x": x})
    with pytest.warns(GradzipWarning, match="x"):
        blob = c.compress({"x": (x * 1.01).reshape(32, 128)})
    assert predictors(blob)["x"] == "none"


# ----------------------------------------------------------------------------- determinism and state


def test_same_inputs_and_state_give_identical_streams(gz):
    rounds = gz.make_rounds(4, seed=21)
    c1 = Compressor(1e-3, "rel")
    for tensors in rounds[:2]:
        c1.compress(tensors)
    saved = c1.state.to_bytes()
    c2 = Compressor(1e-3, "rel", state=PredictorState.from_bytes(saved))
    for tensors in rounds[2:]:
        a = c1.compress(tensors)
        b = c2.compress({k: v.copy() for k, v in tensors.items()})
        assert a == b
        assert c1.state.to_bytes() == c2.state.to_bytes()


def test_state_save_and_load_continue_the_sequence(gz, tmp_path):
    rounds = gz.make_rounds(4, seed=22)
    c, d = Compressor(1e-3, "rel"), Decompressor()
    reference = Compressor(1e-3, "rel")
    for r, tensors in enumerate(rounds):
        blob = c.compress(tensors)
        assert blob == reference.compress(tensors)
        c.save_state(tmp_path / "c.state")
        c = Compressor(1e-3, "rel")
        c.load_state(tmp_path / "c.state")
        d.decompress(blob)
        d.save_state(tmp_path / "d.state")
        d = Decompressor()
        d.load_state(tmp_path / "d.state")
        assert (tmp_path / "c.state").read_bytes() == (tmp_path / "d.state").read_bytes()
    assert c.state.round == d.state.round == 4


def test_state_digest_identifies_the_state(gz):
    rounds = gz.make_rounds(2, seed=23)
    c, _, _, _ = run_rounds(rounds)
    again = PredictorState.from_bytes(c.state.to_bytes())
    assert again.digest() == c.state.digest()
    assert again.to_bytes() == c.state.to_bytes()
    assert PredictorState().digest() != c.state.digest()


def test_bad_settings_are_rejected():
    for kwargs in ({"error_bound": -1e-3}, {"error_bound": float("nan")}, {"error_bound": float("inf")},
                   {"error_bound": 1e-3, "mode": "pointwise"}, {"error_bound": 1.5, "mode": "rel"}):
        with pytest.raises(gradzip.InputError):
            Compressor(**kwargs)


def test_bad_tensor_dicts_are_rejected():
    c = Compressor()
    for tensors in ({"": np.zeros(3)}, {1: np.zeros(3)}, {"x": [1.0, 2.0]}, {"x": np.zeros(3, np.complex64)},
                    {"x": np.array(["a"])}, {"x": np.zeros(3, dtype=object)}):
        with pytest.raises(gradzip.InputError):
            c.compress(tensors)
    assert c.state.round == 0


def test_rounds_with_identical_content_to_a_much_earlier_round_still_work(gz):
    """Only an immediate repeat is suspicious; A, B, A is an ordinary sequence."""
    a, b = gz.make_rounds(2, seed=24)
    _, _, _, decoded = run_rounds([a, b, a], 1e-3, "rel")
    for name, array in a.items():
        if array.dtype.kind == "f":
            gz.assert_within_bound(array, decoded[2][name], 1e-3, "rel", name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_special_values_raise_no_numpy_warnings(gz, dtype):
    """NaN/Inf inputs are ordinary: no RuntimeWarning leaks to the user (the CLI prints every
    warning as 'gradzip: warning: ...')."""
    values, _ = special_tensor(np.random.default_rng(16), np.float32)
    tensor = gz.bfloat16_from_float32(values) if dtype == "bfloat16" else values.astype(dtype)
    c, d = Compressor(1e-3, "rel"), Decompressor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for r in range(2):
            d.decompress(c.compress({"x": tensor, "step": np.array(r)}))


@pytest.mark.parametrize("eb", [0.3, 0.9])
def test_huge_float16_values_raise_no_numpy_warnings(gz, eb):
    """Reconstructions that overflow float16 are escaped silently: no 'overflow encountered in
    cast' RuntimeWarning reaches the user."""
    rng = np.random.default_rng(17)
    x = (rng.uniform(-1, 1, size=3000) * 65504).astype(np.float16)
    c, d = Compressor(eb, "rel"), Decompressor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = d.decompress(c.compress({"x": x}))
    gz.assert_within_bound(x, out["x"], eb, "rel", "x")


@pytest.mark.parametrize("shape", [(600, 500), (4, 70000), (300000,), (40, 64, 11, 11)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_tensors_choose_on_a_sample_and_stay_within_bound(gz, shape, dtype):
    """Above 2**17 elements the encoder picks its candidate on a sample of rows, columns or
    elements, then builds only that one: the bound and the state must hold as everywhere."""
    from gradzip.codec import _SAMPLED_ABOVE

    assert int(np.prod(shape)) > _SAMPLED_ABOVE
    rng = np.random.default_rng(9)
    scale = np.exp(rng.normal(0, 1, shape[0])).reshape((-1,) + (1,) * (len(shape) - 1))
    rounds = []
    for _ in range(3):
        values = (scale * rng.laplace(size=shape)).astype(np.float32)
        rounds.append({"w": gz.bfloat16_from_float32(values) if dtype == "bfloat16" else values})
    _, _, blobs, decoded = run_rounds(rounds, 1e-2, "rel")  # also checks the two states agree
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["w"], out["w"], 1e-2, "rel", f"round {r}")
    if len(shape) >= 2 and shape[0] >= 40:  # per-row scales: this round's scale contexts must win somewhere
        assert any(split_stream(b)[1][0][0]["params"].get("contexts", "").startswith("scale") for b in blobs)


@pytest.mark.parametrize("shape", [(300000,), (600, 1000)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_persistent_updates_take_the_linear_prediction_through_the_sample(gz, dtype, shape):
    """A sampled choice of the linear prediction (with or without scale contexts) is rebuilt
    on the whole tensor, its weights refitted there and its reconstruction rebuilt after coding
    (F32): bound and identical states as everywhere. (600, 1000) also has rANS segments."""
    rng = np.random.default_rng(21)
    scale = np.exp(rng.normal(0, 0.5, shape[0])).reshape((-1,) + (1,) * (len(shape) - 1))
    update = rng.laplace(size=shape)
    rounds = []
    for _ in range(4):
        update = 0.85 * update + 0.5 * rng.laplace(size=shape)
        values = (scale * update).astype(np.float32)
        rounds.append({"w": gz.bfloat16_from_float32(values) if dtype == "bfloat16" else values})
    _, _, blobs, decoded = run_rounds(rounds, 1e-2, "rel")
    for r, (tensors, out) in enumerate(zip(rounds, decoded)):
        gz.assert_within_bound(tensors["w"], out["w"], 1e-2, "rel", f"round {r}")
    assert any(split_stream(b)[1][0][0]["params"]["predictor"] == "linear" for b in blobs)


def test_the_input_digest_tells_apart_rounds_that_differ_only_in_layout():
    """The digest that refuses a round compressed twice hashes the names, dtypes and shapes
    first and the bytes after: the same bytes split, named, typed or shaped otherwise must
    give another digest, and the same round the same one."""
    from gradzip.api import tensors_digest

    values = np.arange(6, dtype=np.float32)
    base = {"a": values[:4], "b": values[4:]}
    variants = [
        {"a": values[:3], "b": values[3:]},
        {"b": values[:4], "a": values[4:]},
        {"a": values[:4].reshape(2, 2), "b": values[4:]},
        {"a": values[:4].view(np.int32), "b": values[4:]},
        {"a": values[:4], "c": values[4:]},
    ]
    digest = tensors_digest(base)
    assert tensors_digest({"a": values[:4].copy(), "b": values[4:].copy()}) == digest
    assert len({digest, *(tensors_digest(v) for v in variants)}) == 1 + len(variants)


# ----------------------------------------------------------------------------- returned arrays


@pytest.mark.parametrize("threads", [1, 2])
def test_decompressed_arrays_are_read_only_and_a_float32_one_is_the_states_last(threads):
    """Every returned array is read-only; a float32 tensor's is its new state's last
    reconstruction, not a copy (the fused decoder's small tensors and a large one decoded in
    element ranges alike), so writing to it raises and the next round still decodes."""
    rng = np.random.default_rng(21)
    shapes = {"small.weight": (64, 48), "large.weight": (512, 640), "bias": (64,)}
    rounds = [{k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    rounds[1]["half"] = (rng.standard_normal((40, 40)) * 0.01).astype(np.float16)
    rounds[1]["double"] = rng.standard_normal(3000) * 0.01
    rounds[1]["brain"] = as_bfloat16(
        (rng.standard_normal(3000).astype(np.float32) * 0.01).view(np.uint32) >> 16)
    c, d = Compressor(1e-2, "rel", threads=threads), Decompressor(threads=threads)
    out = d.decompress(c.compress(rounds[0]))
    for name in ("small.weight", "large.weight"):
        assert np.shares_memory(out[name], d.state.tensors[name].last)
    out = d.decompress(c.compress(rounds[1]))
    assert all(not array.flags.writeable for array in out.values())
    for name in ("half", "double", "brain"):  # (narrower or wider than the float32 state)
        assert not np.shares_memory(out[name], d.state.tensors[name].last)
    before = d.state.to_bytes()
    for name in out:
        with pytest.raises(ValueError):
            out[name][...] = 0
    assert d.state.to_bytes() == before == c.state.to_bytes()
    decoded = d.decompress(c.compress(rounds[2]))
    assert d.state.to_bytes() == c.state.to_bytes()
    for name, original in rounds[2].items():
        assert np.abs(decoded[name] - original).max() <= 1e-2 * (original.max() - original.min())


def test_decompression_holds_one_copy_of_each_reconstruction():
    """Memory target: a decompress call's numpy allocations beside the old state are the new
    state (9 bytes an element: EMA, sign, last reconstruction; the one before is shared) and
    a tensor's working arrays; the returned arrays are the new state's reconstructions. A
    copy of each (4 bytes an element more) measured 13.4 bytes an element here."""
    import gc
    import tracemalloc

    rng = np.random.default_rng(22)
    shapes = {**{f"layer{i}.weight": (256, 256) for i in range(6)}, "big.weight": (1024, 640)}
    c, d = Compressor(1e-2, "rel", threads=1), Decompressor(threads=1)
    blobs = [c.compress({k: (rng.standard_normal(s) * 0.01 * (1 + 0.1 * r)).astype(np.float32)
                         for k, s in shapes.items()}) for r in range(4)]
    for blob in blobs[:3]:
        d.decompress(blob)
    elements = sum(int(np.prod(s)) for s in shapes.values())
    gc.collect()
    tracemalloc.start()
    try:
        out = d.decompress(blobs[3])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out) == len(shapes)
    assert peak < 10.5 * elements, peak / elements


@pytest.mark.parametrize("eb", [1e-2, 1e-12])  # quantized records, and lossless ones (bound below the resolution)
def test_the_state_never_shares_memory_with_the_callers_input(eb):
    """A caller may reuse its input buffers for the next round: the compressor's state keeps
    its own reconstructions (a lossless record's reconstruction is the input itself)."""
    rng = np.random.default_rng(23)
    tensors = {"w": (rng.standard_normal((300, 40)) * 0.01).astype(np.float32),
               "v": (rng.standard_normal(5000) * 0.01).astype(np.float32),
               "large": (rng.standard_normal((512, 640)) * 0.01).astype(np.float32)}  # the general tail
    c, d = Compressor(eb, "rel", threads=2), Decompressor()
    for _ in range(3):
        blob = c.compress(tensors)
        d.decompress(blob)
        state = c.state.to_bytes()
        assert set(methods(blob).values()) == ({"quantized"} if eb > 1e-6 else {"lossless"})
        for name, array in tensors.items():
            assert not np.shares_memory(c.state.tensors[name].last, array)
            array[...] = (rng.standard_normal(array.shape) * 0.01).astype(np.float32)  # the next round, in place
        assert c.state.to_bytes() == state == d.state.to_bytes()


@pytest.mark.parametrize("shape", [(300, 40), (512, 640)])  # the fused tail, and the general one
def test_the_encoders_float32_reconstruction_is_its_new_states_last(shape):
    """One copy of a reconstruction the encoder builds: its new state's last array."""
    from gradzip.codec import CodecConfig, encode_tensor

    rng = np.random.default_rng(24)
    config, previous = CodecConfig(error_bound=1e-2), None
    for _ in range(3):
        array = (rng.standard_normal(shape) * 0.01).astype(np.float32)
        encoded = encode_tensor("w", array, config, previous, threads=2)
        assert encoded.record["method"] == "quantized"
        assert np.shares_memory(encoded.recon, encoded.state.last) and not np.shares_memory(encoded.state.last, array)
        previous = encoded.state


@pytest.mark.parametrize("eb", [1e-2, 1e-3])
def test_a_conv_whose_feature_map_is_one_by_one_codes_its_zero_taps_nearly_free(gz, eb):
    """A conv on a 1 x 1 feature map (a ResNet's last stage on small images) has a gradient
    only at its kernel's centre: the scale contexts' tap levels put the other eight taps in
    a bucket of their own, so the first round costs little more than the centre taps coded alone (without
    tap levels, each zero tap shared its column's contexts with the centre: about 0.5 bits
    an element, 1.4-1.6x as large). Within the bound, like every stream."""
    rng = np.random.default_rng(5)
    rows, cols = 96, 128
    scale = np.exp(rng.normal(0, 1, (rows, 1))) * np.exp(rng.normal(0, 0.5, (1, cols)))
    centre = (scale * rng.laplace(size=(rows, cols))).astype(np.float32)
    conv = np.zeros((rows, cols, 3, 3), np.float32)
    conv[:, :, 1, 1] = centre
    value_range = float(conv.max() - conv.min())  # (the same range as the centre's: zeros lie inside it)
    _, _, (conv_blob,), (out,) = run_rounds([{"w": conv}], eb, "rel")
    gz.assert_within_bound(conv, out["w"], eb, "rel", "conv")
    assert split_stream(conv_blob)[1][0][0]["params"].get("contexts") == "scale"
    _, _, (centre_blob,), _ = run_rounds([{"w": centre}], eb * value_range / float(centre.max() - centre.min()), "rel")
    assert len(conv_blob) < 1.1 * len(centre_blob), (len(conv_blob), len(centre_blob))


def test_zero_rows_have_a_context_of_their_own_that_costs_nothing(gz):
    """An embedding's untouched rows are all zero: in scale contexts they take bucket 64 (stream
    version 11), whose one certain token costs nothing and which the rANS coder passes over."""
    from gradzip.codec import _decoded_contexts, _split_sections
    from gradzip.entropy import rans

    rng = np.random.default_rng(11)
    rows, cols = 4096, 64
    touched = rng.choice(rows, 256, replace=False)
    embedding = np.zeros((rows, cols), np.float32)
    embedding[touched] = rng.laplace(size=(256, cols)) * np.exp(rng.normal(0, 1, (256, 1))) * 1e-3
    _, _, (blob,), (out,) = run_rounds([{"w": embedding}], 1e-2, "rel")
    gz.assert_within_bound(embedding, out["w"], 1e-2, "rel", "embedding")
    record, payload = split_stream(blob)[1][0]
    params, sections = record["params"], _split_sections(record["sections"], payload)
    assert params["contexts"] == "scale", params
    contexts, n_contexts, _ = _decoded_contexts(params, sections, (rows, cols), "F32", rows * cols, params["eb"], None)
    zero_bucket = 64 >> params["context_merge"]
    is_zero_row = np.ones(rows, bool)
    is_zero_row[touched] = False
    assert np.array_equal(contexts == zero_bucket, np.repeat(is_zero_row, cols))  # those rows, and only they
    status, bit_words, n_bit_words, _ = rans._stream_words(np.frombuffer(sections["codes"], np.uint8))
    certain = rans._decode_model(bit_words, n_bit_words, contexts, n_contexts)[6]
    assert certain.size and certain[zero_bucket] == 0  # one certain token, code 0: skipped, and free
