"""The bundle's fast paths give what the plain ones give: the float32 members quantized in one
kernel call, the exact alternative sized without being built, the bound's rounding without
Decimal where that is safe."""
import math
import random
from decimal import ROUND_DOWN, Decimal

import numpy as np
import pytest

import gradzip
from gradzip import codec
from gradzip.tensorio import as_bfloat16, dtype_name


def _members():
    """Small tensors of every kind a bundle meets, among float32 ones that quantize."""
    rng = np.random.default_rng(11)
    f32 = lambda n, scale=1.0: (rng.standard_normal(n) * scale).astype(np.float32)
    with_nan = f32(40)
    with_nan[3] = np.nan
    negative_zero = f32(30)
    negative_zero[7] = -0.0
    huge = f32(50)
    huge[0] = 3e38  # the range overflows float32 but not the float64 bound
    tensors = {
        "bias": f32(64, 1e-3), "norm": f32(200, 0.5).reshape(10, 20), "scalar": np.float32(0.25).reshape(()),
        "constant": np.full(16, 0.5, np.float32), "empty": np.zeros(0, np.float32), "nan": with_nan,
        "negative_zero": negative_zero, "huge": huge, "steps": np.arange(9, dtype=np.int64),
        "half": rng.standard_normal(33).astype(np.float16), "double": rng.standard_normal(70),
        "brain": as_bfloat16((f32(48).view(np.uint32) >> 16).astype(np.uint16)),
        "big_endian": f32(25).astype(">f4"), "strided": f32(80)[::2], "tiny": f32(12, 1e-30),
    }
    return [(position, name, array) for position, (name, array) in enumerate(tensors.items())]


# At abs 1e-12 every member but "tiny" would escape an element, so only it quantizes.
@pytest.mark.parametrize("mode,bound,quantized", [("rel", 1e-2, 6), ("rel", 1e-4, 6), ("abs", 1e-3, 6), ("abs", 1e-12, 1)])
def test_fused_member_quantization_matches_one_member_at_a_time(mode, bound, quantized):
    members = _members()
    config = gradzip.Compressor(bound, mode).config
    dtypes = [dtype_name(array) for _, _, array in members]
    fused = codec._bundle_members_quantized(members, dtypes, config)
    single = [codec._bundle_member_quantized(array, dtype, config) for (_, _, array), dtype in zip(members, dtypes)]
    assert sum(q is not None for q in single) >= quantized  # the float members that should quantize do
    for (_, name, _), one, both in zip(members, single, fused):
        assert (one is None) == (both is None), name
        if one is not None:
            assert one[0] == both[0], name
            assert np.array_equal(one[1].codes, both[1].codes), name
            assert one[1].recon.tobytes() == both[1].recon.tobytes(), name


def test_exact_bundle_size_is_the_built_exact_bundle_size():
    members = _members()
    compressible = [(0, "zeros", np.zeros(900, np.float32)), (1, "ones", np.ones(300, np.float64))]
    for group in (members, compressible, members[:1], [(0, "dense", np.zeros(4000, np.float64))]):
        group_dtypes = [dtype_name(array) for _, _, array in group]
        built = codec._bundle(group, group_dtypes, [None] * len(group))
        assert codec._exact_bundle_bytes(group, group_dtypes) == len(built.payload)


def test_bundle_round_trips_every_member_kind(gz):
    members = _members()
    tensors = {name: array for _, name, array in members}
    compressor, decompressor = gradzip.Compressor(1e-3), gradzip.Decompressor()
    out = decompressor.decompress(compressor.compress(tensors))
    for name, array in tensors.items():
        if dtype_name(array) in ("F32", "F16", "F64", "BF16") and array.size:
            gz.assert_within_bound(array, out[name], 1e-3, "rel", name)
        else:
            assert np.array_equal(out[name], array), name
    assert np.signbit(out["negative_zero"][7]) and np.isnan(out["nan"][3])


def _decimal_rounded_down(value: float) -> float:
    exact = Decimal(value)
    short = float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - codec.SIGNIFICANT_DIGITS + 1), rounding=ROUND_DOWN))
    return short if 0 < short <= value else value


def test_bound_rounding_truncates_the_exact_value():
    rng = random.Random(3)
    values = [5e-324, 1e-310, 1.7976931348623157e308, 1e-5, 0.01, 123456.0, 1234567.0]
    for _ in range(20000):
        values.append(rng.random() * 10.0 ** rng.randint(-300, 300))
        # Six-digit decimals and their neighbours: just below one, the 17-digit repr reads the
        # decimal itself (a carry into the kept digits), where only the exact value truncates right.
        decimal = float(f"{rng.randint(100000, 999999)}e{rng.randint(-40, 40)}")
        values += [decimal, math.nextafter(decimal, 0.0), math.nextafter(decimal, math.inf)]
    carries = [v for v in values if f"{v:.16e}".split("e")[0][codec.SIGNIFICANT_DIGITS + 1:].strip("0") == ""
               and _decimal_rounded_down(v) < float(f"{v:.5e}")]
    assert len(carries) > 100  # the fallback's case is exercised
    for value in values:
        assert codec._rounded_down(value) == _decimal_rounded_down(value), value
    for value in (0.0, -1.0, math.inf):
        assert codec._rounded_down(value) == value
    assert math.isnan(codec._rounded_down(math.nan))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix_members_are_flattened_like_arrays():
    """np.matrix passes the input check as an ndarray subclass; its reshape(-1) stays 2-D."""
    rng = np.random.default_rng(2)
    tensors = {"a": np.matrix(rng.standard_normal((3, 4)).astype(np.float32)),
               "b": np.matrix(rng.standard_normal((2, 5)).astype(np.float32))}
    out = gradzip.Decompressor().decompress(gradzip.Compressor(1e-2).compress(tensors))
    for name, array in tensors.items():
        assert out[name].shape == array.shape
        assert np.abs(out[name] - np.asarray(array)).max() <= 1e-2 * (array.max() - array.min())
