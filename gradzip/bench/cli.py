"""`gradzip bench`: click parses, the runner measures, rich renders on stderr."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .commtime import DEFAULT_BANDWIDTHS
from .methods import METHODS


def _split(values) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-e", "--error-bound", "error_bounds", type=float, multiple=True,
              help="Error bound; repeat for a rate-distortion sweep.  [default: 1e-3]")
@click.option("-m", "--mode", type=click.Choice(["rel", "abs"]), default="rel", show_default=True,
              help="rel: eb times each tensor's value range in each round; abs: eb itself.")
@click.option("--methods", "method_names", multiple=True, metavar="NAME[,NAME...]",
              help=f"Methods to run (default: all): {', '.join(METHODS)}.")
@click.option("--bandwidth", "bandwidths", default=DEFAULT_BANDWIDTHS, show_default=True,
              help="Link bandwidths for the communication-time model, comma-separated (bit/s, or B/s for bytes).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Time each round this many times and keep the fastest.")
@click.option("--no-memory", is_flag=True,
              help="Skip the peak-memory measurement (each method at each bound runs once more, in a process of its own).")
@click.option("--json", "json_path", help="Write every figure as JSON to this file ('-' for stdout).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write the figures as a PNG (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no tables.")
def bench(inputs, error_bounds, mode, method_names, bandwidths, repeats, no_memory, json_path, plot_path, quiet):
    """Compare gradzip with SZ3, ZFP, QSGD and zstd on one client's rounds (INPUTs in round order),
    every method at the same per-tensor absolute bound."""
    from ..cli import STDIO, CliError, _check_outputs, _read_input, _write_all, console, user_errors

    with user_errors():
        from .commtime import parse_bandwidths
        from .runner import BenchConfig, Round, json_text, run_bench, write_json
        from ..tensorio import read_tensors

        try:
            bandwidth_values = parse_bandwidths(bandwidths)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if not bandwidth_values:
            raise CliError("--bandwidth needs at least one bandwidth")
        names = _split(method_names) or None
        if names:
            unknown = [n for n in names if n not in METHODS]
            if unknown:
                raise CliError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if "-" in inputs:
            raise CliError("bench reads files, not stdin")
        if plot_path and not plot_path.lower().endswith(".png"):
            raise CliError(f"{plot_path}: --plot writes a PNG; name it *.png")
        # Before the minutes of timing: never an input, a directory or twice; a rerun's report is replaced.
        reports = [p for p in (json_path, plot_path) if p and p != STDIO]
        _check_outputs(inputs, reports, True, None)
        for path in reports:
            if not Path(path).resolve().parent.is_dir():
                raise CliError(f"{path}: its directory does not exist")
        rounds = []
        for path in inputs:
            tensors, _fmt, _meta = read_tensors(_read_input(path), path)
            rounds.append(Round(path, tensors))
        config = BenchConfig(error_bounds=tuple(error_bounds) or (1e-3,), mode=mode, methods=tuple(names) if names else None,
                             bandwidths=tuple(bandwidth_values), repeats=repeats, memory=not no_memory)
        show = not quiet and console.is_terminal
        with console.status("benchmarking", spinner="dots") if show else _null() as status:
            result = run_bench(rounds, config, progress=(lambda msg: status.update(f"benchmarking: {msg}")) if show else None)
        if json_path == STDIO:
            _write_all(sys.stdout.buffer, json_text(result).encode())
        elif json_path:
            write_json(result, json_path)
        if plot_path:
            from .plot import plot

            try:
                plot(result, plot_path)
            except ImportError:
                raise CliError("--plot needs matplotlib (pip install 'gradzip[bench]')") from None
        if not quiet:
            print_tables(result, console)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _f(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _bytes(n) -> str:
    from ..cli import _fmt_bytes  # the main CLI's (imported here: it registers this module's command)

    return "-" if n is None else _fmt_bytes(n)


def print_tables(result: dict, console) -> None:
    """The per-bound results table, the communication-time table and the notes."""
    from rich.table import Table

    data = result["data"]
    console.print(f"[bold]gradzip bench[/]: {data['rounds']} round(s), {data['tensors']} tensors, "
                  f"{_bytes(data['original_bytes'])} in all; mode {result['mode']}; "
                  f"timing: fastest of {result['settings']['repeats']} per round, methods alternating, after warm-up")
    for entry in result["results"]:
        eb = entry["error_bound"]
        bound = f"rel {eb:g} (eb = {eb:g} x each tensor's range)" if result["mode"] == "rel" else f"abs {eb:g}"
        table = Table(title=f"error bound {bound}", title_justify="left")
        for column in ("method", "ratio", "vs SZ3", "bits/value", "compress MB/s", "decompress MB/s",
                       "max err / eb", "PSNR", "NRMSE", "over bound", "peak mem"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for r in entry["methods"].values():
            over = str(r["over_bound"])
            if r["error_bounded"] and r["over_bound"]:
                over = f"[red]{over}[/]"
            elif not r["error_bounded"]:
                over = f"[dim]{over} (unbounded)[/]"
            table.add_row(r["label"], _f(r["ratio"], ".2f") + "x", _f(r["ratio_vs_sz3"], ".2f") + ("x" if r["ratio_vs_sz3"] else ""),
                          _f(r["bits_per_value"], ".3f"), _f(r["compress_mb_s"], ".1f"), _f(r["decompress_mb_s"], ".1f"),
                          _f(r["max_error_over_eb"], ".3f"), _f(r["psnr"], ".1f", "exact") + (" dB" if r["psnr"] is not None else ""),
                          _f(r["nrmse"], ".2e"), over, _bytes(r["peak_memory_bytes"]))
        console.print(table)
        _print_comm_table(result, entry, console)

    notes = []
    for s in result["skipped"]:
        notes.append(f"skipped {s['method']}: {s['reason']}")
    for r in result["results"][0]["methods"].values():
        if r["warmup_overhead_seconds"] and r["warmup_overhead_seconds"] > 0.5:
            notes.append(f"{r['label']}: first-call overhead (numba compilation or cache load, imports) "
                         f"{r['warmup_overhead_seconds']:.2f} s, excluded from MB/s")
    for entry in result["results"]:
        r = entry["methods"].get("gradzip")
        if r and r["framing_bytes"] and r["compressed_bytes"]:
            notes.append(f"gradzip at {entry['error_bound']:g}: .grz framing (header, per-tensor records) is "
                         f"{_bytes(r['framing_bytes'])}, {100 * r['framing_bytes'] / r['compressed_bytes']:.1f}% of its stream"
                         + (f"; payloads alone are {r['payload_ratio_vs_sz3']:.3f}x SZ3's" if r["payload_ratio_vs_sz3"] else "")
                         + " (baselines are charged no framing)")
        g = r.get("gradzip") if r else None
        if g and g["coder_overhead"] is not None:
            notes.append(f"gradzip at {entry['error_bound']:g}: rANS codes {_bytes(g['rans_code_bytes'])} vs ideal "
                         f"{_bytes(g['rans_ideal_code_bytes'])} under its own model ({100 * g['coder_overhead']:+.2f}%)")
    env = result["environment"]
    loads = [env.get("load_average"), env.get("load_average_after")]
    busiest = max((load[0] for load in loads if load), default=None)
    if busiest is not None and env.get("cpu_count") and busiest > 0.75 * env["cpu_count"]:
        notes.append(f"[yellow]the machine was busy (1-min load up to {busiest:.1f} on {env['cpu_count']} CPU(s)): "
                     "MB/s are understated and noisy; the JSON also has CPU-time figures[/]")
    memory = result["settings"]["memory"]
    if memory == "rss":
        notes.append("peak mem: largest rise of resident memory (VmHWM) over a compress or decompress call, all allocators "
                     "included, in a process that runs that method at that bound alone")
    elif memory == "tracemalloc":
        notes.append("peak mem: largest tracemalloc peak of a call (numpy/Python allocations only; C/C++ and numba "
                     "internals not seen), in a process that runs that method at that bound alone")
    notes.append("QSGD is not error-bounded: its error is what it is at its size")
    for note in notes:
        console.print(f"[dim]note:[/] {note}")


def _print_comm_table(result: dict, entry: dict, console) -> None:
    from rich.table import Table

    from .commtime import format_bandwidth

    table = Table(title=f"communication time per round at {result['mode']} {entry['error_bound']:g}",
                  caption="compress + send + decompress, and the change against sending raw (-76% = 76% less time)",
                  title_justify="left", caption_justify="left")
    table.add_column("method")
    for bw in result["bandwidths_bit_per_s"]:
        table.add_column(format_bandwidth(bw), justify="right")
    first = next(iter(entry["methods"].values()), None)
    if first:
        table.add_row("raw (uncompressed)", *[f"{c['raw_seconds']:.3g} s" for c in first["comm_time"]], style="dim")
    for r in entry["methods"].values():
        table.add_row(r["label"], *[f"{c['total_seconds']:.3g} s ({-100 * c['reduction']:+.0f}%)" for c in r["comm_time"]])
    console.print(table)
