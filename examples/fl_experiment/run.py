#!/usr/bin/env python
"""gradzip end to end: FedAvg through Flower's engine, uncompressed vs gradzip vs SZ3.

    python examples/fl_experiment/run.py                 # the full experiment (README numbers)
    python examples/fl_experiment/run.py --smoke         # 2 clients, 2 rounds, one configuration

It starts a Flower SuperLink on 127.0.0.1 (a free port, a private FLWR_HOME) and either
  - `--engine simulation`: the SuperLink's simulation runtime (needs ray, `flwr[simulation]`), or
  - `--engine deployment`: one SuperNode process per client, each running the ClientApp in its
    own processes, exactly as a real deployment does;
then submits the Flower app in app/ once per configuration with `flwr run`, reads the result
the ServerApp writes, and produces results.json, results.md and accuracy.png in --out.

Communication model, per client and round, on a link of B Mbit/s per client:

    upload time  = compress CPU time + reply bytes * 8 / B + the server's CPU time to decode that reply
    round trip   = upload time + broadcast bytes * 8 / B   (the broadcast is uncompressed in every
                                                             configuration, so it only dilutes)

averaged over all replies of all rounds.

Times are CPU seconds measured in the ClientApp and ServerApp (thread CPU time), so they do not
depend on how loaded the machine running the experiment is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP_DIR = HERE / "app"
BANDWIDTHS_MBIT = (1, 10, 100)
BOUNDS = (1e-2, 1e-3, 1e-4)


def configurations(names: str) -> list[dict]:
    all_configs = [{"name": "uncompressed", "codec": "none", "error-bound": 0.0}]
    for codec in ("gradzip", "sz3"):
        for eb in BOUNDS:
            all_configs.append({"name": f"{codec} rel {eb:g}", "codec": codec, "error-bound": eb})
    if names == "all":
        return all_configs
    wanted = [n.strip() for n in names.split(",")]
    chosen = [c for c in all_configs if c["name"].replace(" ", "-") in wanted or c["name"] in wanted]
    if len(chosen) != len(wanted):
        known = ", ".join(c["name"].replace(" ", "-") for c in all_configs)
        raise SystemExit(f"unknown configuration in {names!r}; known: {known}")
    return chosen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class Federation:
    """A SuperLink (and, for deployment, SuperNodes) on 127.0.0.1, stopped on exit."""

    def __init__(self, engine: str, clients: int, workdir: Path, verbose: bool):
        self.engine = engine
        self.clients = clients
        self.workdir = workdir
        self.verbose = verbose
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        bindir = Path(sys.executable).parent
        self.env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0",
                        FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
                        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2", PYTHONUNBUFFERED="1",
                        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
        options = ""
        if engine == "simulation":
            options = (f"options.num-supernodes = {clients}\n"
                       "options.backend.client-resources.num-cpus = 1\n"
                       f"options.backend.init-args.num-cpus = {max(1, min(clients, os.cpu_count() or 1))}\n")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "gzfl"\n\n[superlink.gzfl]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n{options}')

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        # Own session: stopping the group also stops the SuperExec and app processes it started.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                   start_new_session=True)
        self.processes.append(process)

    def start(self) -> None:
        link = ["flower-superlink", "--insecure", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.engine == "simulation":
            link.append("--simulation")
        self._spawn("superlink", link)
        self._wait_for_port(self.port, 60)
        if self.engine == "deployment":
            for i in range(self.clients):
                self._spawn(f"supernode-{i}", [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={self.clients}"])

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        raise RuntimeError(f"the SuperLink did not start; see {self.workdir / 'superlink.log'}")

    def run(self, run_config: dict, timeout: float) -> None:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        command = ["flwr", "run", str(APP_DIR), "gzfl", "--run-config", overrides, "--stream"]
        out = None if self.verbose else open(self.workdir / "flwr-run.log", "ab")
        subprocess.run(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=True)

    def stop(self) -> None:
        """Stop what this run started: the spawned processes and all their descendants (the
        SuperLink starts its SuperExec in a session of its own, which starts the app processes)."""
        pids = []
        for process in self.processes:
            pids += _descendants(process.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.time() + 15
            while time.time() < deadline and any(_alive(pid) for pid in pids):
                for process in self.processes:
                    process.poll()
                time.sleep(0.2)
            if not any(_alive(pid) for pid in pids):
                break
        for process in self.processes:
            process.poll()


def _descendants(root: int) -> list[int]:
    """root and every process below it (from `ps`), children first."""
    try:
        table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [root]
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        pid, ppid = (int(v) for v in line.split())
        children.setdefault(ppid, []).append(pid)
    order, stack = [], [root]
    while stack:
        pid = stack.pop()
        order.append(pid)
        stack.extend(children.get(pid, []))
    return order[::-1]


def _alive(pid: int) -> bool:
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is gone, just not reaped
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- analysis


def summarize(config: dict, raw: dict) -> dict:
    """Per-round bytes and times of one configuration, and its communication time per bandwidth."""
    rounds = sorted({r["round"] for r in raw["replies"]})
    accuracy = {int(k): v for k, v in raw["accuracy"].items()}
    per_round = []
    for rnd in rounds:
        replies = [r for r in raw["replies"] if r["round"] == rnd]
        entry = {"round": rnd, "accuracy": accuracy.get(rnd), "clients": len(replies),
                 "wire_bytes": sum(r["wire_bytes"] for r in replies),
                 "raw_bytes": sum(r["raw_bytes"] for r in replies),
                 "compress_seconds_max": max(r["compress_seconds"] for r in replies),
                 "decompress_seconds_total": sum(r["decompress_seconds"] for r in replies),
                 "resets": sum(bool(r["reset"]) for r in replies), "failures": sum(bool(r["failed"]) for r in replies)}
        for bandwidth in BANDWIDTHS_MBIT:
            bps = bandwidth * 1e6
            # per client: compress + transfer on its own link + the server decoding that reply
            upload = sum(r["compress_seconds"] + 8 * r["wire_bytes"] / bps + r["decompress_seconds"]
                         for r in replies) / len(replies)
            entry[f"upload_seconds@{bandwidth}"] = upload
            entry[f"round_trip_seconds@{bandwidth}"] = upload + 8 * raw["broadcast_bytes"] / bps
        per_round.append(entry)
    n = len(per_round)
    final_round = max(accuracy)
    last = [r for r in sorted(accuracy) if r > 0][-5:]
    summary = {
        "name": config["name"], "codec": config["codec"], "error_bound": config["error-bound"],
        "seed": int(raw["config"]["seed"]),
        "final_accuracy": accuracy[final_round], "mean_accuracy_last5": sum(accuracy[r] for r in last) / len(last),
        "accuracy_per_round": [accuracy[r] for r in sorted(accuracy)],
        "total_wire_bytes": sum(e["wire_bytes"] for e in per_round),
        "total_raw_bytes": sum(e["raw_bytes"] for e in per_round),
        "compress_seconds_total": sum(r["compress_seconds"] for r in raw["replies"]),
        "decompress_seconds_total": sum(r["decompress_seconds"] for r in raw["replies"]),
        "compress_seconds_per_reply": sum(r["compress_seconds"] for r in raw["replies"]) / len(raw["replies"]),
        "decompress_seconds_per_reply": sum(r["decompress_seconds"] for r in raw["replies"]) / len(raw["replies"]),
        "compress_wall_seconds_median": _median([r.get("compress_wall_seconds", 0.0) for r in raw["replies"]]),
        "decompress_wall_seconds_median": _median([r.get("decompress_wall_seconds", 0.0) for r in raw["replies"]]),
        "resets": sum(e["resets"] for e in per_round), "failures": sum(e["failures"] for e in per_round),
        "broadcast_bytes_per_client": raw["broadcast_bytes"], "per_round": per_round,
    }
    summary["ratio"] = summary["total_raw_bytes"] / summary["total_wire_bytes"]
    for bandwidth in BANDWIDTHS_MBIT:
        for kind in ("upload", "round_trip"):
            summary[f"{kind}_seconds_per_client_round@{bandwidth}"] = sum(e[f"{kind}_seconds@{bandwidth}"] for e in per_round) / n
    return summary


def combine(per_seed: list[dict]) -> dict:
    """One configuration over several seeds: numbers averaged (per round too), seeds kept."""
    first = per_seed[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "error_bound":
            out[key] = value
        else:
            out[key] = sum(s[key] for s in per_seed) / len(per_seed)
    out["accuracy_per_round"] = [sum(v) / len(v) for v in zip(*(s["accuracy_per_round"] for s in per_seed))]
    out["per_round"] = [{k: (sum(e[k] for e in entries) / len(entries)
                             if isinstance(entries[0][k], (int, float)) and entries[0][k] is not None else entries[0][k])
                         for k in entries[0]} for entries in zip(*(s["per_round"] for s in per_seed))]
    out["ratio"] = out["total_raw_bytes"] / out["total_wire_bytes"]
    out["seeds"] = [s["seed"] for s in per_seed]
    out["per_seed"] = per_seed
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def compare(summaries: list[dict]) -> None:
    """Add the reduction against uncompressed and accuracy deltas (in percentage points)."""
    base = next((s for s in summaries if s["codec"] == "none"), None)
    for s in summaries:
        for b in BANDWIDTHS_MBIT:
            for kind in ("upload", "round_trip"):
                if base is not None:
                    ref = base[f"{kind}_seconds_per_client_round@{b}"]
                else:  # no uncompressed run (smoke mode): the same replies, uncompressed
                    replies = sum(e["clients"] for e in s["per_round"])
                    ref = 8 * s["total_raw_bytes"] / replies / (b * 1e6)
                    if kind == "round_trip":
                        ref += 8 * s["broadcast_bytes_per_client"] / (b * 1e6)
                s[f"{kind}_reduction_pct@{b}"] = 100 * (1 - s[f"{kind}_seconds_per_client_round@{b}"] / ref)
        if base is not None:
            deltas = [100 * (mine["final_accuracy"] - theirs["final_accuracy"])
                      for mine, theirs in zip(s["per_seed"], base["per_seed"])]
            deltas5 = [100 * (mine["mean_accuracy_last5"] - theirs["mean_accuracy_last5"])
                       for mine, theirs in zip(s["per_seed"], base["per_seed"])]
            s["final_accuracy_delta_pp_per_seed"] = deltas
            s["final_accuracy_delta_pp"] = sum(deltas) / len(deltas)
            s["mean_last5_delta_pp_per_seed"] = deltas5
            s["mean_last5_delta_pp"] = sum(deltas5) / len(deltas5)


def _delta(s: dict, key: str) -> str:
    if key not in s:
        return "—"
    values = s[f"{key}_per_seed"]
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{s[key]:+.2f} [{min(values):+.2f}, {max(values):+.2f}]"


def table(summaries: list[dict]) -> str:
    head = ("| configuration | final acc. | Δ final (pp) | acc. last 5 rounds | Δ last 5 (pp) | bytes sent | ratio "
            "| compress CPU / reply | decompress CPU / reply | upload time reduction 1 / 10 / 100 Mbit/s "
            "| round-trip reduction 1 / 10 / 100 Mbit/s |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for s in summaries:
        up = " / ".join(f"{s[f'upload_reduction_pct@{b}']:.1f}%" for b in BANDWIDTHS_MBIT)
        rt = " / ".join(f"{s[f'round_trip_reduction_pct@{b}']:.1f}%" for b in BANDWIDTHS_MBIT)
        lines.append(
            f"| {s['name']} | {100 * s['final_accuracy']:.2f}% | {_delta(s, 'final_accuracy_delta_pp')} "
            f"| {100 * s['mean_accuracy_last5']:.2f}% | {_delta(s, 'mean_last5_delta_pp')} "
            f"| {s['total_wire_bytes'] / 1e6:.2f} MB | {s['ratio']:.1f}x "
            f"| {s['compress_seconds_per_reply'] * 1e3:.0f} ms | {s['decompress_seconds_per_reply'] * 1e3:.1f} ms "
            f"| {up} | {rt} |")
    return "\n".join(lines)


def verdicts(summaries: list[dict]) -> list[str]:
    out = []
    by_name = {s["name"]: s for s in summaries}
    gz3 = by_name.get("gradzip rel 0.001")
    if gz3 and "final_accuracy_delta_pp" in gz3:
        d, worst = gz3["final_accuracy_delta_pp"], max(abs(v) for v in gz3["final_accuracy_delta_pp_per_seed"])
        seeds = len(gz3["seeds"])
        out.append(f"gradzip at rel 1e-3: final accuracy {d:+.2f} pp vs uncompressed"
                   + (f" (mean over {seeds} seeds, largest per-seed gap {worst:.2f} pp)" if seeds > 1 else "")
                   + f": {'within' if abs(d) <= 0.5 and worst <= 0.5 else 'NOT within'} 0.5 pp; over the last 5 rounds "
                   f"{gz3['mean_last5_delta_pp']:+.2f} pp.")
    for eb in BOUNDS:
        g, z = by_name.get(f"gradzip rel {eb:g}"), by_name.get(f"sz3 rel {eb:g}")
        if g and z and "final_accuracy_delta_pp" in g:
            dg, dz = g["final_accuracy_delta_pp"], z["final_accuracy_delta_pp"]
            if dg >= -1e-9 and dz >= -1e-9:
                word = "neither loses accuracy"
                if abs(dg - dz) > 1e-9:
                    word += f" ({'gradzip' if dg > dz else 'SZ3'} ends {abs(dg - dz):.2f} pp higher)"
            elif abs(dg - dz) < 1e-9:
                word = "gradzip and SZ3 lose the same accuracy"
            else:
                word = f"gradzip loses {'less' if dg > dz else 'more'} accuracy than SZ3"
            out.append(f"rel {eb:g}: final accuracy vs uncompressed: gradzip {dg:+.2f} pp, SZ3 {dz:+.2f} pp: {word}; "
                       f"last 5 rounds: gradzip {g['mean_last5_delta_pp']:+.2f} pp, SZ3 {z['mean_last5_delta_pp']:+.2f} pp. "
                       f"Bytes: gradzip {g['total_wire_bytes'] / 1e6:.2f} MB ({g['ratio']:.1f}x), "
                       f"SZ3 {z['total_wire_bytes'] / 1e6:.2f} MB ({z['ratio']:.1f}x).")
    if out:
        out.append("One test sample is 0.19 pp of accuracy.")
    return out


def plot(summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    colors = {"none": "black", "gradzip": "tab:blue", "sz3": "tab:orange"}
    styles = {0.0: "-", 1e-2: ":", 1e-3: "-", 1e-4: "--"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for s in summaries:
        acc = [100 * a for a in s["accuracy_per_round"]]
        ax.plot(range(len(acc)), acc, styles.get(s["error_bound"], "-"), color=colors[s["codec"]], label=s["name"],
                linewidth=1.6)
    ax.set(xlabel="round", ylabel="test accuracy (%)", title="Test accuracy per round (zoomed: rounds 0-2 are lower)")
    tail = [a for s in summaries for a in s["accuracy_per_round"][3:]] or [0.0]
    ax.set_ylim(max(0.0, 100 * min(tail) - 1), 100.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for s in summaries:
        rounds = [e["round"] for e in s["per_round"]]
        ax.plot(rounds, [e["wire_bytes"] / 1e3 for e in s["per_round"]], styles.get(s["error_bound"], "-"),
                color=colors[s["codec"]], label=s["name"], linewidth=1.6)
    ax.set(xlabel="round", ylabel="kB uploaded per round, all clients", title="Upload volume per round")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax = axes[1][0]
    names = [s["name"] for s in summaries]
    width = 0.8 / len(BANDWIDTHS_MBIT)
    for i, b in enumerate(BANDWIDTHS_MBIT):
        values = [s[f"upload_seconds_per_client_round@{b}"] for s in summaries]
        bars = ax.bar([x + i * width for x in range(len(names))], values, width, label=f"{b} Mbit/s")
        for bar, s in zip(bars, summaries):
            if s["codec"] != "none":
                ax.annotate(f"{-s[f'upload_reduction_pct@{b}']:+.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="seconds (log)", yscale="log",
           title="Upload time per client and round: compress + transfer + decompress\n(labels: change vs uncompressed)")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 3)  # room for the labels
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax = axes[1][1]
    for s in summaries:
        if s["codec"] == "none":
            continue
        ax.scatter(s["total_wire_bytes"] / 1e6, 100 * s["mean_accuracy_last5"], color=colors[s["codec"]],
                   marker={1e-2: "v", 1e-3: "o", 1e-4: "^"}.get(s["error_bound"], "o"), s=60, label=s["name"])
    base = next((s for s in summaries if s["codec"] == "none"), None)
    if base:
        ax.scatter(base["total_wire_bytes"] / 1e6, 100 * base["mean_accuracy_last5"], color="black", marker="s", s=60,
                   label="uncompressed")
    ax.set(xscale="log", xlabel="total bytes uploaded (MB, log)", ylabel="mean test accuracy, last 5 rounds (%)",
           title="Accuracy vs bytes")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _raw_name(config: dict, seed: int) -> str:
    return f"{config['name'].replace(' ', '_')}-seed{seed}.json"


def _run_all(args, engine: str, configs: list[dict], seeds: list[int], raw_dir: Path, runs: dict) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gzfl-"))
    sys.path.insert(0, str(APP_DIR))
    from gzfl.task import digits_split  # noqa: E402
    import numpy as np

    data_file = workdir / "digits.npz"
    np.savez(data_file, **digits_split())
    federation = Federation(engine, args.clients, workdir, args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the federation on `kill` too
    print(f"engine: {engine}; {args.clients} clients, {args.rounds} rounds, seeds {seeds}; logs in {workdir}", flush=True)
    try:
        federation.start()
        for seed, config in ((seed, config) for seed in seeds for config in configs):
            out_file = raw_dir / _raw_name(config, seed)
            out_file.unlink(missing_ok=True)
            run_config = {"num-rounds": args.rounds, "num-clients": args.clients, "codec": config["codec"],
                          "error-bound": float(config["error-bound"]), "local-epochs": args.local_epochs,
                          "lr": args.lr, "alpha": args.alpha, "seed": seed, "data-file": str(data_file),
                          "out-file": str(out_file)}
            t0 = time.time()
            federation.run(run_config, args.timeout)
            if not out_file.exists():
                raise RuntimeError(f"{config['name']}: the ServerApp wrote no result; see {workdir}")
            raw = json.loads(out_file.read_text())
            raw["engine"] = engine
            out_file.write_text(json.dumps(raw, indent=1))
            summary = summarize(config, raw)
            runs[config["name"]].append(summary)
            print(f"{config['name']:>20} seed {seed}: final accuracy {100 * summary['final_accuracy']:.2f}%, "
                  f"{summary['total_wire_bytes'] / 1e6:.2f} MB sent ({summary['ratio']:.1f}x), "
                  f"{time.time() - t0:.0f} s", flush=True)
    finally:
        federation.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("auto", "simulation", "deployment"), default="auto",
                        help="auto: simulation when ray is installed, else deployment")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data split, init, training order)")
    parser.add_argument("--configs", default="all", help="comma-separated, e.g. uncompressed,gradzip-rel-0.001")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results go (default: results/ beside this script; results/smoke/ with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="2 clients, 2 rounds, gradzip rel 1e-3 only")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--verbose", action="store_true", help="show Flower's logs")
    parser.add_argument("--analyze-only", action="store_true",
                        help="rebuild results.json/.md/.png from the raw results saved in OUT/raw")
    args = parser.parse_args(argv)
    if args.out is None:  # (a smoke run must not overwrite the published results, nor mix its raw runs into them)
        args.out = HERE / "results" / "smoke" if args.smoke else HERE / "results"
    if args.smoke:
        args.clients, args.rounds = 2, 2
        if args.configs == "all":
            args.configs = "gradzip-rel-0.001"
    if not 2 <= args.clients:
        parser.error("--clients must be at least 2")
    engine = args.engine if args.engine != "auto" else ("simulation" if ray_available() else "deployment")
    configs = configurations(args.configs)
    seeds = [int(v) for v in str(args.seeds).split(",")]
    raw_dir = args.out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    started = time.time()
    if args.analyze_only:
        for seed, config in ((seed, config) for seed in seeds for config in configs):
            raw = json.loads((raw_dir / _raw_name(config, seed)).read_text())
            engine = raw.get("engine", engine)
            runs[config["name"]].append(summarize(config, raw))
    else:
        _run_all(args, engine, configs, seeds, raw_dir, runs)
    summaries = [combine(runs[c["name"]]) for c in configs]
    compare(summaries)
    result = {"settings": {"engine": engine, "clients": args.clients, "rounds": args.rounds,
                           "local_epochs": args.local_epochs, "lr": args.lr, "alpha": args.alpha, "seeds": seeds,
                           "bandwidths_mbit": BANDWIDTHS_MBIT, "model": "3x(conv3x3+BN) CNN, 90k weights",
                           "dataset": "scikit-learn digits, 1257 train / 540 test, Dirichlet non-IID split",
                           "wall_seconds": time.time() - started},
              "verdicts": verdicts(summaries), "configurations": summaries}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    md = table(summaries) + "\n\n" + "\n".join(f"- {v}" for v in result["verdicts"]) + "\n"
    (args.out / "results.md").write_text(md)
    plot(summaries, args.out / "accuracy.png",
         f"FedAvg, {args.clients} non-IID clients, {args.rounds} rounds, Flower {engine} engine, "
         f"mean over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    print(md)
    print(f"wrote {args.out / 'results.json'}, results.md and accuracy.png in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
