"""The gradzip command, run as separate processes: round trips of the real sample rounds with
byte-identical client and server states, pipelines through stdin/stdout, output naming, the
overwrite rules, output formats, and `gradzip stats` (table and JSON)."""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gradzip import Compressor
from gradzip.state import load_state

EB = 1e-3


def header_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file's header order (parsed here, independently)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    return [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]


def assert_restored(gz, original: Path, restored: Path, eb=EB, mode="rel") -> None:
    assert header_names(restored) == header_names(original)
    a, b = load_file(str(original)), load_file(str(restored))
    for name in a:
        if a[name].dtype.kind == "f":
            gz.assert_within_bound(a[name], b[name], eb, mode, f"{original.name}:{name}")
        else:
            gz.assert_bit_exact(a[name], b[name], f"{original.name}:{name}")


def api_streams(paths, eb=EB, mode="rel") -> tuple[list[bytes], list[bytes]]:
    """What `gradzip compress` writes for these inputs (the API is what the CLI runs; a test
    below checks they agree byte for byte), and the states after each round."""
    from gradzip.tensorio import read_tensors

    c = Compressor(eb, mode)
    streams, states = [], []
    for path in paths:
        tensors, fmt, metadata = read_tensors(Path(path).read_bytes())
        streams.append(c.compress(tensors, source_format=fmt, metadata=metadata))
        states.append(c.state.to_bytes())
    return streams, states


def synthetic_files(gz, directory: Path, n: int, seed: int = 61) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [gz.write_safetensors(directory / f"round_{r:03d}.safetensors", tensors)
            for r, tensors in enumerate(gz.make_rounds(n, seed=seed))]


# ----------------------------------------------------------------------------- sample round trips


def test_sample_rounds_round_trip_in_separate_processes(gz, sample_rounds, tmp_path):
    """Each round is compressed by one process and decompressed by another; after every round the
    client's and the server's state files are byte-identical."""
    rounds = sample_rounds[:3]
    for r, path in enumerate(rounds):
        grz = tmp_path / f"{path.name}.grz"
        gz.assert_cli_ok(gz.run("compress", path, "-s", tmp_path / "client.state", "-o", grz, "-q"))
        out = tmp_path / "restored" / path.name
        out.parent.mkdir(exist_ok=True)
        gz.assert_cli_ok(gz.run("decompress", grz, "-s", tmp_path / "server.state", "-o", out, "-q"))
        client, server = (tmp_path / "client.state").read_bytes(), (tmp_path / "server.state").read_bytes()
        assert client == server, f"states differ after round {r}"
        assert load_state(tmp_path / "client.state").round == r + 1
        assert_restored(gz, path, out)


@pytest.fixture(scope="module")
def directory_run(gz, sample_rounds, tmp_path_factory):
    """All sample rounds compressed with -o DIR by one process and decompressed by another
    (under umask 022)."""
    root = tmp_path_factory.mktemp("directory_run")
    out, restored = root / "grz", root / "restored"
    old_umask = os.umask(0o022)
    try:
        gz.assert_cli_ok(gz.run("compress", *sample_rounds, "-s", root / "c.state", "-o", out))
        streams = sorted(out.iterdir())
        gz.assert_cli_ok(gz.run("decompress", *streams, "-s", root / "d.state", "-o", restored))
    finally:
        os.umask(old_umask)
    return root, streams, restored


def test_all_sample_rounds_to_an_output_directory(gz, sample_rounds, directory_run):
    """Several inputs with -o DIR: one output per input named after it, states identical."""
    root, streams, restored = directory_run
    assert [p.name for p in streams] == [f"{p.name}.grz" for p in sample_rounds]
    assert sorted(p.name for p in restored.iterdir()) == [p.name for p in sample_rounds]
    assert (root / "c.state").read_bytes() == (root / "d.state").read_bytes()
    assert load_state(root / "c.state").round == len(sample_rounds)
    for path in sample_rounds:
        assert_restored(gz, path, restored / path.name)


def test_outputs_get_ordinary_file_permissions(sample_rounds, directory_run):
    """Outputs are created like any file (0666 minus the umask), not as private 0600 temporaries."""
    _, streams, restored = directory_run
    for output in (streams[0], restored / sample_rounds[0].name):
        mode = output.stat().st_mode & 0o777
        assert mode == 0o644, f"{output.name} has mode {oct(mode)} under umask 022"


def test_cli_streams_match_the_api(gz, sample_rounds, tmp_path):
    """The CLI is the API: same bytes as Compressor.compress on the same tensors and state."""
    from gradzip.tensorio import read_tensors

    out = tmp_path / "grz"
    gz.assert_cli_ok(gz.run("compress", *sample_rounds[:3], "-s", tmp_path / "c.state", "-o", out, "-q"))
    c = Compressor(EB, "rel")
    for path in sample_rounds[:3]:
        tensors, fmt, metadata = read_tensors(path.read_bytes())
        assert c.compress(tensors, source_format=fmt, metadata=metadata) == (out / f"{path.name}.grz").read_bytes()
    assert c.state.to_bytes() == (tmp_path / "c.state").read_bytes()


# ----------------------------------------------------------------------------- pipelines


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, timeout=300)


def test_shell_pipeline_through_stdin_and_stdout(gz, sample_rounds, tmp_path):
    """cat r | gradzip compress - -s c.state -o - > r.grz, and back with < r.grz > r.safetensors."""
    exe = " ".join(shlex.quote(part) for part in gz.command())
    streams, states = api_streams(sample_rounds[:2])
    for r, path in enumerate(sample_rounds[:2]):
        proc = shell(f"cat {shlex.quote(str(path))} | {exe} compress - -s c.state -o - > r{r}.grz", tmp_path)
        assert proc.returncode == 0, proc.stderr.decode()
        proc = shell(f"{exe} decompress - -s d.state -o - < r{r}.grz > r{r}.safetensors", tmp_path)
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"Traceback" not in proc.stderr
        assert_restored(gz, path, tmp_path / f"r{r}.safetensors")
        assert (tmp_path / "c.state").read_bytes() == (tmp_path / "d.state").read_bytes() == states[r]
        assert (tmp_path / f"r{r}.grz").read_bytes() == streams[r]  # the same bytes as from a named file
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == \
        ["c.state", "d.state", "r0.grz", "r0.safetensors", "r1.grz", "r1.safetensors"]


def test_stdout_output_carries_only_the_stream(gz, tmp_path):
    (path,) = synthetic_files(gz, tmp_path, 1)
    result = gz.run("compress", path, "-s", tmp_path / "c.state", "-o", "-")
    gz.assert_cli_ok(result)
    assert result.stdout == api_streams([path])[0][0]


# ----------------------------------------------------------------------------- naming and overwriting


def test_default_output_names_beside_the_inputs(gz, tmp_path):
    files = synthetic_files(gz, tmp_path / "in", 2)
    gz.assert_cli_ok(gz.run("compress", *files, "-s", tmp_path / "c.state", "-q"))
    streams = [Path(f"{p}.grz") for p in files]
    assert all(p.is_file() for p in streams)
    moved = tmp_path / "server"
    moved.mkdir()
    for p in streams:
        shutil.move(p, moved / p.name)
    gz.assert_cli_ok(gz.run("decompress", *(moved / p.name for p in streams), "-s", tmp_path / "d.state", "-q"))
    for p in files:
        assert_restored(gz, p, moved / p.name)


def test_existing_output_is_kept_without_force(gz, tmp_path):
    files = synthetic_files(gz, tmp_path, 2)
    target = tmp_path / "out.grz"
    target.write_bytes(b"precious")
    result = gz.run("compress", files[0], "-s", tmp_path / "c.state", "-o", target)
    gz.assert_cli_error(result, "out.grz", "exists")
    assert target.read_bytes() == b"precious"
    assert not (tmp_path / "c.state").exists()
    gz.assert_cli_ok(gz.run("compress", files[0], "-s", tmp_path / "c.state", "-o", target, "--force", "-q"))
    assert target.read_bytes().startswith(b"\x89GRZ")
    # Decompress too.
    restored = tmp_path / "restored.safetensors"
    restored.write_bytes(b"precious")
    gz.assert_cli_error(gz.run("decompress", target, "-s", tmp_path / "d.state", "-o", restored), "exists")
    assert restored.read_bytes() == b"precious"
    assert not (tmp_path / "d.state").exists()


def test_existing_output_in_a_directory_is_kept_without_force(gz, tmp_path):
    files = synthetic_files(gz, tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{files[1].name}.grz").write_bytes(b"precious")
    gz.assert_cli_error(gz.run("compress", *files, "-s", tmp_path / "c.state", "-o", out), "exists")
    assert sorted(p.name for p in out.iterdir()) == [f"{files[1].name}.grz"]  # checked before any work
    assert not (tmp_path / "c.state").exists()


def test_inputs_are_never_overwritten(gz, tmp_path):
    """Not even with --force, and not when the output names the input by another path."""
    (path,) = synthetic_files(gz, tmp_path, 1)
    original = path.read_bytes()
    (tmp_path / "sub").mkdir()
    alias = tmp_path / "sub" / ".." / path.name
    gz.assert_cli_error(gz.run("compress", path, "-s", tmp_path / "c.state", "-o", alias, "--force"), "input")
    assert path.read_bytes() == original
    assert not (tmp_path / "c.state").exists()
    stream = api_streams([path])[0][0]
    (tmp_path / "r.grz").write_bytes(stream)
    gz.assert_cli_error(gz.run("decompress", tmp_path / "r.grz", "-s", tmp_path / "d.state", "-o", tmp_path / "r.grz",
                               "--force"), "input")
    assert (tmp_path / "r.grz").read_bytes() == stream
    assert not (tmp_path / "d.state").exists()


# ----------------------------------------------------------------------------- formats


def test_npy_and_npz_inputs_come_back_in_their_format(gz, tmp_path):
    rng = np.random.default_rng(62)
    arrays = [rng.normal(size=(64, 40)).astype(np.float32) * (r + 1) for r in range(2)]
    for r, a in enumerate(arrays):
        np.save(tmp_path / f"g{r}.npy", a)
        np.savez(tmp_path / f"m{r}.npz", weight=a, bias=a[0, :5].copy(), step=np.array([r]))
    inputs = [tmp_path / name for name in ("g0.npy", "m0.npz", "g1.npy", "m1.npz")]
    gz.assert_cli_ok(gz.run("compress", *inputs, "-s", tmp_path / "c.state", "-q"))  # .grz beside each input
    out = tmp_path / "out"
    gz.assert_cli_ok(gz.run("decompress", *(f"{p}.grz" for p in inputs), "-s", tmp_path / "d.state", "-o", out, "-q"))
    assert (tmp_path / "c.state").read_bytes() == (tmp_path / "d.state").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["g0.npy", "g1.npy", "m0.npz", "m1.npz"]
    for r, a in enumerate(arrays):
        gz.assert_within_bound(a, np.load(out / f"g{r}.npy"), EB, "rel", f"g{r}")
        with np.load(out / f"m{r}.npz") as z:
            assert list(z.files) == ["weight", "bias", "step"]
            gz.assert_within_bound(a, z["weight"], EB, "rel", f"m{r}")
            gz.assert_bit_exact(a[0, :5], z["bias"])
            gz.assert_bit_exact(np.array([r]), z["step"])


def test_zero_dimensional_arrays_in_npy_and_npz_keep_their_shape(gz, tmp_path):
    scalar = np.array(2.5, np.float32)
    np.save(tmp_path / "s.npy", scalar)
    np.savez(tmp_path / "s.npz", s=scalar * 2, w=np.arange(6.0).reshape(2, 3))
    gz.assert_cli_ok(gz.run("compress", tmp_path / "s.npy", tmp_path / "s.npz", "-s", tmp_path / "c.state",
                            "-o", tmp_path / "grz", "-q"))
    gz.assert_cli_ok(gz.run("decompress", tmp_path / "grz" / "s.npy.grz", tmp_path / "grz" / "s.npz.grz",
                            "-s", tmp_path / "d.state", "-o", tmp_path / "out", "-q"))
    restored = np.load(tmp_path / "out" / "s.npy")
    with np.load(tmp_path / "out" / "s.npz") as z:
        restored_npz, w = z["s"], z["w"]
    assert w.shape == (2, 3)
    assert restored.shape == (), f"a 0-d .npy array came back with shape {restored.shape}"
    assert restored_npz.shape == (), f"a 0-d .npz member came back with shape {restored_npz.shape}"
    gz.assert_bit_exact(scalar, restored)
    gz.assert_bit_exact(scalar * 2, restored_npz)


def test_format_option_chooses_the_output_format(gz, tmp_path):
    rng = np.random.default_rng(63)
    a = rng.normal(size=(50, 50)).astype(np.float32)
    source = gz.write_safetensors(tmp_path / "one.safetensors", {"w": a})
    stream, state = (x[0] for x in api_streams([source]))
    grz = tmp_path / "one.safetensors.grz"
    grz.write_bytes(stream)
    for fmt in ("npy", "npz", "safetensors"):
        state_path = tmp_path / f"{fmt}.state"
        gz.assert_cli_ok(gz.run("decompress", grz, "-s", state_path, "--format", fmt, "-q",
                                *(["--force"] if fmt == "safetensors" else [])))
        assert state_path.read_bytes() == state
        out = tmp_path / f"one.{fmt}"  # named after the input, with the format's extension
        if fmt == "npy":
            restored = np.load(out)
        elif fmt == "npz":
            with np.load(out) as z:
                assert z.files == ["w"]
                restored = z["w"]
        else:
            assert header_names(out) == ["w"]
            restored = load_file(str(out))["w"]
        gz.assert_within_bound(a, restored, EB, "rel", fmt)


def test_npy_format_refuses_several_tensors_cleanly(gz, tmp_path):
    files = synthetic_files(gz, tmp_path, 1)
    (tmp_path / "r.grz").write_bytes(api_streams(files)[0][0])
    result = gz.run("decompress", tmp_path / "r.grz", "-s", tmp_path / "d.state", "--format", "npy",
                    "-o", tmp_path / "r.npy")
    gz.assert_cli_error(result, "npy")
    assert not (tmp_path / "r.npy").exists()
    assert not (tmp_path / "d.state").exists()


def test_bfloat16_round_trips_through_safetensors_only(gz, tmp_path):
    from gradzip.tensorio import write_tensors

    rng = np.random.default_rng(64)
    tensor = gz.bfloat16_from_float32(rng.normal(size=(40, 40)))
    (tmp_path / "b.safetensors").write_bytes(write_tensors({"w": tensor}, "safetensors"))
    (tmp_path / "b.safetensors.grz").write_bytes(api_streams([tmp_path / "b.safetensors"])[0][0])
    gz.assert_cli_ok(gz.run("decompress", tmp_path / "b.safetensors.grz", "-s", tmp_path / "d.state",
                            "-o", tmp_path / "r.safetensors", "-q"))
    data = (tmp_path / "r.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    entry = json.loads(data[8 : 8 + n])["w"]
    assert entry["dtype"] == "BF16" and entry["shape"] == [40, 40]
    begin, end = entry["data_offsets"]
    restored = gz.bfloat16_from_float32(np.zeros((40, 40), np.float32))  # a BF16 array to fill with the bits
    restored.view(np.uint16)[...] = np.frombuffer(data[8 + n + begin : 8 + n + end], "<u2").reshape(40, 40)
    gz.assert_within_bound(tensor, restored, EB, "rel", "bf16")
    result = gz.run("decompress", tmp_path / "b.safetensors.grz", "-s", tmp_path / "d2.state", "--format", "npy",
                    "-o", tmp_path / "r.npy")
    gz.assert_cli_error(result, "bfloat16")
    assert not (tmp_path / "r.npy").exists()


# ----------------------------------------------------------------------------- stats


def independent_figures(original: np.ndarray, restored: np.ndarray) -> dict:
    x, y = original.astype(np.float64).ravel(), restored.astype(np.float64).ravel()
    error = np.abs(x - y)
    value_range = float(x.max() - x.min())
    rmse = math.sqrt(float(np.mean(error**2)))
    return {"max_abs_error": float(error.max()), "rmse": rmse, "value_range": value_range,
            "psnr": 20 * math.log10(value_range / rmse) if rmse else math.inf,
            "nrmse": rmse / value_range if value_range else 0.0}


def test_stats_json_reports_sizes_and_errors_against_the_original(gz, sample_rounds, tmp_path):
    from gradzip import Decompressor

    rounds = sample_rounds[:2]
    streams, states = api_streams(rounds)
    d = Decompressor()
    restored_rounds = []
    for path, blob in zip(rounds, streams):
        (tmp_path / f"{path.name}.grz").write_bytes(blob)
        restored_rounds.append(d.decompress(blob))
    state_after_0 = states[0]
    (tmp_path / "after0.state").write_bytes(state_after_0)
    for r, path in enumerate(rounds):
        grz = tmp_path / f"{path.name}.grz"
        extra = ["-s", tmp_path / "after0.state"] if r else []
        result = gz.run("stats", grz, "--original", path, "--json", *extra)
        gz.assert_cli_ok(result)
        report = json.loads(result.stdout)
        assert (tmp_path / "after0.state").read_bytes() == state_after_0, "stats must not change the state"
        assert report["round"] == r
        assert [t["name"] for t in report["tensors"]] == header_names(path)
        original = load_file(str(path))
        restored = restored_rounds[r]
        total_original = 0
        for t in report["tensors"]:
            a = original[t["name"]]
            assert t["shape"] == list(a.shape)
            assert t["dtype"] in ("F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL")
            assert t["method"] in ("lossless", "quantized")
            assert t["original_bytes"] == a.nbytes
            assert t["compressed_bytes"] >= 0
            assert t["bits_per_value"] == pytest.approx(8 * t["compressed_bytes"] / max(a.size, 1))
            assert t["within_bound"] is True
            if t["method"] == "quantized":
                reference = gz.absolute_bound(a, EB, "rel")  # rounded down to 6 significant digits
                assert reference * (1 - 1e-5) <= t["eb"] <= reference
                figures = independent_figures(a, restored[t["name"]])
                assert t["max_abs_error"] == pytest.approx(figures["max_abs_error"], rel=1e-9, abs=1e-30)
                assert t["max_abs_error"] <= t["eb"]
                assert t["psnr"] == pytest.approx(figures["psnr"], rel=1e-6)
                assert t["nrmse"] == pytest.approx(figures["nrmse"], rel=1e-6)
            else:
                assert t["max_abs_error"] == 0
            total_original += a.nbytes
        total = report["total"]
        assert total["within_bound"] is True
        assert total["original_bytes"] == total_original
        assert total["compressed_bytes"] == grz.stat().st_size, "the total is the .grz file's size"
        assert total["ratio"] == pytest.approx(total_original / grz.stat().st_size)
        assert {"psnr", "nrmse", "max_abs_error", "bits_per_value"} <= set(total)


def test_stats_without_original_needs_no_state(gz, sample_rounds, tmp_path):
    grz = tmp_path / f"{sample_rounds[1].name}.grz"
    grz.write_bytes(api_streams(sample_rounds[:2])[0][1])
    result = gz.run("stats", grz, "--json")
    gz.assert_cli_ok(result)
    report = json.loads(result.stdout)
    assert report["round"] == 1
    assert "within_bound" not in report["total"]
    assert report["total"]["compressed_bytes"] == grz.stat().st_size
    table = gz.run("stats", grz)
    gz.assert_cli_ok(table)
    for name in header_names(sample_rounds[1]):
        assert name in table.stderr + table.stdout.decode()
    assert "total" in table.stderr + table.stdout.decode()


def test_stats_table_with_original_says_within_bound(gz, tmp_path):
    (path,) = synthetic_files(gz, tmp_path, 1)
    (tmp_path / "r.grz").write_bytes(api_streams([path])[0][0])
    result = gz.run("stats", tmp_path / "r.grz", "--original", path)
    gz.assert_cli_ok(result)
    text = result.stderr + result.stdout.decode()
    for column in ("bits/value", "ratio", "PSNR", "NRMSE", "within bound"):
        assert column in text, column
    assert "NO" not in text
    assert "yes" in text


def test_compress_summary_json(gz, tmp_path):
    files = synthetic_files(gz, tmp_path, 2)
    result = gz.run("compress", *files, "-s", tmp_path / "c.state", "-o", tmp_path / "out", "--json", "-", "-q")
    gz.assert_cli_ok(result)
    summary = json.loads(result.stdout)
    assert [row["round"] for row in summary] == [0, 1]
    for row, path in zip(summary, files):
        grz = tmp_path / "out" / f"{path.name}.grz"
        assert row["output"] == str(grz)
        assert row["compressed_bytes"] == grz.stat().st_size
        assert row["original_bytes"] == sum(a.nbytes for a in load_file(str(path)).values())
        assert row["max_abs_error"] <= max(gz.absolute_bound(a, EB, "rel") for a in load_file(str(path)).values()
                                           if a.dtype.kind == "f")
    assert (tmp_path / "c.state").read_bytes() == api_streams(files)[1][-1]
    assert [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []


# ----------------------------------------------------------------------------- determinism


def test_determinism_across_processes(gz, sample_rounds, tmp_path):
    """Same inputs and state in two separate processes (different hash seeds): identical bytes."""
    outputs = []
    for run, seed in enumerate(("1", "2")):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        result = gz.run("compress", *sample_rounds[:3], "-s", directory / "c.state", "-o", directory / "out", "-q",
                        env={"PYTHONHASHSEED": seed})
        gz.assert_cli_ok(result)
        outputs.append(gz.tree_snapshot(directory))
    assert outputs[0].keys() == outputs[1].keys()
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], f"{name} differs between runs"


def test_thread_count_changes_no_byte(gz, tmp_path):
    """`-j 1` and `-j 2` on rounds with layers large enough to split: the same streams, states
    and decoded files."""
    rng = np.random.default_rng(8)
    base = {"big": rng.standard_normal((768, 512)).astype(np.float32),
            "mid": rng.standard_normal((256, 320)).astype(np.float32)}
    inputs = [gz.write_safetensors(tmp_path / f"round_{r}.safetensors",
                                   {name: values + rng.standard_normal(values.shape).astype(np.float32) * np.float32(0.2)
                                    for name, values in base.items()})
              for r in range(3)]
    outputs = []
    for threads in ("1", "2"):
        directory = tmp_path / f"j{threads}"
        gz.assert_cli_ok(gz.run("compress", *inputs, "-s", directory / "c.state", "-o", directory, "-q", "-j", threads))
        streams = sorted(directory.glob("*.grz"))
        gz.assert_cli_ok(gz.run("decompress", *streams, "-s", directory / "d.state", "-o", directory / "out", "-q",
                                "-j", threads))
        assert (directory / "c.state").read_bytes() == (directory / "d.state").read_bytes()
        outputs.append(gz.tree_snapshot(directory))
    assert outputs[0] == outputs[1]
    assert len([name for name in outputs[0] if not name.endswith(".lock")]) == 3 + 2 + 3  # streams, states, rounds
    for path in inputs:
        assert_restored(gz, path, tmp_path / "j2" / "out" / path.name)


@pytest.mark.parametrize("option, expected", [([], None), (["-j", "3"], 3), (["--threads", "0"], None)])
def test_thread_option_reaches_the_coders(sample_rounds, tmp_path, monkeypatch, option, expected):
    """`-j N` is the count the Compressor and Decompressor run with; 0 and no option mean
    every usable CPU (the bytes test above cannot see the option ignored)."""
    from click.testing import CliRunner

    import gradzip.api
    from gradzip.cli import main
    from gradzip.parallel import available_cpus

    seen = []
    for name in ("Compressor", "Decompressor"):
        original = getattr(gradzip.api, name)

        class Recording(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen.append((type(self).__mro__[1].__name__, self.threads))

        monkeypatch.setattr(gradzip.api, name, Recording)
    runner = CliRunner()
    stream = tmp_path / "r.grz"
    result = runner.invoke(main, ["compress", str(sample_rounds[0]), "-s", str(tmp_path / "c.state"), "-o", str(stream),
                                  "-q", *option])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["decompress", str(stream), "-s", str(tmp_path / "d.state"), "-o",
                                  str(tmp_path / "r.safetensors"), "-q", *option])
    assert result.exit_code == 0, result.output
    count = expected or available_cpus()
    assert seen == [("Compressor", count), ("Decompressor", count)]


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("3", "3")])
def test_the_command_asks_for_one_openblas_thread_before_numpy_loads(preset, expected):
    """OpenBLAS's idle workers spin on the cores gradzip's threads use (gradzip/blas.py), and
    OpenBLAS reads its thread count when numpy loads: the command sets it first, unless the
    user did."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    probe = ("import sys; import gradzip; loaded_early = 'numpy' in sys.modules; import gradzip.cli, os, numpy; "
             "print(loaded_early, os.environ['OPENBLAS_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", expected]


@pytest.mark.parametrize("preset", [None, "4"])
def test_one_malloc_arena_asks_glibc_unless_the_user_chose(monkeypatch, preset):
    """Per-thread malloc arenas kept freed arrays resident per thread (gradzip/allocator.py):
    the command and the bench ask for one arena, unless MALLOC_ARENA_MAX says otherwise."""
    from gradzip import allocator

    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    if preset is None:
        monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    else:
        monkeypatch.setenv("MALLOC_ARENA_MAX", preset)
    allocator.one_malloc_arena()
    assert calls == ([(-8, 1)] if preset is None else [])


@pytest.mark.parametrize("existing", [True, False])
def test_a_single_input_into_a_directory(gz, tmp_path, existing):
    """-o naming an existing directory, or ending in '/', writes inside it for one input too
    (the README's `-o out/` for a next round failed with 'is a directory', and a missing
    'restored/' became a file)."""
    files = synthetic_files(gz, tmp_path / "in", 2)
    out, restored = tmp_path / "out", tmp_path / "restored"
    if existing:
        out.mkdir()
        restored.mkdir()
    gz.assert_cli_ok(gz.run("compress", files[0], "-s", tmp_path / "c.state", "-o", f"{out}/", "-q"))
    gz.assert_cli_ok(gz.run("compress", files[1], "-s", tmp_path / "c.state", "-o", out, "-q"))
    assert sorted(p.name for p in out.iterdir()) == [f"{files[0].name}.grz", f"{files[1].name}.grz"]
    for p in files:
        gz.assert_cli_ok(gz.run("decompress", out / f"{p.name}.grz", "-s", tmp_path / "d.state", "-o", f"{restored}/", "-q"))
        assert_restored(gz, p, restored / p.name)
    gz.assert_cli_error(gz.run("compress", "-", "-s", tmp_path / "e.state", "-o", f"{out}/", input=files[0].read_bytes()),
                        "stdin")


def test_a_reader_that_stops_midway_is_an_error_when_python_is_unbuffered(gz, tmp_path):
    """With PYTHONUNBUFFERED set (many container images), stdout is a raw file: a write to a
    pipe whose reader goes away after some of the data returns a short count. The CLI writes
    on and fails ('Broken pipe'), and the state stays where it was (it used to exit 0 with
    the state advanced and 64 KiB of the stream delivered)."""
    big = tmp_path / "big.safetensors"
    gz.write_safetensors(big, {"w": np.random.default_rng(3).standard_normal(200_000).astype(np.float32)})
    assert len(Compressor(EB, "rel").compress(load_file(str(big)))) > 1 << 17  # (more than a pipe holds)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(gz.command() + ["compress", str(big), "-s", str(tmp_path / "c.state"), "-o", "-", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1) == b"\x89"  # the stream has begun: the writer is now in its one big write
    time.sleep(0.5)  # (it fills the pipe and waits)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() != 0, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradzip: error:"), stderr
    assert not (tmp_path / "c.state").exists()
