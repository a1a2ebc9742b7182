"""The bench's PNG: rate-distortion across the swept bounds, then per bound the compression
ratio of every round and the communication time per bandwidth. matplotlib is imported here
only, when plotting."""
from __future__ import annotations

STYLE = {  # method -> (colour, marker, line style)
    "gradzip": ("#08519c", "o", "-"),
    "gradzip-mt": ("#08306b", "o", ":"),
    "gradzip-nopred": ("#6baed6", "v", "--"),
    "gradzip-mag": ("#3182bd", "^", "--"),
    "gradzip-sign": ("#9ecae1", "<", "--"),
    "sz3": ("#d94801", "s", "-"),
    "sz3-1d": ("#fd8d3c", "D", "--"),
    "sz3-nopred": ("#fdae6b", "d", ":"),
    "zfp": ("#6a51a3", "P", "-"),
    "qsgd": ("#238b45", "X", "-"),
    "zstd": ("#525252", "*", "-"),
}


def _style(name: str):
    return STYLE.get(name, ("#999999", "o", "-"))


def plot(result: dict, path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    from .commtime import format_bandwidth

    entries = result["results"]
    n = len(entries)
    fig = plt.figure(figsize=(16, 5.2 + 4.4 * n), layout="constrained")
    grid = fig.add_gridspec(1 + n, 2, height_ratios=[1.2] + [1] * n)
    data = result["data"]
    fig.suptitle(title or f"gradzip bench: {data['rounds']} rounds, {data['tensors']} tensors, "
                          f"{data['original_bytes'] / 1e6:.1f} MB; mode {result['mode']}", fontsize=14, fontweight="bold")

    methods = list(entries[0]["methods"]) if entries else []
    labels = {name: entries[0]["methods"][name]["label"] for name in methods}

    # Rate-distortion: PSNR against bits per value, one line per method across the bounds.
    ax = fig.add_subplot(grid[0, :])
    for name in methods:
        points = sorted((e["methods"][name]["bits_per_value"], e["methods"][name]["psnr"]) for e in entries
                        if e["methods"].get(name) and e["methods"][name]["psnr"] is not None)
        colour, marker, line = _style(name)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker, linestyle=line, color=colour, label=labels[name], markersize=7, linewidth=1.8)
        elif name == "zstd" or all(e["methods"][name]["psnr"] is None for e in entries):
            bpv = entries[0]["methods"][name]["bits_per_value"]
            ax.axvline(bpv, color=colour, linestyle=":", linewidth=1.5, label=f"{labels[name]} (exact)")
    if methods:  # label the first method's points with their bound
        for e in entries:
            r = e["methods"][methods[0]]
            if r["psnr"] is not None:
                ax.annotate(f"{result['mode']} {e['error_bound']:g}", xy=(r["bits_per_value"], r["psnr"]), xytext=(6, -14),
                            textcoords="offset points", fontsize=9, color=_style(methods[0])[0])
    ax.set_xscale("log", base=2)
    low, high = ax.get_xlim()
    ax.xaxis.set_major_locator(FixedLocator([t for t in (0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
                                             if low <= t <= high]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel("bits per value (log scale; 32 = raw float32)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("rate-distortion across the swept bounds (up and left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=10, frameon=False, title="colours in every panel")

    for row, entry in enumerate(entries, start=1):
        eb = entry["error_bound"]
        tag = f"{result['mode']} {eb:g}"
        # Compression ratio per round.
        ax = fig.add_subplot(grid[row, 0])
        for name in methods:
            r = entry["methods"][name]
            colour, marker, line = _style(name)
            ax.plot([x["round"] for x in r["rounds"]], [x["ratio"] for x in r["rounds"]], marker=marker, linestyle=line,
                    color=colour, label=labels[name], markersize=5, linewidth=1.6)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("compression ratio")
        ax.set_title(f"compression ratio per round, {tag}")
        ax.grid(True, which="both", alpha=0.3)

        # Communication time per round at each bandwidth.
        ax = fig.add_subplot(grid[row, 1])
        bandwidths = result["bandwidths_bit_per_s"]
        width = 0.8 / (len(methods) + 1)
        first = entry["methods"][methods[0]] if methods else None
        for g, bw in enumerate(bandwidths):
            if first:
                raw = first["comm_time"][g]["raw_seconds"]
                ax.bar(g, raw, width, color="white", edgecolor="black", hatch="//", label="raw (uncompressed)" if g == 0 else None)
            for k, name in enumerate(methods, start=1):
                c = entry["methods"][name]["comm_time"][g]
                ax.bar(g + k * width, c["total_seconds"], width, color=_style(name)[0], label=None)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(bandwidths))], [format_bandwidth(bw) for bw in bandwidths])
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 4)  # room for the labels above the raw bars
        ax.set_ylabel("seconds per round (log)")
        ax.set_title(f"communication time per round, {tag}: compress + send + decompress")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if first:  # name the fastest method at each bandwidth
            # single-threaded methods only, as the baselines are (the time model assumes one thread)
            bounded = [m for m in methods if entry["methods"][m]["error_bounded"] and m != "gradzip-mt"] or methods
            for g in range(len(bandwidths)):
                best = min(bounded, key=lambda m: entry["methods"][m]["comm_time"][g]["total_seconds"])
                c = entry["methods"][best]["comm_time"][g]
                tallest = max([first["comm_time"][g]["raw_seconds"]] +
                              [entry["methods"][m]["comm_time"][g]["total_seconds"] for m in methods])
                ax.annotate(f"fastest bounded: {labels[best]}\n{-100 * c['reduction']:+.0f}% vs raw",
                            xy=(g + 0.4 - width / 2, tallest),
                            xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
        if first:
            ax.legend(fontsize=8, loc="upper right")  # colours as in the ratio panel
    fig.savefig(path, dpi=110)
    plt.close(fig)

