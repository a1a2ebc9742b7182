"""User mistakes and bad files on the command line: exactly one line on stderr starting with
'gradzip: error:', a non-zero exit code, no traceback, no partial output, and the state file
unchanged (only an empty '<state>.lock' may appear)."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from gradzip import Compressor
from gradzip.container import StreamReader
from gradzip.state import PredictorState, save_state
from gradzip.tensorio import read_tensors


@pytest.fixture(scope="module")
def base(gz, tmp_path_factory):
    """r0/r1.safetensors, their streams, the client state after both, the server state after r0."""
    root = tmp_path_factory.mktemp("cli_errors")
    c = Compressor(1e-3, "rel")
    for r, tensors in enumerate(gz.make_rounds(2, seed=71)):
        path = gz.write_safetensors(root / f"r{r}.safetensors", tensors)
        loaded, fmt, metadata = read_tensors(path.read_bytes())
        (root / f"r{r}.safetensors.grz").write_bytes(c.compress(loaded, source_format=fmt, metadata=metadata))
        if r == 0:
            save_state(c.state, root / "d.state")
            (root / "c0.state").write_bytes(c.state.to_bytes())
    save_state(c.state, root / "c.state")
    (root / "notes.txt").write_text("these are not tensors\n")
    (root / "subdir").mkdir()
    return root


@pytest.fixture
def ws(base, tmp_path):
    work = tmp_path / "ws"
    shutil.copytree(base, work)
    return work


def unchanged(gz, ws: Path, before: dict) -> None:
    after = gz.tree_snapshot(ws)
    new = {name for name in set(after) - set(before)}
    assert all(name.endswith(".lock") and after[name] == b"" for name in new), f"new files: {sorted(new)}"
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed or vanished"


def fails_cleanly(gz, ws: Path, *args, fragments=(), **kwargs) -> str:
    before = gz.tree_snapshot(ws)
    line = gz.assert_cli_error(gz.run(*args, cwd=ws, **kwargs), *fragments)
    unchanged(gz, ws, before)
    return line


# ----------------------------------------------------------------------------- bad inputs


def test_missing_input_file(gz, ws):
    fails_cleanly(gz, ws, "compress", "absent.safetensors", "-s", "c.state", fragments=["absent.safetensors"])


def test_directory_as_input(gz, ws):
    fails_cleanly(gz, ws, "decompress", "subdir", "-s", "d.state", "-o", "out.bin", fragments=["subdir"])


NOT_TENSORS = {"text": b"these are not tensors\n", "empty": b"", "zeros": b"\x00" * 100, "json": b'{"a": 1}',
               "bad-npy": b"\x93NUMPY garbage", "bad-zip": b"PK\x03\x04 not a zip",
               "safetensors-list-header": struct.pack("<Q", 2) + b"[]",
               "safetensors-huge-header": struct.pack("<Q", 2**62) + b"{}",
               "safetensors-bad-offsets": struct.pack("<Q", 56) + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}} ' + bytes(16)}


@pytest.mark.parametrize("kind", ["text", "bad-zip"])
def test_non_tensor_file(gz, ws, kind):
    """Also: the --json summary is not written when the run fails."""
    (ws / "bad.safetensors").write_bytes(NOT_TENSORS[kind])
    fails_cleanly(gz, ws, "compress", "bad.safetensors", "-s", "c.state", "--json", "summary.json",
                  fragments=["bad.safetensors"])


def test_non_tensor_files_raise_input_errors(gz, tmp_path):
    """The same reader the CLI uses, on more kinds of junk (in-process: one process per case is slow)."""
    from gradzip import InputError

    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    complete = gz.write_safetensors(tmp_path / "whole.safetensors", {"w": np.arange(10.0)}).read_bytes()
    kinds = {**NOT_TENSORS, "pickled-npy": objects.getvalue(), "truncated-safetensors": complete[:-8],
             "complex-npy": _npy(np.zeros(3, np.complex64)), "string-npy": _npy(np.array(["a", "b"]))}
    for kind, content in kinds.items():
        with pytest.raises(InputError, match="junk"):
            read_tensors(content, "junk")


def _npy(array) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_duplicate_tensor_names_in_a_safetensors_header(gz, ws):
    raw = struct.pack("<4f", 1, 2, 3, 4)
    header = ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              '"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}').encode()
    header += b" " * (-len(header) % 8)
    (ws / "dup.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw)
    fails_cleanly(gz, ws, "compress", "dup.safetensors", "-s", "c.state", fragments=["dup.safetensors", "duplicate"])


def test_unreadable_file(gz, ws):
    path = ws / "r1.safetensors"
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip(f"running as uid {os.geteuid()}, chmod 000 does not stop reading")
        fails_cleanly(gz, ws, "compress", "r1.safetensors", "-s", "c.state", "-o", "x.grz",
                      fragments=["r1.safetensors", "permission"])
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("bound,mode", [("-1e-3", "rel"), ("nan", "abs"), ("inf", "rel")])
def test_bad_error_bound(gz, ws, bound, mode):
    fails_cleanly(gz, ws, "compress", "r1.safetensors", "-s", "c0.state", "-o", "x.grz", "-m", mode, "-e", bound,
                  fragments=["bound"])


def test_error_bound_that_is_not_a_number(gz, ws):
    fails_cleanly(gz, ws, "compress", "r1.safetensors", "-s", "c0.state", "-o", "x.grz", "-e", "tiny")


@pytest.mark.parametrize("command", ["compress", "decompress"])
@pytest.mark.parametrize("threads", ["-2", "two", "1.5"])
def test_bad_thread_count(gz, ws, command, threads):
    source = "r1.safetensors" if command == "compress" else "r1.safetensors.grz"
    fails_cleanly(gz, ws, command, source, "-s", "c0.state", "-o", "x.out", "-j", threads, fragments=["threads"])


def test_state_path_that_is_a_directory(gz, ws):
    fails_cleanly(gz, ws, "decompress", "r1.safetensors.grz", "-s", "subdir", "-o", "x.out", fragments=["subdir"])


def test_several_inputs_to_stdout_are_refused(gz, ws):
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "r1.safetensors", "-s", "fresh.state", "-o", "-")


def test_output_into_a_missing_directory(gz, ws):
    fails_cleanly(gz, ws, "compress", "r1.safetensors", "-s", "c0.state", "-o", "nowhere/x.grz", fragments=["nowhere"])


@pytest.mark.parametrize("command, state", [("compress", "c.state"), ("decompress", "d.state")])
def test_a_failed_run_leaves_no_output_directory(gz, ws, command, state):
    """-o DIR/ makes DIR (and its missing parents), but a run that fails before writing into
    it removes them again: no empty directories are left behind."""
    fails_cleanly(gz, ws, command, "notes.txt", "-s", state, "-o", "made/deeper/", fragments=["notes.txt"])
    assert not (ws / "made").exists()


def test_a_run_failing_on_its_second_input_keeps_the_first_output(gz, ws):
    gz.assert_cli_error(gz.run("compress", "r1.safetensors", "notes.txt", "-s", "c0.state", "-o", "made/", cwd=ws),
                        "notes.txt")
    assert sorted(p.name for p in (ws / "made").iterdir()) == ["r1.safetensors.grz"]  # (and the state advanced for it)


def test_a_state_in_a_missing_directory(gz, ws):
    """A state's directory is not made (a mistyped one would start a new client's state);
    one that -o makes first is there."""
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "-s", "nowhere/c.state", "-o", "out.grz",
                  fragments=["nowhere", "does not exist"])
    gz.assert_cli_ok(gz.run("compress", "r0.safetensors", "-s", "new/c.state", "-o", "new/", "-q", cwd=ws))
    assert (ws / "new" / "c.state").exists() and (ws / "new" / "r0.safetensors.grz").exists()


def test_full_disk_on_stdout(gz, ws):
    """Writing the stream fails (ENOSPC): one line, and the state does not advance."""
    before = gz.tree_snapshot(ws)
    with open("/dev/full", "wb") as full:
        result = gz.run("compress", "r1.safetensors", "-s", "c0.state", "-o", "-", cwd=ws, stdout=full)
    gz.assert_cli_error(result, "space")
    unchanged(gz, ws, before)


# ----------------------------------------------------------------------------- bad streams and states


def test_truncated_stream(gz, ws):
    data = (ws / "r0.safetensors.grz").read_bytes()
    (ws / "cut.grz").write_bytes(data[: len(data) // 2])
    fails_cleanly(gz, ws, "decompress", "cut.grz", "-s", "fresh.state", "-o", "out.safetensors", fragments=["cut.grz"])


def test_damaged_payload_names_the_file_and_the_tensor(gz, ws):
    data = bytearray((ws / "r0.safetensors.grz").read_bytes())
    source = io.BytesIO(bytes(data))
    reader = StreamReader(source, len(data))
    reader.header()
    victim, payload_end = max(((record["name"], source.tell() - 4) for record, payload in reader.records()
                               if "name" in record and len(payload) > 100), key=lambda item: item[1])
    data[payload_end - 50] ^= 0x40  # inside the last big record's payload
    (ws / "bad.grz").write_bytes(bytes(data))
    fails_cleanly(gz, ws, "decompress", "bad.grz", "-s", "fresh.state", "-o", "out.safetensors",
                  fragments=["bad.grz", victim])
    fails_cleanly(gz, ws, "stats", "bad.grz", fragments=["bad.grz"])


def test_damaged_header_is_one_clean_line(gz, ws):
    """A flip in the format version, through the CLI (every flip is covered in-process by
    test_reliability_streams)."""
    data = (ws / "r0.safetensors.grz").read_bytes()
    for position in (9,):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        (ws / "bad.grz").write_bytes(bytes(damaged))
        fails_cleanly(gz, ws, "decompress", "bad.grz", "-s", "fresh.state", "-o", "out.safetensors", fragments=["bad.grz"])
        (ws / "bad.grz").unlink()


def test_not_a_stream(gz, ws):
    fails_cleanly(gz, ws, "decompress", "r0.safetensors", "-s", "fresh.state", "-o", "out.safetensors",
                  fragments=["r0.safetensors"])


def test_missing_state_for_a_later_round(gz, ws):
    line = fails_cleanly(gz, ws, "decompress", "r1.safetensors.grz", "-s", "fresh.state", "-o", "out.safetensors",
                         fragments=["r1.safetensors.grz", "round 1", "round 0"])
    assert PredictorState().digest() in line
    assert not (ws / "fresh.state").exists()


def test_newer_state_refuses_an_old_round(gz, ws):
    state = PredictorState.from_bytes((ws / "d.state").read_bytes())
    line = fails_cleanly(gz, ws, "decompress", "r0.safetensors.grz", "-s", "d.state", "-o", "out.safetensors",
                         fragments=["round 0", "round 1"])
    assert state.digest() in line


def test_foreign_state_is_refused(gz, ws):
    other = Compressor(1e-3, "rel")
    other.compress(gz.make_rounds(1, seed=72)[0])
    save_state(other.state, ws / "other.state")
    fails_cleanly(gz, ws, "decompress", "r1.safetensors.grz", "-s", "other.state", "-o", "out.safetensors",
                  fragments=["round 1", other.state.digest()])


def test_corrupted_state_file(gz, ws):
    data = bytearray((ws / "d.state").read_bytes())
    data[len(data) // 2] ^= 0x01
    (ws / "d.state").write_bytes(bytes(data))
    fails_cleanly(gz, ws, "decompress", "r1.safetensors.grz", "-s", "d.state", "-o", "out.bin", fragments=["d.state"])


def test_stats_of_a_later_round_against_its_original_asks_for_the_state(gz, ws):
    """Without -s a later round cannot be decoded: stats says to pass the state (decompress's
    hint, to decode the earlier rounds first, would send the user the wrong way)."""
    line = fails_cleanly(gz, ws, "stats", "r1.safetensors.grz", "--original", "r1.safetensors",
                         fragments=["r1.safetensors.grz", "-s"])
    assert "earlier rounds" not in line


def test_stats_with_an_original_that_does_not_match(gz, ws):
    fails_cleanly(gz, ws, "stats", "r0.safetensors.grz", "--original", "notes.txt", fragments=["notes.txt"])


# ----------------------------------------------------------------------------- rounds out of order


def test_compressing_the_same_round_twice_is_refused(gz, ws):
    """r1 again on a state that already holds r1 would desynchronize the receiver."""
    fails_cleanly(gz, ws, "compress", "r1.safetensors", "-s", "c.state", "-o", "again.grz", fragments=["r1.safetensors"])


def test_repeat_can_be_allowed_explicitly(gz, ws):
    gz.assert_cli_ok(gz.run("compress", "r1.safetensors", "-s", "c.state", "-o", "again.grz", "--allow-repeat", "-q", cwd=ws))
    assert PredictorState.from_bytes((ws / "c.state").read_bytes()).round == 3


def test_round_option_catches_a_skipped_round(gz, ws):
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "-s", "c.state", "-o", "x.grz", "--round", "3",
                  fragments=["round 2"])


def test_failure_in_the_middle_keeps_the_completed_rounds(gz, ws):
    """Inputs r0, bad, r1: r0's output is complete and the state is exactly 'after r0'."""
    (ws / "bad.safetensors").write_bytes(b"junk")
    out = ws / "out"
    line = gz.assert_cli_error(gz.run("compress", "r0.safetensors", "bad.safetensors", "r1.safetensors",
                                      "-s", "new.state", "-o", "out", cwd=ws), "bad.safetensors")
    assert "Traceback" not in line
    assert sorted(p.name for p in out.iterdir()) == ["r0.safetensors.grz"]
    assert (out / "r0.safetensors.grz").read_bytes() == (ws / "r0.safetensors.grz").read_bytes()
    assert (ws / "new.state").read_bytes() == (ws / "c0.state").read_bytes()
    assert not [p for p in ws.rglob("*.tmp")]


# ----------------------------------------------------- outputs that would destroy another file
# (found by a black-box review: each of these exited 0 and lost the stream or the state)


@pytest.mark.parametrize("command, args", [("compress", ["r0.safetensors", "-s", "fresh.state", "-o", "fresh.state"]),
                                           ("compress", ["r0.safetensors", "-s", "c0.state", "-o", "c0.state", "-f"]),
                                           ("decompress", ["r0.safetensors.grz", "-s", "d.state", "-o", "d.state", "-f"])])
def test_output_that_is_the_state_file_is_refused(gz, ws, command, args):
    fails_cleanly(gz, ws, command, *args, fragments=["state"])


@pytest.mark.parametrize("target, extra", [("notes.txt", []), ("r1.safetensors.grz", ["-f"]), ("c0.state", ["-f"]),
                                           ("r1.safetensors", ["-f"]), ("subdir", ["-f"])])
def test_json_summary_never_overwrites_an_input_an_output_the_state_or_an_existing_file(gz, ws, target, extra):
    """--json is an output like -o's: an existing file needs --force, and the state, an input
    or an output of the same run never."""
    fails_cleanly(gz, ws, "compress", "r1.safetensors", "-s", "c0.state", "-o", "r1.safetensors.grz", "--json", target,
                  *extra)


def test_json_summary_may_replace_an_old_summary_with_force(gz, ws):
    (ws / "summary.json").write_text("old")
    result = gz.run("compress", "r1.safetensors", "-s", "c0.state", "-o", "r1.safetensors.grz", "-f", "--json",
                    "summary.json", "-q", cwd=ws)
    assert result.returncode == 0, result.stderr
    assert json.loads((ws / "summary.json").read_text())[0]["output"].endswith("r1.safetensors.grz")


def test_metadata_over_the_frame_limit_is_refused_before_anything_is_written(gz, ws):
    """The stream format caps a frame's JSON at 16 MiB; compress wrote such a header and
    advanced its state, and every decoder then refused the stream."""
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3000, np.float32)}, str(ws / "big_metadata.safetensors"), metadata={"note": "x" * (17 << 20)})
    fails_cleanly(gz, ws, "compress", "big_metadata.safetensors", "-s", "c0.state", "-o", "big.grz",
                  fragments=["limit"])


@pytest.mark.parametrize("member", ["README", "a.npy"])
def test_npz_member_that_is_not_an_npy_array(gz, ws, member):
    import zipfile

    with zipfile.ZipFile(ws / "mixed.npz", "w") as archive:
        good = io.BytesIO()
        np.save(good, np.ones(3000, np.float32))
        archive.writestr("b.npy", good.getvalue())
        archive.writestr(member, b"not an array")
    fails_cleanly(gz, ws, "compress", "mixed.npz", "-s", "fresh.state", "-o", "mixed.grz", fragments=["not a .npy"])


@pytest.mark.filterwarnings("ignore:Duplicate name")  # (zipfile warns while the test builds the archive)
def test_npz_with_a_member_twice(gz, ws):
    import zipfile

    with zipfile.ZipFile(ws / "dup.npz", "w") as archive:
        for value in (1.0, 2.0):
            data = io.BytesIO()
            np.save(data, np.full(3000, value, np.float32))
            archive.writestr("a.npy", data.getvalue())
    fails_cleanly(gz, ws, "compress", "dup.npz", "-s", "fresh.state", "-o", "dup.grz", fragments=["twice"])


SAFETENSORS_AGAINST_THE_SPEC = {
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),
    "gap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),
    "trailing-bytes": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12),
    "float-shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8),
    "metadata-not-strings": ({"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_AGAINST_THE_SPEC))
def test_safetensors_files_the_format_forbids_are_refused(gz, ws, case):
    """The safetensors library refuses these: overlapping buffers, gaps, trailing bytes, a
    non-integer shape, non-string metadata (they would have been compressed in part, or come
    back changed)."""
    header, body = SAFETENSORS_AGAINST_THE_SPEC[case]
    text = json.dumps(header).encode()
    (ws / "odd.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(body))
    fails_cleanly(gz, ws, "compress", "odd.safetensors", "-s", "fresh.state", "-o", "odd.grz")


# ----------------------------------------------------------------------------- names and fields from a stream


def _npz_bytes(tensors: dict) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:  # (np.savez cannot take these names: see tensorio._write_npz)
        for name, array in tensors.items():
            with archive.open(name + ".npy", "w") as member:
                np.lib.format.write_array(member, array)
    return out.getvalue()


def test_stats_shows_tensor_names_that_look_like_rich_markup_as_they_are(gz, tmp_path):
    """Tensor names (and file names) are shown literally: "a[/]b" used to end stats in a
    rich MarkupError traceback, and "x[red]y" lost its brackets."""
    rng = np.random.default_rng(5)
    names = ["a[/]b", "x[red]y", "conv[0].weight"]
    tensors = {name: rng.normal(size=(48, 48)).astype(np.float32) for name in names}
    (tmp_path / "r[1].npz").write_bytes(_npz_bytes(tensors))
    (tmp_path / "out").mkdir()
    gz.assert_cli_ok(gz.run("compress", "r[1].npz", "-s", "c.state", "-o", "out", cwd=tmp_path))
    stream = tmp_path / "out" / "r[1].npz.grz"
    wide = {"COLUMNS": "200"}
    result = gz.run("stats", stream, cwd=tmp_path, env=wide)
    gz.assert_cli_ok(result)
    shown = "".join((result.stdout.decode() + result.stderr).split())  # (rich wraps a long title)
    for name in names + ["r[1].npz.grz"]:
        assert name in shown, (name, shown)
    result = gz.run("stats", stream, "--original", "r[1].npz", cwd=tmp_path, env=wide)
    gz.assert_cli_ok(result)
    assert all(name in result.stdout.decode() + result.stderr for name in names)


@pytest.mark.parametrize("name", ["file", "allow_pickle", "__metadata__"])
def test_npz_tensor_names_that_numpy_or_safetensors_reserve_round_trip_through_npz(gz, tmp_path, name):
    """np.savez takes member names as keyword arguments: a tensor named `file` used to end
    decompress in a traceback, one named `allow_pickle` was silently left out."""
    rng = np.random.default_rng(6)
    tensors = {name: rng.normal(size=(40, 40)).astype(np.float32), "w": rng.normal(size=(8,)).astype(np.float32)}
    (tmp_path / "r.npz").write_bytes(_npz_bytes(tensors))
    gz.assert_cli_ok(gz.run("compress", "r.npz", "-s", "c.state", "-o", "r.npz.grz", "-q", cwd=tmp_path))
    gz.assert_cli_ok(gz.run("decompress", "r.npz.grz", "-s", "d.state", "-o", "back.npz", "-q", cwd=tmp_path))
    back, fmt, _ = read_tensors((tmp_path / "back.npz").read_bytes())
    assert fmt == "npz" and list(back) == list(tensors)
    for key, original in tensors.items():
        gz.assert_within_bound(original, back[key], 1e-3, "rel", key)


def test_a_tensor_named_like_safetensors_metadata_is_refused_as_safetensors_output(gz, tmp_path):
    """Its entry would be read back as the file's metadata: the file was unreadable (and real
    metadata overwritten). The error names the way out, and nothing is written."""
    rng = np.random.default_rng(7)
    (tmp_path / "r.npz").write_bytes(_npz_bytes({"__metadata__": rng.normal(size=(40, 40)).astype(np.float32)}))
    gz.assert_cli_ok(gz.run("compress", "r.npz", "-s", "c.state", "-o", "r.npz.grz", "-q", cwd=tmp_path))
    before = gz.tree_snapshot(tmp_path)
    gz.assert_cli_error(gz.run("decompress", "r.npz.grz", "-s", "d.state", "-o", "r.safetensors", "--format", "safetensors",
                               cwd=tmp_path), "__metadata__", "npz")
    after = gz.tree_snapshot(tmp_path)
    assert {k for k in after if not k.endswith(".lock")} == {k for k in before if not k.endswith(".lock")}


@pytest.mark.parametrize("field, value", [("eb", "0.001"), ("mean", "0.5"), ("std", "1"), ("eb", True), ("mean", float("nan"))])
def test_a_record_whose_numbers_are_not_json_numbers_is_refused(gz, tmp_path, monkeypatch, field, value):
    """The decoder read eb, mean and std with float(), so "0.001" as a JSON string decoded
    (and then ended `stats` in a traceback). They are the floats the encoder writes, or the
    stream is corrupt, for decompress and for stats alike."""
    from gradzip import CorruptStreamError, Decompressor, container
    from gradzip.container import join_stream, split_stream

    rng = np.random.default_rng(8)
    base = rng.normal(size=(48, 48)).astype(np.float32)
    rounds = [{"w": (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32)} for _ in range(4)]
    c = Compressor(1e-3, "rel", search_every=1)
    blobs = [c.compress(r) for r in rounds]
    d = Decompressor()
    for blob in blobs[:-1]:
        d.decompress(blob)
    header, records, trailer = split_stream(blobs[-1])
    params = records[0][0]["params"]
    if field != "eb":  # (written by `ema` and EMA-context records: this one made one of those)
        params.update(predictor="ema", signs="kernel", mean=0.5, std=1.0)
    params[field] = value
    # (a writer that lets NaN through, as JSON's NaN token, which json's reader accepts)
    monkeypatch.setattr(container, "_frame_json", json.JSONEncoder(separators=(",", ":")).encode)
    bad = join_stream(header, records, trailer)
    state = d.state
    with pytest.raises(CorruptStreamError, match="error bound" if field == "eb" else "magnitude statistics"):
        d.decompress(bad)
    assert d.state is state
    (tmp_path / "bad.grz").write_bytes(bad)
    if field == "eb":  # (stats without --original reads eb off the record; mean and std it does not show)
        gz.assert_cli_error(gz.run("stats", "bad.grz", cwd=tmp_path), "bad.grz")


# ----------------------------------------------------------------------------- what the user reads


def test_only_gradzips_own_warnings_reach_the_user(capsys):
    """A library's warnings (torch's deprecation notices while it loads a .pt file) made a
    one-line error three lines."""
    import warnings

    from gradzip import GradzipWarning, InputError
    from gradzip.cli import CliError, user_errors

    with pytest.raises(CliError) as info:
        with user_errors():
            warnings.warn("a library's notice", DeprecationWarning)
            warnings.warn("tensor 'w' changed shape", GradzipWarning)
            raise InputError("bad input")
    info.value.show()
    assert capsys.readouterr().err.splitlines() == ["gradzip: warning: tensor 'w' changed shape", "gradzip: error: bad input"]


def test_ctrl_c_while_writing_says_what_was_kept(capsys):
    """compress and decompress save the state after each output: after Ctrl-C the inputs
    before the one in progress are done (the message said the state was unchanged)."""
    from gradzip.cli import INTERRUPTED_WRITING, user_errors

    with pytest.raises(SystemExit) as info:
        with user_errors(INTERRUPTED_WRITING):
            raise KeyboardInterrupt
    assert info.value.code == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("gradzip: interrupted;") and "state saved" in line and "unchanged" not in line


@pytest.mark.parametrize("command", ["stats", "compress"])
def test_json_to_a_reader_that_stops_early_is_an_error(gz, tmp_path, command):
    """JSON on stdout goes through the same checked write as the streams: when the reader
    took 10 bytes of a long report and closed its end, these exited 0 with the rest lost
    (the write to the pipe came back short, and nothing checked it)."""
    import subprocess

    rng = np.random.default_rng(9)
    many = {f"layer{i:03d}.weight": rng.normal(size=(4, 4)).astype(np.float32) for i in range(600)}  # a long report
    gz.write_safetensors(tmp_path / "r.safetensors", many)
    gz.assert_cli_ok(gz.run("compress", "r.safetensors", "-s", "c.state", "-o", "r.grz", "-q", cwd=tmp_path))
    args = (["stats", "r.grz", "--json"] if command == "stats"
            else ["compress", "r.safetensors", "-s", "d.state", "-o", "x.grz", "--json", "-", "-q"])
    proc = subprocess.Popen(gz.command() + args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("gradzip: error:"), (proc.returncode, stderr)


# ---- from the user-level review of 2026-11-29 (each failed before its fix) ----

def test_a_missing_later_input_is_refused_before_any_round_is_written(gz, ws):
    # It used to surface after the earlier rounds were written and the state had advanced.
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "r1.safetensors", "typo.safetensors", "-s", "fresh.state",
                  "-o", "out/", fragments=("typo.safetensors", "no such file"))


def test_a_json_report_in_a_missing_directory_is_refused_before_any_round(gz, ws):
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "-s", "fresh.state", "-o", "r0.grz", "--json", "nodir/r.json",
                  fragments=("nodir/r.json", "directory"))


def test_force_refuses_to_renumber_rounds_the_state_has_passed(gz, ws):
    # Re-running a batch with -f wrote round 0's file as round 2: no receiver could decode it.
    gz.assert_cli_ok(gz.run("compress", "r0.safetensors", "r1.safetensors", "-s", "fresh.state", "-o", "out/", "-q", cwd=ws))
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "r1.safetensors", "-s", "fresh.state", "-o", "out/", "-f",
                  fragments=("holds round 0", "fresh state"))
    gz.assert_cli_ok(gz.run("compress", "r0.safetensors", "-s", "fresh.state", "-o", "out/r0.safetensors.grz", "-f", "-q",
                            "--round", "2", "--allow-repeat", cwd=ws))  # --round confirms a new round


def test_a_fifo_or_device_is_not_replaced_by_an_output(gz, ws):
    os.mkfifo(ws / "pipe")
    fails_cleanly(gz, ws, "compress", "r0.safetensors", "-s", "fresh.state", "-o", "pipe", "-f",
                  fragments=("pipe", "not a regular file"))
    assert stat.S_ISFIFO(os.stat(ws / "pipe").st_mode)


def test_a_replaced_state_keeps_its_permissions(gz, ws):
    gz.assert_cli_ok(gz.run("compress", "r0.safetensors", "-s", "fresh.state", "-o", "r0.grz", "-q", cwd=ws))
    os.chmod(ws / "fresh.state", 0o600)
    gz.assert_cli_ok(gz.run("compress", "r1.safetensors", "-s", "fresh.state", "-o", "r1.grz", "-q", cwd=ws))
    assert stat.S_IMODE(os.stat(ws / "fresh.state").st_mode) == 0o600


def test_stats_matches_an_original_saved_in_another_order(gz, ws):
    from gradzip.tensorio import write_tensors

    tensors, _, _ = read_tensors((ws / "r0.safetensors").read_bytes())
    reordered = dict(reversed(list(tensors.items())))  # (safetensors' own writer sorts the names)
    (ws / "reordered.safetensors").write_bytes(write_tensors(reordered, "safetensors"))
    assert list(read_tensors((ws / "reordered.safetensors").read_bytes())[0]) == list(reordered) != list(tensors)
    gz.assert_cli_ok(gz.run("stats", "r0.safetensors.grz", "--original", "reordered.safetensors", cwd=ws))


def test_npz_members_that_numpy_names_alike_are_refused(gz, ws):
    import io
    import zipfile

    with zipfile.ZipFile(ws / "dup.npz", "w") as archive:
        for name, value in (("a.npy", 1.0), ("a", 0.0)):
            buffer = io.BytesIO()
            np.save(buffer, np.full(2000, value, np.float32))
            archive.writestr(name, buffer.getvalue())
    fails_cleanly(gz, ws, "compress", "dup.npz", "-s", "fresh.state", "-o", "dup.grz", fragments=("'a'",))
