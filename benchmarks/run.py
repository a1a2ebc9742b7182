#!/usr/bin/env python
"""What `make bench` runs: `gradzip bench` on sample_data and on the generated corpus.

    python benchmarks/run.py [--bounds 1e-2,1e-3,1e-4] [--corpus auto|skip|only] [--out benchmarks/results]

Datasets: sample_data/ (committed), plus every sequence under benchmarks/corpus/ (not
committed). With --corpus auto (the default) the corpus is generated first by
`benchmarks/make_corpus.py --suite bench` when it is missing and torch is installed, and
skipped with a note otherwise.

Writes, per dataset, benchmarks/results/<dataset>.json (every figure) and <dataset>.png, and
benchmarks/results/summary.md: the gradzip/SZ3 ratio of every sequence at every bound with
the geometric mean, then each dataset's full table. Every number is measured in this run.
"""
from __future__ import annotations

import argparse
import datetime
import math
import subprocess
import sys
from pathlib import Path

from gradzip.allocator import one_malloc_arena
from gradzip.blas import one_blas_thread

one_blas_thread()  # before anything loads numpy
one_malloc_arena()

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
CORPUS = REPO / "benchmarks" / "corpus"
RESULTS = REPO / "benchmarks" / "results"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def rounds_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("round_*.safetensors"))


def corpus_sequences(mode: str) -> list[tuple[str, list[Path]]]:
    if mode == "skip":
        return []
    sequences = [d for d in sorted(CORPUS.iterdir()) if d.is_dir() and rounds_of(d)] if CORPUS.is_dir() else []
    if not sequences:
        try:
            import torch  # noqa: F401
        except ImportError:
            log("benchmarks/corpus is missing and torch is not installed: corpus skipped "
                "(pip install torch==2.13.0, then make corpus)")
            return []
        log("generating the corpus: benchmarks/make_corpus.py --suite bench (this takes a while)")
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_corpus.py"), "--suite", "bench",
                        "--out", str(CORPUS)], check=True)
        sequences = [d for d in sorted(CORPUS.iterdir()) if d.is_dir() and rounds_of(d)]
    return [(d.name, rounds_of(d)) for d in sequences]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bounds", default="1e-2,1e-3,1e-4", help="comma-separated error bounds")
    parser.add_argument("--mode", choices=["rel", "abs"], default="rel")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timing runs per round; the fastest counts")
    parser.add_argument("--corpus", choices=["auto", "skip", "only"], default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help="benchmark this directory of round_*.safetensors instead (repeatable)")
    args = parser.parse_args(argv)

    from rich.console import Console

    from gradzip.bench.cli import print_tables
    from gradzip.bench.commtime import parse_bandwidths, DEFAULT_BANDWIDTHS
    from gradzip.bench.runner import BenchConfig, load_rounds, run_bench, write_json

    bounds = tuple(float(b) for b in args.bounds.split(","))
    config = BenchConfig(error_bounds=bounds, mode=args.mode, repeats=args.repeats,
                         methods=tuple(args.methods.split(",")) if args.methods else None,
                         bandwidths=tuple(parse_bandwidths(DEFAULT_BANDWIDTHS)))
    datasets = [(d.name, rounds_of(d)) for d in args.data if rounds_of(d)]
    if not args.data and args.corpus != "only":
        if rounds_of(SAMPLE):
            datasets.append(("sample_data", rounds_of(SAMPLE)))
        else:
            log("sample_data/ has no round_*.safetensors (make sample-data): skipped")
    if not args.data:
        datasets += corpus_sequences("auto" if args.corpus == "only" else args.corpus)
    if not datasets:
        log("nothing to benchmark")
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=170)
    results = []
    try:
        from gradzip.bench.plot import plot
    except ImportError:
        plot = None
    for name, paths in datasets:
        log(f"{name}: {len(paths)} rounds")
        result = run_bench(load_rounds(paths), config, progress=lambda msg, name=name: log(f"{name}: {msg}"))
        result["dataset"] = name
        result["inputs"] = [str(Path(p).relative_to(REPO)) if Path(p).is_relative_to(REPO) else str(p) for p in paths]
        write_json(result, args.out / f"{name}.json")
        try:
            if plot is None:
                raise ImportError
            plot(result, str(args.out / f"{name}.png"), title=f"gradzip bench on {name}: {len(paths)} rounds, "
                 f"{result['data']['tensors']} tensors, {result['data']['original_bytes'] / 1e6:.1f} MB; mode {args.mode}")
        except ImportError:
            log("matplotlib is not installed: no PNG")
        print_tables(result, console)
        results.append((name, result))
    summary = summary_markdown(results, plot is not None)
    (args.out / "summary.md").write_text(summary)
    log(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}/summary.md, "
        f"{len(results)} JSON file(s) and plot(s)")
    return 0


# ---------------------------------------------------------------- markdown


def _f(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary_markdown(results, with_plots: bool) -> str:
    first = results[0][1]
    env = first["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    mode = first["mode"]
    bounds = first["error_bounds"]
    lines = [
        "# gradzip bench results",
        "",
        f"Generated by `make bench` (`benchmarks/run.py`) on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"gradzip {env['gradzip']}; {versions}; {env['platform']}, {env['cpu_count']} CPU(s). Every figure below was measured "
        "in that run; the JSON files beside this one hold all of them.",
        "",
        f"Every method compresses the same tensors at the same per-tensor absolute bound ({mode} mode: "
        + ("eb times the tensor's value range in that round" if mode == "rel" else "eb") + "), which each "
        "error-bounded method derives from the tensor inside its timed compression (gradzip's function for all). "
        f"Float tensors of at most {first['settings']['lossy_limit']} elements are coded lossily by a baseline only where "
        "that beats their raw bytes (SZ3's header can outweigh a bias); the others share one zstd frame per round. gradzip "
        "quantizes its small float tensors into one shared rANS stream. Speeds are single-threaded (except \"gradzip all threads\") MB/s of original data "
        "(10^6 bytes), the fastest of "
        f"{first['settings']['repeats']} runs per round after a warm-up, the methods' runs alternating (each method's "
        "first run of a round, then each one's second, ...) so a slow spell of the machine falls on all of them alike; "
        "peak memory is "
        + ("the largest rise of resident memory during one compress or decompress call" if first["settings"]["memory"] == "rss"
           else "tracemalloc's largest peak (numpy and Python allocations only) during one compress or decompress call")
        + ", measured in a process that runs that method at that bound alone (after a warm-up on its first four rounds), "
          "as a client or a server does."
        + " QSGD is not error-bounded; its error is reported at its size.",
        "",
    ]
    loads = [load[0] for _, r in results for load in (r["environment"].get("load_average"), r["environment"].get("load_average_after"))
             if load]
    if loads and env.get("cpu_count") and max(loads) > 0.75 * env["cpu_count"]:
        lines += [f"**The machine was busy during this run** (1-minute load average up to {max(loads):.1f} on "
                  f"{env['cpu_count']} CPU(s)): the MB/s figures are understated and noisy. The JSON files also hold "
                  "process CPU times (`compress_cpu_seconds`, `decompress_cpu_seconds`), which suffer less.", ""]
    lines += [
        "## gradzip's compression ratio relative to SZ3 (default algorithm, own shape)",
        "",
        "Each cell: gradzip's whole .grz stream against SZ3's payloads, then gradzip's tensor payloads alone "
        "(without the .grz header and per-tensor records; SZ3 is charged no framing either way).",
        "",
        "| sequence | " + " | ".join(f"{mode} {eb:g}" for eb in bounds) + " |",
        "|---|" + "---:|" * len(bounds),
    ]
    columns = [[] for _ in bounds]
    payload_columns = [[] for _ in bounds]
    for name, result in results:
        cells = []
        for i, entry in enumerate(result["results"]):
            g = entry["methods"].get("gradzip", {})
            vs, payload_vs = g.get("ratio_vs_sz3"), g.get("payload_ratio_vs_sz3")
            columns[i].append(vs)
            payload_columns[i].append(payload_vs)
            cells.append(f"{_f(vs, '.3f')}x / {_f(payload_vs, '.3f')}x" if vs else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        lines.append("| **geometric mean** | " + " | ".join(
            f"{_f(geomean(c), '.3f')}x / {_f(geomean(p), '.3f')}x" if geomean(c) else "-"
            for c, p in zip(columns, payload_columns)) + " |")
    lines.append("")

    for name, result in results:
        data = result["data"]
        lines += [f"## {name}", "",
                  f"{data['rounds']} rounds, {data['tensors']} tensors, {data['original_bytes'] / 1e6:.2f} MB in all "
                  f"(largest tensor {_mb(data['largest_tensor_bytes'])}).", ""]
        if with_plots:
            lines += [f"![{name}]({name}.png)", ""]
        for s in result["skipped"]:
            lines.append(f"- skipped {s['method']}: {s['reason']}")
        if result["skipped"]:
            lines.append("")
        for entry in result["results"]:
            eb = entry["error_bound"]
            lines += [f"### {mode} {eb:g}", "",
                      "| method | ratio | vs SZ3 | bits/value | compress MB/s | decompress MB/s | max err / eb | PSNR (dB) "
                      "| NRMSE | over bound | peak memory |",
                      "|---|" + "---:|" * 10]
            for r in entry["methods"].values():
                over = str(r["over_bound"]) + ("" if r["error_bounded"] else " (not bounded)")
                lines.append(f"| {r['label']} | {_f(r['ratio'], '.2f')}x | {_f(r['ratio_vs_sz3'], '.3f')} | "
                             f"{_f(r['bits_per_value'], '.3f')} | {_f(r['compress_mb_s'], '.1f')} | {_f(r['decompress_mb_s'], '.1f')} | "
                             f"{_f(r['max_error_over_eb'], '.3f')} | {_f(r['psnr'], '.1f', 'exact')} | {_f(r['nrmse'], '.2e')} | "
                             f"{over} | {_mb(r['peak_memory_bytes'])} |")
            lines.append("")
            bandwidths = result["bandwidths_bit_per_s"]
            from gradzip.bench.commtime import format_bandwidth

            lines += ["Communication time per round (compress + send + decompress) and its change against sending raw:", "",
                      "| method | " + " | ".join(format_bandwidth(b) for b in bandwidths) + " |",
                      "|---|" + "---:|" * len(bandwidths)]
            some = next(iter(entry["methods"].values()))
            lines.append("| raw | " + " | ".join(f"{c['raw_seconds']:.3g} s" for c in some["comm_time"]) + " |")
            for r in entry["methods"].values():
                lines.append(f"| {r['label']} | " + " | ".join(f"{c['total_seconds']:.3g} s ({-100 * c['reduction']:+.0f}%)"
                                                              for c in r["comm_time"]) + " |")
            g = entry["methods"].get("gradzip", {}).get("gradzip")
            lines.append("")
            if g:
                over = _f(100 * g["coder_overhead"], "+.2f") + "%" if g["coder_overhead"] is not None else "-"
                lines += [f"gradzip: rANS code {g['rans_code_bytes']} B vs {g['rans_ideal_code_bytes']:.0f} B ideal under its own "
                          f"model ({over}); container framing {g['container_bytes']} B; predictors chosen "
                          f"{dict(sorted(g['predictors'].items()))}; state {_mb(g['state_bytes'])}.", ""]
        warm = [f"{r['label']} {r['warmup_overhead_seconds']:.2f} s" for r in result["results"][0]["methods"].values()
                if r["warmup_overhead_seconds"] is not None and r["warmup_overhead_seconds"] > 0.5]
        if warm:
            lines += ["First-call overhead excluded from the speeds (numba compilation or cache load, imports): "
                      + ", ".join(warm) + ".", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
