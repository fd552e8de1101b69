"""``swapvae replay --plot PATH``: a histogram of a replay's latencies, as a PNG.

Two distributions of the same requests: the round trip the client measured (send to receipt)
and the time inside the server (request read off the socket to reply ready; the reply's
``server_ns``). The x axis is logarithmic, since a latency tail spans decades, with the p50,
p99 and p99.9 of each marked.

matplotlib is not a runtime dependency (a rig install has none): it is imported here only,
when a plot is asked for, and ``require_matplotlib`` says in one line what to install.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MARKS = (("p50", 50.0, ":"), ("p99", 99.0, "--"), ("p99.9", 99.9, "-"))


def require_matplotlib() -> None:
    """ValueError, in one line, when matplotlib cannot be imported (checked before a replay runs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--plot needs matplotlib, which cannot be imported ({e}): pip install matplotlib "
                         f"(or the [train] extra, which has it)") from None


def latency_histogram(series: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Write a histogram PNG of each named series of times (ns), on one log-scaled axis in us."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    us = {name: np.asarray(ns, np.float64) / 1e3 for name, ns in series.items() if len(ns)}
    if not us:
        raise ValueError("no latencies to plot")
    lo = max(min(float(v.min()) for v in us.values()), 0.1)
    hi = max(max(float(v.max()) for v in us.values()), lo * 1.01)
    edges = np.geomspace(lo, hi, 80)
    fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, v), colour in zip(us.items(), colours):
        ax.hist(np.clip(v, lo, hi), bins=edges, histtype="step", linewidth=1.5, color=colour,
                label=f"{name} (n = {len(v)})")
        for mark, q, style in MARKS:
            x = float(np.percentile(v, q))
            ax.axvline(x, color=colour, linestyle=style, linewidth=1,
                       label=f"{name} {mark} {x:.0f} us" if x >= 10 else f"{name} {mark} {x:.1f} us")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:g}"[0] in "25" else ""))
    ax.yaxis.set_major_formatter(plain)
    ax.set_xlabel("latency (us, log scale)")
    ax.set_ylabel("requests per bin (log scale)")
    ax.set_title(title or "latency")
    fig.legend(fontsize=8, loc="outside right upper")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
