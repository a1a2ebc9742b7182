"""Threads: which tensors split their kernels over the threads (api.kernel_threads), the
default thread count (the process's CPUs, a cgroup quota), and the bytes, which never depend
on the thread count."""
from __future__ import annotations

import math

import numpy as np
import pytest


def test_kernel_threads_split_only_a_tensor_that_dominates_its_round():
    from gradzip.api import kernel_threads

    assert kernel_threads(1 << 20, (1 << 20) + 5000, 2) == 2  # cnn5fc's FC layer: alone on the threads
    assert kernel_threads(1 << 18, 12 << 18, 2) == 1  # one of 12 equal layers: the layers share the threads
    assert kernel_threads(1 << 18, 2 << 18, 2) == 1  # two equal layers: one each
    assert kernel_threads(1 << 18, 3 << 18, 4) == 4
    assert kernel_threads(1 << 18, 0, 2) == 2  # a first round's decoder knows no sizes: every thread


def test_layers_on_the_threads_give_the_same_streams_as_one_thread(gz):
    """Several large layers in a round each run their kernels on one thread while a dominant
    one splits them (api.kernel_threads): streams, states and decoded tensors are the same on
    1, 2 and 3 threads."""
    import gradzip

    rng = np.random.default_rng(5)
    shapes = {"a": (512, 512), "b": (640, 512), "c": (96, 64), "big": (1024, 1536)}
    base = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    rounds = [{name: values * np.float32(0.8) + rng.standard_normal(values.shape).astype(np.float32) * np.float32(0.3)
               for name, values in base.items()} for _ in range(3)]
    rounds[1].pop("big")  # without the dominant layer the encoder splits b (the decoder still counts big)
    outputs, decoded = [], []
    for threads in (1, 2, 3):
        compressor = gradzip.Compressor(1e-3, threads=threads)
        outputs.append([(compressor.compress(tensors), compressor.state.to_bytes()) for tensors in rounds])
        decompressor = gradzip.Decompressor(threads=threads)
        decoded.append([decompressor.decompress(blob) for blob, _ in outputs[threads - 1]])
        assert decompressor.state.to_bytes() == compressor.state.to_bytes()
    assert outputs[0] == outputs[1] == outputs[2]
    for tensors, *same in zip(rounds, *decoded):
        for name, values in tensors.items():
            assert all(np.array_equal(other[name], same[0][name]) for other in same[1:])
            gz.assert_within_bound(values, same[0][name], 1e-3, "rel")


def test_thread_counts_are_checked_and_default_to_the_usable_cpus(monkeypatch):
    import os

    import gradzip
    import gradzip.parallel
    from gradzip.errors import InputError

    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(InputError, match="threads"):
            gradzip.Compressor(threads=bad)
        with pytest.raises(InputError, match="threads"):
            gradzip.Decompressor(threads=bad)
    assert gradzip.Compressor(threads=np.int64(3)).threads == gradzip.Decompressor(threads=3).threads == 3
    if hasattr(os, "sched_getaffinity"):  # a CPU set (taskset, a container) counts, not the machine's CPUs
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
        monkeypatch.setattr(gradzip.parallel, "cgroup_cpu_quota", lambda: None)  # (whatever this machine's is)
        for auto in (None, 0):
            assert gradzip.Compressor(threads=auto).threads == gradzip.Decompressor(threads=auto).threads == 3


@pytest.mark.parametrize("cgroups, files, expected", [
    ("0::/kubepods/pod1\n", {"kubepods/pod1/cpu.max": "150000 100000\n"}, 1.5),  # v2, the process's own cgroup
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),  # v2 in a cgroup namespace
    ("0::/a\n", {"a/cpu.max": "max 100000\n"}, None),  # no quota
    ("4:cpu,cpuacct:/docker/c1\n1:name=systemd:/\n",
     {"cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/c1/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
    ("4:cpu,cpuacct:/docker/c1\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/a\n", {"a/cpu.max": "garbage\n"}, None),
    ("0::/a\n", {}, None),  # no cgroup file system
])
def test_a_cgroup_cpu_quota_caps_the_default_thread_count(tmp_path, monkeypatch, cgroups, files, expected):
    import os

    from gradzip import parallel

    (tmp_path / "self_cgroup").write_text(cgroups)
    for relative, text in files.items():
        (tmp_path / "fs" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / relative).write_text(text)
    quota = parallel.cgroup_cpu_quota(str(tmp_path / "fs"), str(tmp_path / "self_cgroup"))
    assert quota == expected
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
        monkeypatch.setattr(parallel, "cgroup_cpu_quota", lambda: quota)
        assert parallel.available_cpus() == (8 if expected is None else max(1, math.ceil(expected)))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_codes_on_threads_after_its_parent_did():
    """A process forked after gradzip ran on threads (multiprocessing's default start method
    on Linux) has none of the parent's pool threads: its own threaded compression and
    decoding must still finish, with the parent's bytes and tensors (a task queued to the
    parent's pool hung there for good)."""
    import os
    import signal
    import time

    import gradzip

    rng = np.random.default_rng(3)
    # a dominant layer large enough to split its rANS segments and passes over the threads
    tensors = {"w": rng.standard_normal((640, 1024)).astype(np.float32), "b": rng.standard_normal(64).astype(np.float32)}
    blob = gradzip.Compressor(1e-3, threads=2).compress(tensors)
    expected = gradzip.Decompressor(threads=2).decompress(blob)["w"]
    pid = os.fork()
    if pid == 0:  # the child's exit status says whether it coded the same
        try:
            same_blob = gradzip.Compressor(1e-3, threads=2).compress(tensors) == blob
            same_tensor = np.array_equal(gradzip.Decompressor(threads=2).decompress(blob)["w"], expected)
            os._exit(0 if same_blob and same_tensor else 3)
        except BaseException:
            os._exit(4)
    deadline = time.monotonic() + 120  # a hung child fails the test instead of the run
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on its threads")
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0, done[1]
