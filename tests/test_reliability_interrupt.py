"""Interrupting real `gradzip` processes (SIGKILL, SIGINT) mid-run, and two processes on one
state: the state file is always a valid state equal to the state after a whole number of
rounds, every output that exists is complete, and nothing half-written is left behind."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from gradzip import Compressor, Decompressor
from gradzip.state import PredictorState, load_state, locked
from gradzip.tensorio import read_tensors

N_ROUNDS = 24
ELEMENTS = 300_000  # per big tensor: each round takes long enough to be interrupted mid-run
POLL = 0.002


@pytest.fixture(scope="module")
def sequence(gz, tmp_path_factory):
    """Input files, and the reference streams and states (after k rounds) from the API."""
    root = tmp_path_factory.mktemp("interrupt")
    rng = np.random.default_rng(81)
    base = rng.normal(size=ELEMENTS).astype(np.float32)
    conv = rng.normal(size=(64, 64, 3, 3)).astype(np.float32)
    files = []
    for r in range(N_ROUNDS):
        tensors = {"big": base * np.float32(1 + 0.05 * r) + 0.01 * rng.normal(size=ELEMENTS).astype(np.float32),
                   "conv": conv * np.float32(1 - 0.02 * r), "step": np.array(r, np.int64)}
        files.append(gz.write_safetensors(root / f"round_{r:03d}.safetensors", tensors))
    c = Compressor(1e-3, "rel")
    states, streams = [c.state.to_bytes()], []
    for path in files:
        tensors, fmt, metadata = read_tensors(path.read_bytes())
        streams.append(c.compress(tensors, source_format=fmt, metadata=metadata))
        states.append(c.state.to_bytes())
    stream_dir = root / "streams"
    stream_dir.mkdir()
    stream_files = []
    for path, blob in zip(files, streams):
        (stream_dir / f"{path.name}.grz").write_bytes(blob)
        stream_files.append(stream_dir / f"{path.name}.grz")
    return files, streams, states, stream_files


def _as_in_a_terminal() -> None:
    # A job started in the background of a non-interactive shell (as CI may run us) inherits
    # SIGINT ignored; a user's Ctrl-C reaches a foreground process, so restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(gz, *args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen(gz.command() + [str(a) for a in args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_as_in_a_terminal)


def interrupt_after(proc: subprocess.Popen, out: Path, pattern: str, n_outputs: int, sig: int, extra_delay: float) -> str:
    """Send sig once n_outputs files matching pattern exist (plus a delay); return stderr."""
    deadline = time.monotonic() + 300
    while len(list(out.glob(pattern))) < n_outputs:
        assert proc.poll() is None, f"gradzip ended before it could be interrupted: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "gradzip produced no output in time"
        time.sleep(POLL)
    time.sleep(extra_delay)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return stderr.decode("utf-8", "replace")


def check_leftovers(directory: Path, expected: set[str], allow_temporary: bool) -> None:
    """Only expected names, lock files and (after SIGKILL only) hidden temporary files."""
    for path in directory.iterdir():
        name = path.name
        if name in expected or name.endswith(".lock"):
            continue
        if allow_temporary and name.startswith(".") and name.endswith(".tmp"):
            continue  # SIGKILL cannot be cleaned up after; hidden, and never taken for an output
        pytest.fail(f"unexpected file left behind: {name}")


@pytest.mark.parametrize("sig,n_outputs,extra_delay", [(signal.SIGKILL, 1, 0.0), (signal.SIGKILL, 3, 0.037),
                                                       (signal.SIGINT, 2, 0.011)], ids=["SIGKILL-1", "SIGKILL-3", "SIGINT"])
def test_interrupted_compress_leaves_a_whole_round_state(gz, sequence, tmp_path, sig, n_outputs, extra_delay):
    files, streams, states, _ = sequence
    out = tmp_path / "out"
    state_path = tmp_path / "c.state"
    proc = start(gz, "compress", *files, "-s", state_path, "-o", out, "-q")
    stderr = interrupt_after(proc, out, "*.grz", n_outputs, sig, extra_delay)
    assert proc.returncode != 0, "the run was not interrupted"
    if sig == signal.SIGINT:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert "Traceback" not in stderr, stderr
        assert len(lines) == 1 and lines[0].startswith("gradzip:"), stderr

    state = load_state(state_path)  # valid (checksummed) or absent (= fresh)
    k = state.round
    assert state.to_bytes() == states[k], f"the state is not the state after {k} whole rounds"
    outputs = sorted(p.name for p in out.glob("*.grz"))
    expected = [f"{p.name}.grz" for p in files]
    # Each round writes its output, then the state: at most one output is ahead of the state.
    assert outputs in (expected[:k], expected[: k + 1]), (k, outputs)
    for i, name in enumerate(outputs):
        assert (out / name).read_bytes() == streams[i], f"{name} is not complete"
    check_leftovers(out, set(outputs), allow_temporary=sig == signal.SIGKILL)
    check_leftovers(tmp_path, {"out", "c.state"}, allow_temporary=sig == signal.SIGKILL)

    if sig == signal.SIGINT:
        return
    # The state carries on from where it stopped.
    gz.assert_cli_ok(gz.run("compress", files[k], "-s", state_path, "-o", out / f"{files[k].name}.grz", "--force", "-q"))
    assert state_path.read_bytes() == states[k + 1]
    assert (out / f"{files[k].name}.grz").read_bytes() == streams[k]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_decompress_leaves_a_whole_round_state(gz, sequence, tmp_path, sig):
    files, _, states, stream_files = sequence
    out = tmp_path / "out"
    state_path = tmp_path / "d.state"
    proc = start(gz, "decompress", *stream_files, "-s", state_path, "-o", out, "-q")
    stderr = interrupt_after(proc, out, "*.safetensors", 2, sig, 0.011)
    assert proc.returncode != 0, "the run was not interrupted"
    if sig == signal.SIGINT:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert "Traceback" not in stderr, stderr
        assert len(lines) == 1 and lines[0].startswith("gradzip:"), stderr
    state = load_state(state_path)
    k = state.round
    assert state.to_bytes() == states[k]
    outputs = sorted(p.name for p in out.glob("*.safetensors"))
    expected = [p.name for p in files]
    assert outputs in (expected[:k], expected[: k + 1]), (k, outputs)
    d = Decompressor()
    for i, name in enumerate(outputs):
        restored, _, _ = read_tensors((out / name).read_bytes())  # complete and parseable
        original, _, _ = read_tensors(files[i].read_bytes())
        assert list(restored) == list(original)
        decoded = d.decompress(stream_files[i].read_bytes())
        for tensor in decoded:
            gz.assert_bit_exact(decoded[tensor], restored[tensor], f"{name}:{tensor}")
    check_leftovers(out, set(outputs), allow_temporary=sig == signal.SIGKILL)


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_a_state_in_use_is_refused(gz, sequence, tmp_path, command):
    """Another process holds the state's lock: the CLI fails at once and clearly, touching nothing."""
    files, _, states, stream_files = sequence
    state_path = tmp_path / "s.state"
    state_path.write_bytes(states[1])
    source = files[1] if command == "compress" else stream_files[1]
    with locked(state_path):
        before = gz.tree_snapshot(tmp_path)
        result = gz.run(command, source, "-s", state_path, "-o", tmp_path / "out.bin", timeout=120)
        after = gz.tree_snapshot(tmp_path)
    gz.assert_cli_error(result, "in use")
    assert after == before
    if command == "compress":
        gz.assert_cli_ok(gz.run(command, source, "-s", state_path, "-o", tmp_path / "out.bin", "-q"))  # free again
        assert state_path.read_bytes() == states[2]


def test_two_processes_on_one_state_never_interleave(gz, sequence, tmp_path):
    """Two compress runs started together on one state: one may fail, and the state is the
    state after whole runs, never a mix."""
    files, streams, states, _ = sequence
    state_path = tmp_path / "c.state"
    procs = [start(gz, "compress", *files[:3], "-s", state_path, "-o", tmp_path / f"out{i}", "-q") for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    ok = [rc == 0 for rc, _ in results]
    for rc, stderr in results:
        assert "Traceback" not in stderr, stderr
        if rc != 0:
            assert stderr.strip().startswith("gradzip: error:"), stderr
    final = PredictorState.from_bytes(state_path.read_bytes())
    if all(ok):  # run one after the other: the second saw round 3 and continued from it
        assert final.round == 6
    else:
        assert sum(ok) == 1
        assert state_path.read_bytes() == states[3]
        winner = ok.index(True)
        assert [(tmp_path / f"out{winner}" / f"{p.name}.grz").read_bytes() for p in files[:3]] == streams[:3]
