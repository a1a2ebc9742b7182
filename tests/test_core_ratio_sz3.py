"""The headline claim: on the real sample rounds, gradzip's compression ratio is at least SZ3's
at the same pointwise bound. A correctness-of-claim test, not a timing test.

SZ3 (pysz, the official binding) gets each float tensor in its natural shape with an absolute
bound equal to gradzip's per-tensor bound, rel * (max - min); a small tensor (at most 1024
elements) costs SZ3 the smaller of its SZ3 stream and its raw bytes, as in the bench. For the
other tensors both sides are charged gradzip's bytes. gradzip is charged its whole .grz
streams, container frames included.
"""
from __future__ import annotations

import io

import numpy as np
import pytest

from gradzip import Compressor, Decompressor
from gradzip.api import describe_stream
from gradzip.tensorio import read_tensors

# pysz is the `bench` extra, which `make install` installs; without it this claim is untested,
# so a missing pysz is an error here, not a skip.
from pysz import sz, szConfig, szErrorBoundMode

LOSSY_MIN = 1025


def sz3_bytes(array: np.ndarray, abs_bound: float) -> int:
    conf = szConfig()
    conf.errorBoundMode = szErrorBoundMode.ABS
    conf.absErrorBound = abs_bound
    data = np.ascontiguousarray(array)
    compressed, _ = sz.compress(data, conf)
    restored = sz.decompress(compressed, data.dtype, data.shape)
    restored = restored[0] if isinstance(restored, tuple) else restored
    # The comparison is only fair if SZ3 really meets the same bound.
    assert np.max(np.abs(np.asarray(restored, np.float64).reshape(data.shape) - data.astype(np.float64))) <= abs_bound * (1 + 1e-6)
    return int(compressed.nbytes)


@pytest.mark.parametrize("rel", [1e-3, 1e-2])
def test_ratio_is_at_least_sz3_on_sample_data(gz, sample_rounds, rel):
    c, d = Compressor(rel, "rel"), Decompressor()
    original = gradzip_total = sz3_total = 0
    lossy_tensors = 0
    for path in sample_rounds:
        tensors, fmt, metadata = read_tensors(path.read_bytes())
        blob = c.compress(tensors, source_format=fmt, metadata=metadata)
        restored = d.decompress(blob)
        gradzip_total += len(blob)
        original += sum(a.nbytes for a in tensors.values())
        for record in describe_stream(io.BytesIO(blob), len(blob)).tensors:
            array = tensors[record.name]
            bound = gz.absolute_bound(array, rel, "rel")
            if array.dtype.kind == "f" and bound > 0:
                gz.assert_within_bound(array, restored[record.name], rel, "rel", record.name)
                if array.size >= LOSSY_MIN:
                    sz3_total += sz3_bytes(array, bound)
                    lossy_tensors += 1
                else:
                    sz3_total += min(sz3_bytes(array, bound), array.nbytes)
            else:
                sz3_total += record.compressed_bytes
    assert lossy_tensors >= len(sample_rounds), "sample_data should hold lossy-sized tensors"
    ratio, sz3_ratio = original / gradzip_total, original / sz3_total
    assert gradzip_total <= sz3_total, (f"rel {rel}: gradzip {gradzip_total} B (ratio {ratio:.3f}) vs "
                                        f"SZ3 {sz3_total} B (ratio {sz3_ratio:.3f})")
