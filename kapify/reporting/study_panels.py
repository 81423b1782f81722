"""A study's panels (the paper's Fig. 4: robust accuracy against depth, K or σ, one line per model family) and the
paired differences behind them.

A study file may name panels; each has an x axis, its values and one or more lines, each line the runs at
those values (``recipes/studies/paper_fig4.yaml``)::

    panels:
      - {title: "Fig. 4a: depth", x: depth, values: [1, 2, 3],
         lines: {"NT(σ=0.1)": [nt_d1, nt_d2, nt_d3], "KAP(σ=0.1, K=3)": [kap_d1, kap_d2, kap_d3]}}

The comparisons: with two lines, the second against the first at each value (KAP − NT on the same images);
with one line, each value against the line's first (K = 3 and 5 against K = 1). Each is the paired
difference of the two runs' per-image results (``kapify.reporting.paired``) with its 95% interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .paired import PairedDifference, paired_rows, proportion_interval, read_per_image

__all__ = ["check_panels", "panel_comparisons", "panels_markdown", "plot_panels"]


def check_panels(panels: Any, run_names: List[str], where: str) -> List[Dict[str, Any]]:
    """``panels`` as the study file gives them, checked: a ValueError names what is wrong."""
    if panels is None:
        return []
    if not isinstance(panels, list):
        raise ValueError(f"{where}: 'panels' must be a list of {{title, x, values, lines}} entries")
    for i, panel in enumerate(panels):
        if not isinstance(panel, dict) or not {"title", "x", "values", "lines"} <= set(panel):
            raise ValueError(f"{where}: panel {i} needs title, x, values and lines, got {panel!r}")
        for label, runs in panel["lines"].items():
            if len(runs) != len(panel["values"]):
                raise ValueError(
                    f"{where}: panel {panel['title']!r}, line {label!r} names {len(runs)} runs for "
                    f"{len(panel['values'])} values"
                )
            unknown = [r for r in runs if r not in run_names]
            if unknown:
                raise ValueError(f"{where}: panel {panel['title']!r} names unknown run(s) {unknown}")
    return panels


def _pairs(panel: Dict[str, Any]) -> List[Tuple[Any, str, str]]:
    """(x value, run, against) for the panel's comparisons (see the module)."""
    lines = list(panel["lines"].values())
    if len(lines) >= 2:
        return [(x, b, a) for x, a, b in zip(panel["values"], lines[0], lines[1])]
    line = lines[0]
    return [(x, run, line[0]) for x, run in zip(panel["values"][1:], line[1:])]


def _per_image(out: Path, name: str) -> Optional[Dict[str, List[int]]]:
    """Every per-image row of a run's evaluation (each attack's folder), or None if it was not evaluated."""
    rows: Dict[str, List[int]] = {}
    for path in sorted((out / "eval" / name).glob("*/per_image.json")):
        rows.update(read_per_image(path))
    return rows or None


def panel_comparisons(study: Dict[str, Any], out: Path) -> List[Dict[str, Any]]:
    """Every panel's paired comparisons that both runs' evaluations allow: one dict per (panel, value, attack row)
    with the :class:`PairedDifference`."""
    found = []
    for panel in study.get("panels", []):
        for x, run, against in _pairs(panel):
            first, second = _per_image(out, run), _per_image(out, against)
            if first is None or second is None:
                continue
            for row, d in paired_rows(first, second).items():
                if not row.startswith("clean"):
                    found.append({"panel": panel["title"], "x": x, "run": run, "against": against, "attack": row,
                                  "paired": d})  # fmt: skip
    return found


def _pct(d: PairedDifference) -> Tuple[str, str]:
    lo, hi = d.ci95
    return f"{100 * d.difference:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def panels_markdown(study: Dict[str, Any], out: Path) -> str:
    """One section per panel: robust accuracy per line and value, then the paired differences."""
    rows = {r["name"]: r for r in study["rows"]}
    comparisons = panel_comparisons(study, out)
    lines: List[str] = []
    for panel in study.get("panels", []):
        columns = list(dict.fromkeys(c for runs in panel["lines"].values() for r in runs if r in rows
                                     for c in rows[r]["robust"]))  # fmt: skip
        header = f"| line | {panel['x']} | run | test | clean | " + " | ".join(columns) + " |"
        lines += [f"## {panel['title']}", "", header]
        lines.append("|---|---|---|---|---|" + "---|" * len(columns))
        for label, runs in panel["lines"].items():
            for x, run in zip(panel["values"], runs):
                r = rows.get(run)
                cells = [label, f"{x:g}" if isinstance(x, (int, float)) else str(x), run]
                if r is None:
                    lines.append("| " + " | ".join(cells + ["not run yet"] + [""] * (len(columns) + 1)) + " |")
                    continue
                cells += [_fmt(r.get("test_acc")), _fmt(r.get("clean"))] + [_fmt(r["robust"].get(c)) for c in columns]
                lines.append("| " + " | ".join(cells) + " |")
        mine = [c for c in comparisons if c["panel"] == panel["title"]]
        if mine:
            lines += ["", "Paired differences on the same images (percentage points, 95% interval):", "",
                      "| run | against | attack | difference | 95% interval | n | only run kept | only against kept |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for c in mine:
                d = c["paired"]
                diff, ci = _pct(d)
                cells = [c["run"], c["against"], c["attack"], diff, ci, str(d.n), str(d.first_only), str(d.second_only)]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def plot_panels(study: Dict[str, Any], out: Path) -> List[Path]:
    """One figure per panel (``panel-<i>.png``): robust accuracy against the panel's x, one subplot per attack and
    eps, one line per model family with each point's 95% (Wilson) interval on the attacked images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, n = {r["name"]: r for r in study["rows"]}, int(study["evaluation"]["n_examples"])
    written = []
    for i, panel in enumerate(study.get("panels", []), start=1):
        runs = [r for line in panel["lines"].values() for r in line if r in rows]
        columns = list(dict.fromkeys(c for r in runs for c in rows[r]["robust"]))
        if not columns:
            continue
        fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8), squeeze=False)
        for ax, column in zip(axes[0], columns):
            for label, line in panel["lines"].items():
                points = [(x, rows[r]["robust"][column]) for x, r in zip(panel["values"], line)
                          if r in rows and column in rows[r]["robust"]]  # fmt: skip
                if not points:
                    continue
                xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
                bounds = [proportion_interval(round(p[1] * n), n) for p in points]
                below = [y - 100 * lo for y, (lo, _) in zip(ys, bounds)]
                err = [below, [100 * hi - y for y, (_, hi) in zip(ys, bounds)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            attack, eps = column.split("@")
            ax.set_title(f"{attack}, L2 ε={eps}", fontsize=9)
            ax.set_xlabel(panel["x"])
            ax.set_ylabel(f"robust accuracy (%, n={n})")
            ax.set_xticks(panel["values"])
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.0) * 1.08)  # from 0, room above the highest interval
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(panel["title"])
        fig.tight_layout()
        path = out / f"panel-{i}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
