"""The pictures of the demo and the benchmark: matplotlib (Agg, files only).

The only module that imports matplotlib, and only when a picture is drawn: the suite and the
benchmarks run without it up to that point, and a missing matplotlib is ``PictureUnavailable``
(the commands then go on without the picture). What it draws comes in as measured data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .measure import ReloadRun

#: Colours per schedule in the benchmark picture (the same schedule keeps its colour).
SCHEDULE_COLOURS = {
    "lower bound": "#9e9e9e",
    "uwsgi_reload": "#1f77b4",
    "one at a time": "#ff7f0e",
    "2014 plan": "#d62728",
}


class PictureUnavailable(Exception):
    """matplotlib is not installed: no picture."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PictureUnavailable(
            f"no picture: matplotlib is not installed ({exc}); pip install 'uwsgi-reload[demo]'"
        ) from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def timeline_png(
    path: Path,
    runs: Sequence[tuple[str, ReloadRun]],
    *,
    total_vassals: int,
    minimum: int,
    title: str,
) -> Path:
    """One column per run (its name, its measured run), four panels each, over seconds since
    that run's load started: each vassal's reload (triggered to back), live vassals in the
    router, requests and failures per second, latency. The columns share their axes, so the
    runs compare at a glance."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = max([len(run.timeline) for _, run in runs] + [1])
    fig, axes = plt.subplots(
        4,
        len(runs),
        figsize=(1.5 + 6.0 * len(runs), 9),
        sharex=True,
        sharey="row",
        squeeze=False,
        gridspec_kw={"height_ratios": [max(1.0, rows / 4), 1, 1.2, 1.6]},
    )
    for column, (name, run) in enumerate(runs):
        _draw_run(axes[:, column], name, run, total_vassals, minimum, first=column == 0)
    latency_ax = axes[3, 0]
    latency_ax.set_yscale("log")
    # plain milliseconds (5, 50, 500), not powers of ten
    latency_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    latency_ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0, 0].invert_yaxis()  # shared by the row: once, or the second call undoes it
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(
        "seconds since the run's load started (shaded: the reload command ran)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _draw_run(
    axes: Sequence[Any], name: str, run: ReloadRun, total_vassals: int, minimum: int, first: bool
) -> None:
    report, live, vassals = run.load, run.live, run.timeline
    t0 = report.started
    gantt, live_ax, rate_ax, latency_ax = axes
    reload = report.reload
    if reload is not None:
        end = reload.ended if reload.ended is not None else report.ended
        for ax in axes:
            ax.axvspan(reload.started - t0, end - t0, color="#fff3cd", zorder=0)
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)

    during = report.during
    gantt.set_title(
        f"{name}: slowest request during the reload {during.max_ms:.0f} ms, "
        f"{report.total.failures} failed",
        fontsize=10,
    )
    for row, v in enumerate(vassals):
        if v.triggered is None:
            continue
        end = v.back if v.back is not None else report.ended
        colour = "#2ca02c" if v.back is not None else "#d62728"
        gantt.barh(row, end - v.triggered, left=v.triggered - t0, color=colour, height=0.6)
    gantt.set_yticks(range(len(vassals)), [v.name for v in vassals], fontsize=7)

    if live:
        xs = [s.t - t0 for s in live]
        live_ax.step(xs, [s.live for s in live], where="post", color="#1f77b4", lw=1)
    live_ax.axhline(minimum, color="#d62728", ls="--", lw=0.8, label=f"minimum {minimum}")
    live_ax.set_ylim(-0.3, total_vassals + 0.5)

    bucket = report.bucket_s
    # the last bucket is cut short by the end of the load: its rate would look like a drop
    series = [b for b in report.series if b.t + bucket <= report.ended - t0 + 1e-9]
    ts = [b.t for b in series]
    rate_ax.plot(ts, [b.requests / bucket for b in series], color="#1f77b4", lw=0.8)
    rate_ax.bar(
        ts,
        [b.failures / bucket for b in series],
        width=bucket,
        align="edge",
        color="#d62728",
        label="failed/s",
    )
    rate_ax.set_ylim(bottom=0)

    # a bucket without requests has no latency: a gap in the line, not a zero
    nan = float("nan")
    latency_ax.plot(ts, [b.max_ms if b.requests else nan for b in series], lw=0.8, label="max")
    latency_ax.plot(ts, [b.p99_ms if b.requests else nan for b in series], lw=0.8, label="p99")

    if first:
        gantt.set_ylabel("reloading")
        live_ax.set_ylabel("live nodes")
        live_ax.legend(loc="lower left", fontsize=7)
        rate_ax.set_ylabel("requests/s")
        rate_ax.legend(loc="lower left", fontsize=7)
        latency_ax.set_ylabel("latency ms\n(per 100 ms)")
        latency_ax.legend(loc="upper left", fontsize=7)


def bench_png(
    path: Path,
    groups: Sequence[str],
    makespans: Mapping[str, Sequence[float | None]],
    max_latency_ms: Mapping[str, Sequence[float | None]],
    title: str,
) -> Path:
    """Grouped bars per (N, m): makespan of each schedule, and its max latency during reload."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.9 * len(groups) + 2), 7))
    for ax, data, label in (
        (top, makespans, "makespan s"),
        (bottom, max_latency_ms, "max latency ms\nduring reload"),
    ):
        series = [name for name in data if any(v is not None for v in data[name])]
        width = 0.8 / max(1, len(series))
        for i, name in enumerate(series):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            values = [v if v is not None else 0.0 for v in data[name]]
            ax.bar(
                xs,
                values,
                width=width,
                label=name,
                color=SCHEDULE_COLOURS.get(name),
                hatch="//" if name == "lower bound" else None,
            )
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    bottom.set_yscale("log")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
