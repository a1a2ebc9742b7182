"""`gradzip bench`: the CLI, its JSON, skipped methods, and the promise that every method is
compared at the same per-tensor absolute bound."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradzip.bench import methods as bench_methods
from gradzip.bench import runner as bench_runner
from gradzip.bench.commtime import comm_time, parse_bandwidth, parse_bandwidths
from gradzip.bench.runner import BenchConfig, BenchError, Round, run_bench, tensor_bounds
from gradzip.cli import main

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
ERROR_BOUNDED = [name for name, m in bench_methods.METHODS.items() if m.error_bounded]


def synthetic_rounds(n_rounds: int = 3, seed: int = 0, dtype=np.float32) -> list[Round]:
    """Gradient-like rounds: persistent magnitudes and mostly persistent signs, plus noise."""
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (16, 8, 3, 3), "fc.weight": (10, 300), "fc.bias": (10,), "bn.weight": (16,),
              "five_d": (2, 3, 4, 5, 6)}
    base = {k: rng.standard_normal(s) for k, s in shapes.items()}
    rounds = []
    for r in range(n_rounds):
        tensors = {}
        for k, s in shapes.items():
            flip = np.where(rng.random(s) < 0.8, 1.0, -1.0)
            tensors[k] = (base[k] * flip * 1e-2 * 0.9 ** r + 3e-3 * rng.standard_normal(s)).astype(dtype)
        tensors["steps"] = np.array([r, 2 * r], np.int64)  # non-float: stored exactly by every method
        rounds.append(Round(f"synthetic round {r}", tensors))
    return rounds


@pytest.fixture
def two_rounds(tmp_path) -> list[str]:
    """The first two sample_data rounds, or synthetic ones where sample_data is absent."""
    sample = sorted(SAMPLE.glob("round_*.safetensors"))[:2]
    if len(sample) == 2:
        return [str(p) for p in sample]
    from safetensors.numpy import save_file

    paths = []
    for i, r in enumerate(synthetic_rounds(2)):
        path = tmp_path / f"round_{i:03d}.safetensors"
        save_file(r.tensors, str(path))
        paths.append(str(path))
    return paths


def _invoke(args):
    result = CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)
    return result


def _quick(**kwargs) -> BenchConfig:
    return BenchConfig(repeats=1, memory=False, **kwargs)


# ---------------------------------------------------------------- CLI and JSON


def test_cli_on_two_sample_rounds(two_rounds, tmp_path):
    out = tmp_path / "bench.json"
    args = [*two_rounds, "-e", "1e-2", "-e", "1e-3", "--repeats", "1", "--json", str(out), "--bandwidth", "1Mbit/s,100Mbit/s"]
    plot = None
    try:
        import matplotlib  # noqa: F401

        plot = tmp_path / "bench.png"
        args += ["--plot", str(plot)]
    except ImportError:
        pass
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "error bound rel 0.01" in result.stderr and "error bound rel 0.001" in result.stderr
    assert "communication time per round" in result.stderr
    assert "gradzip" in result.stderr
    data = json.loads(out.read_text())
    assert [e["error_bound"] for e in data["results"]] == [1e-2, 1e-3]
    assert data["inputs"] == two_rounds
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_schema(data: dict, n_rounds: int, n_bandwidths: int) -> None:
    assert data["schema"] == bench_runner.SCHEMA
    for key in ("environment", "inputs", "mode", "error_bounds", "bandwidths_bit_per_s", "settings", "data", "methods",
                "skipped", "results"):
        assert key in data, key
    assert data["settings"]["memory"] in ("rss", "tracemalloc", None)
    assert data["data"]["rounds"] == n_rounds == len(data["inputs"])
    for skipped in data["skipped"]:
        assert set(skipped) == {"method", "reason"} and skipped["reason"]
    ran = [m["method"] for m in data["methods"]]
    number = (int, float)
    for entry in data["results"]:
        assert isinstance(entry["error_bound"], float)
        assert list(entry["methods"]) == ran
        for tensor_bounds_per_round in entry["bounds"].values():
            assert len(tensor_bounds_per_round) == n_rounds
        for name, r in entry["methods"].items():
            assert r["method"] == name
            for key in ("original_bytes", "compressed_bytes", "over_bound"):
                assert isinstance(r[key], int) and r[key] >= 0, key
            for key in ("ratio", "bits_per_value", "compress_seconds", "decompress_seconds", "compress_mb_s",
                        "decompress_mb_s", "max_abs_error", "max_error_over_eb", "nrmse"):
                assert isinstance(r[key], number) and r[key] >= 0, (name, key)
            assert r["psnr"] is None or isinstance(r["psnr"], number)  # None: exact
            assert r["ratio"] == pytest.approx(r["original_bytes"] / r["compressed_bytes"])
            assert r["peak_memory_bytes"] is None or isinstance(r["peak_memory_bytes"], int)
            assert isinstance(r["error_bounded"], bool)
            assert len(r["rounds"]) == n_rounds
            assert sum(x["compressed_bytes"] for x in r["rounds"]) == r["compressed_bytes"]
            for x in r["rounds"]:
                for key in ("round", "original_bytes", "compressed_bytes", "ratio", "bits_per_value",
                            "compress_seconds", "decompress_seconds", "max_abs_error", "over_bound"):
                    assert isinstance(x[key], number), key
            for sizes in r["tensor_bytes"].values():
                assert len(sizes) == n_rounds
            assert len(r["comm_time"]) == n_bandwidths
            for c in r["comm_time"]:
                assert c["total_seconds"] == pytest.approx(c["compress_seconds"] + c["transfer_seconds"] + c["decompress_seconds"])
                assert c["reduction"] == pytest.approx(1 - c["total_seconds"] / c["raw_seconds"])
            if r["family"] == "gradzip":
                g = r["gradzip"]
                for key in ("rans_code_bytes", "rans_ideal_code_bytes", "container_bytes", "state_bytes", "predictors", "coders"):
                    assert key in g
            assert r["warmup_seconds"] is None or r["warmup_seconds"] >= 0


def test_json_schema(two_rounds, tmp_path):
    out = tmp_path / "bench.json"
    result = _invoke([*two_rounds, "-e", "1e-3", "--repeats", "1", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(out.read_text())  # strict JSON: no NaN or Infinity
    _check_schema(data, n_rounds=2, n_bandwidths=3)
    assert data["results"][0]["methods"]["gradzip"]["warmup_seconds"] is not None


def test_json_to_stdout(two_rounds):
    result = _invoke([*two_rounds[:1], "--methods", "gradzip,zstd", "--repeats", "1", "--no-memory", "--json", "-", "-q"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert list(data["results"][0]["methods"]) == ["gradzip", "zstd"]


@pytest.mark.parametrize("module, methods", [("pysz", ["sz3", "sz3-1d", "sz3-nopred"]), ("zfpy", ["zfp"])])
def test_missing_package_skips_its_methods(two_rounds, tmp_path, monkeypatch, module, methods):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    out = tmp_path / "bench.json"
    result = _invoke([*two_rounds, "--methods", ",".join(["gradzip", *methods]), "--repeats", "1", "--no-memory",
                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [s["method"] for s in data["skipped"]] == methods
    assert all(module in s["reason"] for s in data["skipped"])
    assert list(data["results"][0]["methods"]) == ["gradzip"]
    assert data["results"][0]["methods"]["gradzip"]["ratio_vs_sz3"] is None
    for name in methods:
        assert f"skipped {name}" in result.stderr


def test_cli_user_errors(two_rounds, tmp_path):
    for args, message in [([*two_rounds, "--methods", "nosuch"], "unknown method"),
                          ([*two_rounds, "--bandwidth", "fast"], "bad bandwidth"),
                          ([*two_rounds, "-e", "2"], "below 1"),
                          ([str(tmp_path / "missing.safetensors")], "no such file"),
                          ([*two_rounds, "--plot", str(tmp_path / "x.jpg")], "PNG"),
                          ([*two_rounds, "--json", two_rounds[1]], "refusing to overwrite an input"),
                          ([*two_rounds, "--plot", str(tmp_path / "no" / "where.png")], "directory does not exist"),
                          ([*two_rounds, "--json", str(tmp_path)], "is a directory")]:
        before = [Path(p).read_bytes() for p in two_rounds]
        result = _invoke(args)
        assert result.exit_code != 0
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert [Path(p).read_bytes() for p in two_rounds] == before


def test_report_paths_are_checked_before_the_bench_runs(two_rounds, tmp_path, monkeypatch):
    """A report that cannot be written is refused up front, not after minutes of timing."""
    ran = []
    monkeypatch.setattr(bench_runner, "run_bench", lambda *a, **k: ran.append(1))
    result = _invoke([*two_rounds, "--json", str(tmp_path / "missing" / "b.json")])
    assert result.exit_code != 0 and "directory does not exist" in result.stderr
    assert ran == []


def test_a_round_equal_to_the_one_before_is_benched_like_any_other(two_rounds):
    """(a frozen layer's update repeats exactly): gradzip's compressor refuses a repeated
    input by default, which ended the whole bench with an option it does not have."""
    result = _invoke([two_rounds[0], two_rounds[0], "--methods", "gradzip,zstd", "--repeats", "1", "--json", "-", "-q"])
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout)["results"][0]["methods"]["gradzip"]
    assert figures["over_bound"] == 0 and figures["ratio"] > 1


# ---------------------------------------------------------------- honest figures


def test_sz3_sizes_equal_pysz_called_directly():
    pysz = pytest.importorskip("pysz")
    rounds = synthetic_rounds(2)
    eb_rel = 1e-3
    data = run_bench(rounds, _quick(error_bounds=(eb_rel,), methods=("sz3", "sz3-1d", "sz3-nopred")))
    results = data["results"][0]["methods"]
    limit = data["settings"]["lossy_limit"]
    import zstandard

    from gradzip.lossless import DEFAULT_LEVEL

    for method, flatten, nopred in [("sz3", False, False), ("sz3-1d", True, False), ("sz3-nopred", False, True)]:
        for i, r in enumerate(rounds):
            expected = 0
            small = b""
            for name, array in r.tensors.items():
                if array.dtype.kind != "f":
                    small += np.ascontiguousarray(array).tobytes()  # little-endian here
                    continue
                values = array.reshape(-1) if flatten else array
                if values.ndim > 4:
                    values = values.reshape((-1,) + values.shape[-3:])
                conf = pysz.szConfig(values.shape)
                conf.errorBoundMode = pysz.szErrorBoundMode.ABS
                eb = data["results"][0]["bounds"][name][i]
                exact = eb_rel * (float(array.max()) - float(array.min()))
                assert exact * (1 - 1e-5) <= eb <= exact  # gradzip's bound, rounded down to 6 digits
                conf.absErrorBound = eb
                if nopred:
                    conf.cmprAlgo = pysz.szAlgorithm.NOPRED
                compressed, ratio = pysz.sz.compress(np.ascontiguousarray(values), conf)
                if array.size <= limit and compressed.size >= array.nbytes:
                    small += np.ascontiguousarray(array).tobytes()  # a small tensor SZ3 cannot shrink
                    continue
                assert results[method]["tensor_bytes"][name][i] == compressed.size, (method, name, i)
                assert array.nbytes / compressed.size == pytest.approx(ratio)
                expected += compressed.size
            # the other small tensors share one zstd frame (or stay raw)
            bundle = zstandard.ZstdCompressor(level=DEFAULT_LEVEL).compress(small)
            expected += min(len(bundle), len(small))
            assert results[method]["rounds"][i]["compressed_bytes"] == expected, (method, i)


@pytest.mark.parametrize("mode, eb", [("rel", 1e-2), ("rel", 1e-4), ("abs", 1e-4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_error_bounded_methods_never_exceed_the_bound(mode, eb, dtype):
    rounds = synthetic_rounds(3, seed=1, dtype=dtype)
    data = run_bench(rounds, _quick(error_bounds=(eb,), mode=mode))
    ran = data["results"][0]["methods"]
    assert set(ERROR_BOUNDED) - {s["method"] for s in data["skipped"]} <= set(ran)
    for name, r in ran.items():
        if r["error_bounded"]:
            assert r["over_bound"] == 0, name
            assert r["max_error_over_eb"] <= 1.0, name
        assert r["compressed_bytes"] > 0


def test_every_method_gets_the_same_absolute_bound(monkeypatch):
    rounds = synthetic_rounds(3, seed=2)
    seen: dict[str, list[dict]] = {}
    original_check = bench_runner._check_bounds

    def spy(method, packed, bounds, label):
        seen.setdefault(method.name, []).append((dict(packed.used_bounds), dict(bounds)))
        return original_check(method, packed, bounds, label)

    monkeypatch.setattr(bench_runner, "_check_bounds", spy)
    rel = 1e-3
    data = run_bench(rounds, _quick(error_bounds=(rel,)))
    limit = data["settings"]["lossy_limit"]
    ran = list(data["results"][0]["methods"])
    assert set(seen) == set(ran)
    for i, r in enumerate(rounds):
        reference = seen[ran[0]][i][1]
        for name, array in r.tensors.items():
            if array.dtype.kind == "f":  # the bound is the tensor's range times rel
                exact = rel * (float(array.max()) - float(array.min()))
                assert exact * (1 - 1e-5) <= reference[name] <= exact  # rounded down to 6 digits
        for method in ran:
            used, bounds = seen[method][i]
            assert bounds == reference, method  # every method was handed the same bounds
            for name, array in r.tensors.items():
                lossy = array.dtype.kind == "f" and reference[name] > 0
                if method == "zstd" or not lossy:
                    assert used[name] == 0.0, (method, name)
                elif method.startswith("gradzip") or array.size <= limit:
                    assert used[name] in (reference[name], 0.0), (method, name)  # 0: kept exact
                else:
                    assert used[name] == reference[name], (method, name)
    assert data["results"][0]["bounds"]["fc.weight"] == [seen[ran[0]][i][1]["fc.weight"] for i in range(len(rounds))]


def test_a_method_at_another_bound_is_refused(monkeypatch):
    pytest.importorskip("pysz")

    class Loose(bench_methods.SZ3Session):  # codes at twice the bound it derives
        def coding_bounds(self, tensors, bounds):
            return {k: 2 * v for k, v in super().coding_bounds(tensors, bounds).items()}

    method = bench_methods.METHODS["sz3"]
    monkeypatch.setitem(bench_methods.METHODS, "sz3",
                        bench_methods.Method("sz3", method.label, method.family, True, method.description, method.requires,
                                             lambda mode, eb, limit, seed: Loose(limit, seed, mode, eb)))
    with pytest.raises(BenchError, match="different bounds"):
        run_bench(synthetic_rounds(2), _quick(error_bounds=(1e-3,), methods=("sz3",)))


@pytest.mark.parametrize("name", ["sz3", "zfp"])
def test_a_baseline_derives_its_bounds_in_its_own_call(name):
    """An error-bounded baseline computes each tensor's bound inside its (timed) compression,
    as gradzip does: handed no bounds, it codes at the bench's."""
    method = bench_methods.METHODS[name]
    pytest.importorskip(method.requires[0])
    r = synthetic_rounds(1)[0]
    reference = tensor_bounds(r.tensors, "rel", 1e-3)
    packed = method.make("rel", 1e-3, 1024, 0).compress(r.tensors, {})
    lossy = {k for k, v in packed.used_bounds.items() if v != 0.0}
    assert lossy and all(packed.used_bounds[k] == reference[k] for k in lossy)


def test_bounds_are_gradzips_own():
    """In rel mode the bench uses exactly the bound gradzip computes (same function, same values)."""
    from gradzip import Compressor

    r = synthetic_rounds(1)[0]
    bounds = tensor_bounds(r.tensors, "rel", 1e-3)
    compressor = Compressor(1e-3, "rel")
    compressor.compress(r.tensors)
    for t in compressor.last_report.tensors:
        if t.method == "quantized":
            assert t.eb == bounds[t.name]


def test_qsgd_is_reported_with_its_real_error():
    rounds = synthetic_rounds(2)
    data = run_bench(rounds, _quick(error_bounds=(1e-4,), methods=("qsgd",)))
    q = data["results"][0]["methods"]["qsgd"]
    assert not q["error_bounded"]
    assert q["max_abs_error"] > 0 and q["psnr"] is not None
    # s = 255 levels of the max-norm: the error is below one level step of the largest tensor.
    step = max(np.abs(a).max() for r in rounds for a in r.tensors.values() if a.dtype.kind == "f") / 255
    assert q["max_abs_error"] <= step * (1 + 1e-6)


def test_stateful_repeats_give_the_same_sizes():
    rounds = synthetic_rounds(3)
    once = run_bench(rounds, _quick(error_bounds=(1e-3,), methods=("gradzip",)))
    thrice = run_bench(rounds, BenchConfig(error_bounds=(1e-3,), methods=("gradzip",), repeats=3, memory=False))
    a = once["results"][0]["methods"]["gradzip"]
    b = thrice["results"][0]["methods"]["gradzip"]
    assert [x["compressed_bytes"] for x in a["rounds"]] == [x["compressed_bytes"] for x in b["rounds"]]


def test_methods_timed_runs_alternate_and_each_keeps_its_own_state(monkeypatch):
    """Round by round, every method's k-th timed compression comes before any method's
    (k+1)-th (likewise decompressions), so a slow spell of the machine falls on all of them;
    and running beside the others changes no method's streams (each restores its own state)."""
    rounds = synthetic_rounds(3, seed=4)
    calls: list[tuple[str, str]] = []
    original_make = {name: m.make for name, m in bench_methods.METHODS.items()}

    def spying(name):
        def make(*args):
            session = original_make[name](*args)
            compress, decompress = session.compress, session.decompress
            session.compress = lambda *a: (calls.append(("c", name)), compress(*a))[1]
            session.decompress = lambda *a: (calls.append(("d", name)), decompress(*a))[1]
            return session
        return make

    for name in ("gradzip", "gradzip-nopred", "zstd"):
        m = bench_methods.METHODS[name]
        monkeypatch.setitem(bench_methods.METHODS, name, bench_methods.Method(
            m.name, m.label, m.family, m.error_bounded, m.description, m.requires, spying(name)))
    names = ("gradzip", "gradzip-nopred", "zstd")
    together = run_bench(rounds, BenchConfig(error_bounds=(1e-3,), methods=names, repeats=3, memory=False))
    # after the warm-ups (4 calls a method), per round: 3 x (one compression each), 3 x (one decompression each)
    timed = calls[4 * len(names):]
    per_round = 6 * len(names)
    assert len(timed) == len(rounds) * per_round
    for i in range(len(rounds)):
        block = timed[i * per_round:(i + 1) * per_round]
        assert block == [(kind, name) for kind in "cd" for _ in range(3) for name in names], block
    for name in names:
        alone = run_bench(rounds, _quick(error_bounds=(1e-3,), methods=(name,)))
        sizes = [x["compressed_bytes"] for x in alone["results"][0]["methods"][name]["rounds"]]
        assert sizes == [x["compressed_bytes"] for x in together["results"][0]["methods"][name]["rounds"]], name


# ---------------------------------------------------------------- communication-time model


def test_bandwidths():
    assert parse_bandwidths("1Mbit/s,10Mbit/s,100Mbit/s") == [1e6, 1e7, 1e8]
    assert parse_bandwidth("10 Mbps") == 1e7
    assert parse_bandwidth("5MB/s") == 4e7
    assert parse_bandwidth("1.5Gbit/s") == 1.5e9
    for bad in ("fast", "10", "-1Mbit/s", "0bit/s"):
        with pytest.raises(ValueError):
            parse_bandwidth(bad)


def test_comm_time_model():
    c = comm_time(compress_seconds=2.0, decompress_seconds=1.0, compressed_bytes=1_000_000, original_bytes=10_000_000,
                  rounds=10, bandwidth=8e6)
    assert c["raw_seconds"] == pytest.approx(1.0)  # 1 MB per round at 1 MB/s
    assert c["transfer_seconds"] == pytest.approx(0.1)
    assert c["total_seconds"] == pytest.approx(0.4)
    assert c["reduction"] == pytest.approx(0.6)


def test_a_memory_pass_that_fails_in_its_process_is_a_bench_error(tmp_path):
    """The memory pass runs in a child process: its failure must surface as one BenchError
    naming the method and the child's last error line, not as a bad number."""
    job = tmp_path / "job.pickle"
    job.write_bytes(b"not a pickle")
    method = bench_methods.resolve(("zstd",))[0]
    with pytest.raises(BenchError, match=r"^method 'zstd': the memory pass failed in its own process: .*UnpicklingError"):
        bench_runner._memory_in_fresh_process(method, str(job), "rss", 1e-3)


def test_memory_falls_back_to_tracemalloc(monkeypatch):
    class NoProc:
        available = False

    monkeypatch.setattr(bench_runner, "_PeakMemory", NoProc)
    data = run_bench(synthetic_rounds(2), BenchConfig(error_bounds=(1e-3,), methods=("gradzip", "zstd"), repeats=1))
    assert data["settings"]["memory"] == "tracemalloc"
    for r in data["results"][0]["methods"].values():
        assert r["peak_memory_bytes"] > 0


def test_gradzip_threads_change_speed_not_bytes_and_coder_efficiency_is_reported():
    rounds = synthetic_rounds(3)
    data = run_bench(rounds, _quick(error_bounds=(1e-3,), methods=("gradzip", "gradzip-mt")))
    one, many = (data["results"][0]["methods"][m] for m in ("gradzip", "gradzip-mt"))
    assert [x["compressed_bytes"] for x in one["rounds"]] == [x["compressed_bytes"] for x in many["rounds"]]
    g = one["gradzip"]
    if g["rans_code_bytes"]:  # the tensors were rANS-coded: actual against ideal under gradzip's own model
        assert g["rans_ideal_code_bytes"] > 0
        assert -0.01 < g["coder_overhead"] < 0.5
    assert one["payload_bytes"] + one["framing_bytes"] == one["compressed_bytes"]
    assert 0 < one["framing_bytes"] < one["compressed_bytes"]


def test_the_blas_is_held_to_one_thread_over_the_whole_run(monkeypatch):
    """The runner holds numpy's BLAS to one thread around every method's timed calls (and the
    memory pass does too), so a single-threaded figure is one core's; gradzip's own calls no
    longer enter the limit each time (9 us a call that no other method paid)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen, entered = [], []
    compress = bench_methods.GradzipSession.compress
    limit = bench_methods.blas_one_thread

    def recording(self, tensors, bounds):
        seen.append(blas_threads())
        return compress(self, tensors, bounds)

    monkeypatch.setattr(bench_methods.GradzipSession, "compress", recording)
    monkeypatch.setattr(bench_runner, "blas_one_thread", lambda: entered.append(1) or limit())
    monkeypatch.setattr(bench_methods, "blas_one_thread", lambda: entered.append("per call") or limit())

    def blas_threads():  # numpy's (another test may have loaded torch's, which the bench never calls)
        return [pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                if pool["user_api"] == "blas" and "numpy" in pool["filepath"]]

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if max(blas_threads(), default=1) < 2:
            pytest.skip("numpy's BLAS runs one thread here whatever the limit: nothing to hold down")
        run_bench(synthetic_rounds(3), BenchConfig(error_bounds=(1e-2,), methods=("gradzip", "sz3"), repeats=2,
                                                   memory=False))
        assert max(blas_threads()) == 2  # released after the run
    assert entered == [1] and seen and all(counts and set(counts) == {1} for counts in seen)


def test_a_later_round_with_a_new_dtype_is_warmed_up_too():
    """The warm-up covered the first two rounds only: a tensor first seen as F64 in round 3
    charged its kernels' loading to whichever method was timed first on that round."""
    rounds = synthetic_rounds(4)
    rounds[2] = Round("round 2, F64", {**rounds[2].tensors, "extra": np.ones(2000, np.float64)})
    bounds = [tensor_bounds(r.tensors, "rel", 1e-3) for r in rounds]
    warmups = bench_runner._warmups(rounds, bounds)
    assert [[r.label for r in warm] for warm, _ in warmups] == [[rounds[0].label, rounds[1].label], [rounds[2].label] * 3]
    assert [len(b) for _, b in warmups] == [2, 3]


def test_compare_refuses_a_reconstruction_of_another_dtype():
    # A float32 result for an F64 tensor, or 2.7 for an int 2 (cast to int it read 2), passed.
    from gradzip.bench.runner import BenchError, compare

    with pytest.raises(BenchError, match="dtype"):
        compare(np.array([1.0, 2.0]), np.array([1.0, 2.0], np.float32), 0.1)
    with pytest.raises(BenchError, match="dtype"):
        compare(np.array([2, 3], np.int32), np.array([2.7, 3.0]), 0.1)
    assert compare(np.array([2, 3], np.int32), np.array([2, 4], np.int32), 0.1).over_bound == 1


def test_results_name_the_code_that_ran():
    from gradzip.bench.runner import environment

    env = environment()
    assert set(env) >= {"git_commit", "git_dirty", "started_utc"}
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
