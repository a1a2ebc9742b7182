"""The `gradzip` command: click parses, rich renders (on stderr), the library does the work."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path


def _interrupted_while_starting(signum, frame) -> None:
    # (Ctrl-C while the imports below run, before any command has started: nothing to undo)
    sys.stderr.write("gradzip: interrupted\n")
    os._exit(130)


# Only where this process is the command (a program that imports this module keeps its own handler).
if __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "gradzip":
    signal.signal(signal.SIGINT, _interrupted_while_starting)  # main() restores Python's handler

from .allocator import one_malloc_arena  # noqa: E402
from .blas import one_blas_thread  # noqa: E402

one_blas_thread()  # before anything loads numpy
one_malloc_arena()

import click  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

# Wide enough for the summary tables when stderr is a log file rather than a terminal.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
STDIO = "-"


class CliError(click.ClickException):
    """One clear line on stderr and exit code 1."""

    def show(self, file=None) -> None:
        click.echo(f"gradzip: error: {self.message}", err=True)


# What Ctrl-C leaves, for the commands that write outputs and save the state after each one
# (the output first, so that a crash between the two leaves the state of the round before).
INTERRUPTED_WRITING = ("interrupted; the inputs before the one in progress are done (outputs written, state saved); "
                       "that one's round is not in the state (rerun from it; --force if its output was written)")


@contextlib.contextmanager
def user_errors(interrupted: str = "interrupted"):
    """Turn gradzip's own errors, OS errors and Ctrl-C into one line and a non-zero exit;
    `interrupted`: what to say after Ctrl-C. Of the warnings raised meanwhile, gradzip's own
    are shown, one line each (a library's, such as torch's deprecation notices while it loads
    a .pt file, would turn a one-line error into several)."""
    from .errors import GradzipError, GradzipWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                yield
            finally:
                _remove_empty_made_directories()
        except GradzipError as exc:
            raise CliError(str(exc)) from None
        except MemoryError:
            raise CliError("out of memory") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise CliError(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            click.echo(f"gradzip: {interrupted}", err=True)
            sys.exit(130)
        finally:
            for warning in caught:
                if issubclass(warning.category, GradzipWarning):
                    click.echo(f"gradzip: warning: {warning.message}", err=True)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not enabled)


def _show_progress(quiet: bool) -> bool:
    return not quiet and console.is_terminal


def _files_description(direction: str) -> str:
    """The progress bar's label for the files, which says when this call compiles gradzip's
    kernels first (a minute of a bar that does not move otherwise looks hung)."""
    from .kernel_cache import first_call_compiles

    return "files (first run: compiling kernels, ~1 min)" if first_call_compiles(direction) else "files"


class _Group(click.Group):
    """Usage errors, like every other error, as one line on stderr."""

    def main(self, args=None, prog_name=None, **extra):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is user_errors' to report
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"gradzip: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("gradzip: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gradzip")
def main() -> None:
    """Error-bounded lossy compression of per-round gradient dumps (safetensors, npy, npz; .pt read)."""


def _read_input(path: str) -> bytes:
    if path == STDIO:
        return sys.stdin.buffer.read()
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{path}: is a directory")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except PermissionError:
        raise CliError(f"{path}: permission denied") from None


def _output_paths(inputs: tuple[str, ...], output: str | None, name_for) -> list[str]:
    """Where each input's result goes: -o file or '-', -o directory for several inputs, or beside it."""
    if STDIO in inputs and len(inputs) > 1:
        raise CliError("'-' (stdin) can only be the single input")
    if len(inputs) == 1:
        if output is not None and output != STDIO and _names_a_directory(output):
            if inputs[0] == STDIO:
                raise CliError(f"{output}: a directory, but stdin has no name to write under (use -o FILE)")
            _make_directory(Path(output))
            return [str(Path(output) / Path(name_for(inputs[0])).name)]
        if output is not None:
            return [output]
        return [STDIO if inputs[0] == STDIO else name_for(inputs[0])]
    if output is None:
        return [name_for(path) for path in inputs]
    if output == STDIO:
        raise CliError("-o - (stdout) takes a single input")
    directory = Path(output)
    if directory.exists() and not directory.is_dir():
        raise CliError(f"{output}: with several inputs, -o must be a directory")
    _make_directory(directory)
    return [str(directory / Path(name_for(path)).name) for path in inputs]


_made_directories: list[Path] = []  # by _output_paths in this command: removed again if left empty


def _make_directory(directory: Path) -> None:
    missing = [parent for parent in (directory, *directory.parents) if not parent.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    _made_directories.extend(missing)  # (deepest first)


def _remove_empty_made_directories() -> None:
    """A run that failed before writing into the -o directory it made leaves none behind
    (one holding the state's lock file, or an output, stays)."""
    for directory in _made_directories:
        try:
            directory.rmdir()
        except OSError:
            break  # not empty (or gone): nor are its parents
    _made_directories.clear()


def _names_a_directory(output: str) -> bool:
    """-o names a directory to write in: an existing one, or a path ending in a separator."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def _check_outputs(inputs, outputs, force: bool, state_path: str | None) -> None:
    resolved_inputs = {Path(p).resolve() for p in inputs if p != STDIO}
    state = Path(state_path).resolve() if state_path is not None else None
    seen = set()
    for path in outputs:
        if path == STDIO:
            continue
        resolved = Path(path).resolve()
        if resolved in resolved_inputs:
            raise CliError(f"{path}: refusing to overwrite an input")
        if resolved == state:
            raise CliError(f"{path}: refusing to overwrite the state file (-s)")
        if resolved in seen:
            raise CliError(f"{path}: this run would write it twice")
        seen.add(resolved)
        if Path(path).is_dir():
            raise CliError(f"{path}: is a directory")
        if Path(path).exists() and not force:
            raise CliError(f"{path}: already exists (use --force to overwrite)")
        if Path(path).exists() and not Path(path).is_file():
            raise CliError(f"{path}: not a regular file, so not replaced")


def _refuse_renumbering(outputs, state_round: int, state_path: str) -> None:
    """With --force, an output that already holds a stream of a round this state has passed
    means the same rounds are being compressed again: they would become new rounds (round 0's
    file rewritten as round 4, say), which no receiver's state can decode. Refused unless
    --round confirms it; a clean redo starts from a fresh state."""
    from .container import StreamReader
    from .errors import GradzipError

    for path in outputs:
        if path == STDIO or not Path(path).is_file():
            continue
        try:
            with open(path, "rb") as f:
                held = StreamReader(f).header().get("round")
        except (OSError, GradzipError):
            continue  # not a readable stream: nothing to renumber
        if isinstance(held, int) and held < state_round:
            raise CliError(f"{path}: holds round {held}, which {state_path} has passed (it is at round {state_round}): "
                           f"compressing again would write its input as round {state_round}, which no receiver can "
                           f"decode in that place. Start from a fresh state to redo the rounds, or pass --round "
                           f"{state_round} if this really is a new round")


def _check_inputs(inputs, json_path=None) -> None:
    """Every input readable and a --json report's directory there, before the first round:
    a typo in the third input, or a report in a missing directory, once surfaced only after
    the earlier rounds were written and the state had advanced past them."""
    for path in inputs:
        if path == STDIO:
            continue
        if Path(path).is_dir():
            raise CliError(f"{path}: is a directory")
        if not Path(path).exists():
            raise CliError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise CliError(f"{path}: permission denied")
    if json_path not in (None, STDIO) and not Path(json_path).resolve().parent.is_dir():
        raise CliError(f"{json_path}: its directory does not exist")


def _write_output(path: str, data: bytes) -> None:
    from .state import atomic_write

    if path == STDIO:
        _write_all(sys.stdout.buffer, data)
    else:
        atomic_write(Path(path), data)


def _write_all(out, data: bytes) -> None:
    """Every byte to out, or an error: with PYTHONUNBUFFERED set, stdout is a raw file whose
    write to a pipe may take only part of the data (and None where it would block)."""
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise CliError("stdout: could not write the output (the reader stopped taking data)")
        view = view[written:]
    out.flush()


def _check_stdout(outputs) -> None:
    if STDIO in outputs and sys.stdout.isatty():
        raise CliError("refusing to write binary data to a terminal; use -o FILE or a pipe")


threads_option = click.option(
    "-j", "--threads", type=click.IntRange(min=0), default=0, metavar="N",
    help="Threads for large tensors (0, the default: every CPU this process may use). The bytes do not depend on it.")

state_option = click.option("-s", "--state", "state_path", required=True, type=click.Path(dir_okay=False),
                            help="Predictor state sidecar (created if missing, updated after each round).")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@state_option
@click.option("-e", "--error-bound", type=float, default=1e-3, show_default=True, help="Error bound (absolute, or a fraction of each tensor's value range).")
@click.option("-m", "--mode", type=click.Choice(["rel", "abs"]), default="rel", show_default=True, help="Error-bound mode.")
@click.option("-o", "--output", help="Output file ('-' for stdout), or a directory for several inputs.")
@click.option("--beta", type=float, default=None, help="EMA weight of the newest round (default 0.6).")
@click.option("--tau", type=float, default=None, help="Kernel sign-consistency threshold (default 0.75).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--round", "expected_round", type=int, help="Fail unless the state expects this round index next (catches skipped rounds).")
@click.option("--allow-repeat", is_flag=True, help="Accept an input identical to the previous round.")
@click.option("--exact-small", is_flag=True, help="Store float tensors of at most 1024 elements exactly (default: within the bound).")
@click.option("--no-low-rank", "no_low_rank", is_flag=True,
              help="Do not try a low-rank part on large layers (faster on them; larger streams where it would apply).")
@click.option("--search-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Try every candidate encoding every N rounds and rebuild the last round's choice in between "
                   "(default 4; 1: search every round, the smallest streams, slower).")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table.")
@click.option("--json", "json_path", help="Also write the per-file summary as JSON to this file ('-' for stdout).")
def compress(inputs, state_path, error_bound, mode, output, beta, tau, force, expected_round, allow_repeat, exact_small,
             no_low_rank, search_every, threads, quiet, json_path):
    """Compress one client's rounds, in order, to .grz streams."""
    with user_errors(INTERRUPTED_WRITING):
        from .api import Compressor
        from .predict.magnitude import DEFAULT_BETA
        from .predict.sign import DEFAULT_TAU
        from .state import load_state, locked, save_state
        from .tensorio import read_tensors

        outputs = _output_paths(inputs, output, lambda p: p + ".grz")
        if json_path == STDIO and STDIO in outputs:
            raise CliError("--json - and -o - would both write to stdout")
        # (--json is an output like -o's: never an input or the state, an existing file only with --force)
        _check_outputs(inputs, outputs + ([json_path] if json_path not in (None, STDIO) else []), force, state_path)
        _check_inputs(inputs, json_path)
        _check_stdout(outputs)
        rows = []
        with locked(state_path):
            compressor = Compressor(error_bound, mode, beta=DEFAULT_BETA if beta is None else beta,
                                    tau=DEFAULT_TAU if tau is None else tau, state=load_state(state_path),
                                    allow_repeat=allow_repeat, exact_small=exact_small, low_rank=not no_low_rank,
                                    threads=threads,
                                    **({} if search_every is None else {"search_every": search_every}))
            if expected_round is not None and expected_round != compressor.state.round:
                raise CliError(f"{state_path}: the state expects round {compressor.state.round} next, not round "
                               f"{expected_round} ({'a round was skipped' if expected_round > compressor.state.round else 'that round was already compressed'})")
            if force and expected_round is None:
                _refuse_renumbering(outputs, compressor.state.round, state_path)
            with _progress(_show_progress(quiet)) as progress:
                files = progress.add_task(_files_description("encode"), total=len(inputs))
                for path, out_path in zip(inputs, outputs):
                    label = "stdin" if path == STDIO else path
                    tensors, fmt, metadata = read_tensors(_read_input(path), label)
                    task = progress.add_task(Path(label).name, total=len(tensors))
                    buffer = io.BytesIO()
                    with _labelled(label):
                        report = compressor.compress_to(tensors, buffer, source_format=fmt, metadata=metadata,
                                                        on_tensor=lambda _name: progress.advance(task))
                    progress.remove_task(task)
                    _write_output(out_path, buffer.getvalue())  # output first: a crash now leaves the old state
                    save_state(compressor.state, state_path)
                    rows.append((label, out_path, report))
                    progress.advance(files)
        if not quiet:
            _print_round_table("compressed", rows)
        _emit_json(json_path, [_round_json(label, out, report) for label, out, report in rows])


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@state_option
@click.option("-o", "--output", help="Output file ('-' for stdout), or a directory for several inputs.")
@click.option("--format", "out_format", type=click.Choice(["safetensors", "npy", "npz"]), help="Output format (default: the input's original format).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table.")
def decompress(inputs, state_path, output, out_format, force, threads, quiet):
    """Decompress .grz streams, in round order, back to tensor files."""
    with user_errors(INTERRUPTED_WRITING):
        from .api import Decompressor
        from .state import load_state, locked, save_state
        from .tensorio import write_tensors

        outputs = _output_paths(inputs, output, lambda p: _decompressed_name(p, out_format))
        _check_outputs(inputs, outputs, force, state_path)
        _check_inputs(inputs)
        _check_stdout(outputs)
        rows = []
        with locked(state_path):
            decompressor = Decompressor(load_state(state_path), threads=threads)
            with _progress(_show_progress(quiet)) as progress:
                files = progress.add_task(_files_description("decode"), total=len(inputs))
                for path, out_path in zip(inputs, outputs):
                    label = "stdin" if path == STDIO else path
                    data = _read_input(path)
                    decoded = _decode_labelled(decompressor, data, label)
                    fmt = out_format or _writable_format(decoded.header["source_format"])
                    _write_output(out_path, write_tensors(decoded.tensors, fmt, decoded.header.get("metadata")))
                    save_state(decompressor.state, state_path)
                    rows.append((label, out_path, decoded.report))
                    progress.advance(files)
        if not quiet:
            _print_round_table("decompressed", rows, show_errors=False)


@contextlib.contextmanager
def _labelled(label: str):
    """Prefix gradzip errors with the file they concern."""
    from .errors import GradzipError

    try:
        yield
    except GradzipError as exc:
        raise type(exc)(f"{label}: {exc}") from None


def _decode_labelled(decompressor, data: bytes, label: str, advance: bool = True):
    with _labelled(label):
        return decompressor.decompress_from(io.BytesIO(data), available=len(data), advance=advance)


def _writable_format(source_format: str) -> str:
    # gradzip never writes pickles: a .pt/.pth input comes back as safetensors.
    return "safetensors" if source_format == "pt" else source_format


def _decompressed_name(path: str, out_format: str | None) -> str:
    base = path[: -len(".grz")] if path.endswith(".grz") else path + ".out"
    if out_format is None and os.path.splitext(base)[1] in (".pt", ".pth"):
        out_format = "safetensors"
    if out_format:
        stem, ext = os.path.splitext(base)
        base = (stem if ext in (".safetensors", ".npy", ".npz", ".pt", ".pth") else base) + "." + out_format
    return base


@main.command()
@click.argument("stream", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--original", type=click.Path(exists=True, dir_okay=False), help="The original tensor file, to report errors.")
@click.option("-s", "--state", "state_path", type=click.Path(dir_okay=False), help="State to decode against (read only; needed with --original after the first round).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def stats(stream, original, state_path, as_json):
    """Per-tensor sizes of a .grz stream, and its errors against the original."""
    with user_errors():
        from .api import Decompressor, describe_stream
        from .errors import StateMismatchError
        from .metrics import measure
        from .state import PredictorState, load_state
        from .tensorio import read_tensors

        data = _read_input(stream)
        label = "stdin" if stream == STDIO else stream
        figures = {}
        if original:
            tensors, _, _ = read_tensors(_read_input(original), original)
            state = load_state(state_path, create=False) if state_path else PredictorState()
            try:
                decoded = _decode_labelled(Decompressor(state), data, label, advance=False)
            except StateMismatchError:
                if state_path:
                    raise
                # (decompress's hint, to decode the earlier rounds first, is not what stats needs)
                raise CliError(f"{label}: errors against --original after the first round need the state this "
                               "stream was encoded against: pass it with -s (stats only reads it)") from None
            report = decoded.report
            if set(tensors) != set(decoded.tensors):  # (by name: a re-saved file may order them otherwise)
                raise CliError(f"{original}: its tensors do not match the stream's")
            for t in report.tensors:
                figures[t.name] = measure(tensors[t.name], decoded.tensors[t.name], t.dtype, t.eb)
        else:
            with _labelled(label):
                report = describe_stream(io.BytesIO(data), len(data))
        rows = [_tensor_json(t, figures.get(t.name)) for t in report.tensors]
        total = _totals_json(report, figures)
        if as_json:
            _write_all(sys.stdout.buffer, (json.dumps({"stream": label, "round": report.round, "tensors": rows, "total": total},
                                                      indent=2) + "\n").encode())
        else:
            _print_stats_table(label, report, rows, total, bool(figures))


def _tensor_json(t, fig) -> dict:
    row = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "method": t.method, "predictor": t.predictor,
           "variant": t.variant, "coder": t.coder, "eb": t.eb, "original_bytes": t.original_bytes, "compressed_bytes": t.compressed_bytes,
           "bits_per_value": 8 * t.compressed_bytes / t.elements if t.elements else 0.0,
           "ratio": t.original_bytes / t.compressed_bytes if t.compressed_bytes else None, "escaped": t.escaped}
    if fig is not None:
        row.update(max_abs_error=fig.max_abs_error, psnr=_finite_or_none(fig.psnr), nrmse=fig.nrmse, within_bound=fig.within_bound)
    return row


def _totals_json(report, figures) -> dict:
    total = {"original_bytes": report.original_bytes, "compressed_bytes": report.compressed_bytes,
             "ratio": report.ratio, "bits_per_value": report.bits_per_value}
    if figures:
        sse = sum(f.sum_squared_error for f in figures.values())
        count = sum(f.count for f in figures.values())
        value_range = max((f.value_range for f in figures.values()), default=0.0)
        from .metrics import psnr
        total.update(max_abs_error=max(f.max_abs_error for f in figures.values()),
                     psnr=_finite_or_none(psnr(value_range, sse / count if count else 0.0)),
                     nrmse=(math.sqrt(sse / count) / value_range) if count and value_range else 0.0,
                     within_bound=all(f.within_bound for f in figures.values()))
    return total


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def _fmt_psnr(value) -> str:
    return "exact" if value is None or value == math.inf else f"{value:.1f} dB"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):  # powers of 1024, named so
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_round_table(verb: str, rows, show_errors: bool = True) -> None:
    table = Table(title=f"gradzip: {verb} {len(rows)} file(s)", title_justify="left")
    for column in ("file", "round", "original", "compressed", "ratio", "bits/value"):
        table.add_column(column, justify="left" if column == "file" else "right")
    if show_errors:
        table.add_column("max abs error", justify="right")
        table.add_column("PSNR", justify="right")
    for label, _out, report in rows:
        cells = [escape(Path(label).name), str(report.round), _fmt_bytes(report.original_bytes), _fmt_bytes(report.compressed_bytes),
                 f"{report.ratio:.2f}x", f"{report.bits_per_value:.2f}"]
        if show_errors:
            cells += [f"{report.max_abs_error:.3g}", _fmt_psnr(report.psnr)]
        table.add_row(*cells)
    console.print(table)


def _print_stats_table(label, report, rows, total, with_errors: bool) -> None:
    # (every string from the stream or a path is escaped: a tensor named "a[/]b" is rich markup)
    table = Table(title=escape(f"{label}: round {report.round}"), title_justify="left")
    columns = ["tensor", "shape", "dtype", "method", "eb", "bits/value", "ratio"]
    if with_errors:
        columns += ["max abs error", "PSNR", "NRMSE", "within bound"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("tensor", "method", "dtype") else "right")
    for row in rows:
        predictor = f"{row['predictor']}/{row['variant']}" if row["variant"] else row["predictor"]
        method = row["method"] if row["method"] == "lossless" else f"{predictor}+{row['coder']}"
        cells = [escape(row["name"]), "x".join(map(str, row["shape"])) or "scalar", escape(row["dtype"]), escape(method),
                 f"{row['eb']:.3g}" if row["eb"] else "exact", f"{row['bits_per_value']:.2f}",
                 f"{row['ratio']:.2f}x" if row["ratio"] else "-"]
        if with_errors:
            cells += [f"{row['max_abs_error']:.3g}", _fmt_psnr(row["psnr"]), f"{row['nrmse']:.2e}", "yes" if row["within_bound"] else "[red]NO[/]"]
        table.add_row(*cells)
    totals = ["total", "", "", "", "", f"{total['bits_per_value']:.2f}", f"{total['ratio']:.2f}x"]
    if with_errors:
        totals += [f"{total['max_abs_error']:.3g}", _fmt_psnr(total["psnr"]), f"{total['nrmse']:.2e}",
                   "yes" if total["within_bound"] else "[red]NO[/]"]
    table.add_row(*totals, style="bold")
    console.print(table)


def _round_json(label, out_path, report) -> dict:
    return {"input": label, "output": out_path, "round": report.round, "original_bytes": report.original_bytes,
            "compressed_bytes": report.compressed_bytes, "ratio": report.ratio, "bits_per_value": report.bits_per_value,
            "max_abs_error": report.max_abs_error, "psnr": _finite_or_none(report.psnr),
            "tensors": [_tensor_json(t, None) for t in report.tensors]}


def _emit_json(json_path, payload) -> None:
    if json_path is None:
        return
    text = json.dumps(payload, indent=2)
    if json_path == STDIO:  # (every byte or an error: a reader that stops early is not a success)
        _write_all(sys.stdout.buffer, (text + "\n").encode())
    else:
        from .state import atomic_write

        atomic_write(Path(json_path), (text + "\n").encode())


from .bench.cli import bench  # noqa: E402  (click registration; the command imports its work lazily)

main.add_command(bench)


if __name__ == "__main__":
    main()
