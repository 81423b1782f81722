"""Write a study's results: study.json, study.md (one table) and pareto.png (clean vs robust accuracy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import write_text_atomically
from .study_panels import panel_comparisons, panels_markdown, plot_panels

__all__ = ["write_study_report", "study_markdown", "robust_columns"]


def robust_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """The ``attack@eps`` keys present in any row, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r["robust"]))


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def study_markdown(study: Dict[str, Any]) -> str:
    """One row per model: clean accuracy (full test set and the attacked subset), robust accuracy
    per attack and eps, first-layer topography score, training time."""
    rows, columns = study["rows"], robust_columns(study["rows"])
    ev = study["evaluation"]
    lines = [
        f"# Study: {study['study']}",
        "",
        study.get("description", "").strip(),
        "",
        f"Accuracy in % on {ev['n_examples']} fixed test images (seed {ev['seed']}), L2 attacks; "
        "'test' is the full test set. Topography: mean cosine similarity of grid-neighbour first-layer kernels "
        "minus that of all pairs.",
        "",
        "| model | pool | σ | K | epochs | test | clean | " + " | ".join(columns) + " | topography | train time |",
        "|---|---|---|---|---|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    for r in rows:
        k = (
            f"{r['k']}" + (f" (S={r['kap_stride']})" if r.get("kap_stride", 1) > 1 else "")
            if r["pool"] != "none"
            else "-"
        )
        parent = next((p for p in rows if p["name"] == r.get("init_from")), None)
        epochs = f"{r['epochs']}" + (f" (+{parent['epochs']} as {parent['label']})" if parent else "")
        cells = [
            r["label"],
            {"avg": "KAP", "max": "KMP", "none": "-"}[r["pool"]],
            f"{r['sigma']:g}",
            k,
            epochs,
            _pct(r.get("test_acc")),
            _pct(r.get("clean")),
        ] + [_pct(r["robust"].get(c)) for c in columns]
        minutes = r.get("train_time_s")
        cells += [f"{r['topography']:.3f}", f"{minutes / 60:.1f} min" if minutes else ""]
        lines.append("| " + " | ".join(cells) + " |")
    done = {r["name"] for r in rows}
    missing = [name for name in study.get("planned", []) if name not in done]
    if missing:
        count = f"Runs in: {len(done)} of {len(study['planned'])}"
        lines += ["", f"{count}. Not trained or evaluated yet: {', '.join(missing)}."]
    notes = [f"- {r['label']}: {n}" for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "Flags raised by the evaluation:", ""] + notes
    return "\n".join(lines) + "\n"


def _pareto_plot(study: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = study["rows"], robust_columns(study["rows"])
    if not columns:
        return
    fig, axes = plt.subplots(
        1, len(columns), figsize=(max(7.0, 4.2 * len(columns)), 4.5), squeeze=False
    )  # room for the title and labels
    style = {"avg": ("tab:red", "o", "KAP"), "max": ("tab:purple", "s", "KMP"), "none": ("tab:blue", "^", "NT(σ)")}
    for ax, column in zip(axes[0], columns):
        seen = set()
        for r in rows:
            if column not in r["robust"] or r.get("clean") is None:
                continue
            color, marker, label = style[r["pool"]]
            if r["objective"] != "standard":
                color, marker, label = "black", "D", r["objective"]
            ax.scatter(
                100 * r["clean"],
                100 * r["robust"][column],
                c=color,
                marker=marker,
                s=50,
                label=None if label in seen else label,
            )
            seen.add(label)
            ax.annotate(
                r["label"],
                (100 * r["clean"], 100 * r["robust"][column]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        attack, eps = column.split("@")
        top = max([100 * r["robust"][column] for r in rows if column in r["robust"]] + [5.0])
        ax.set_xlim(0, 100)  # axes from 0: small differences must look small
        ax.set_ylim(0, min(100.0, 1.2 * top))
        ax.set_title(f"{attack}, L2 ε={eps}")
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(study['study']).stem}: clean vs robust accuracy (up and right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study_report(study: Dict[str, Any], out: Path, mosaics: Optional[Dict[str, Any]] = None) -> None:
    """Write study.json, study.md, pareto.png and (given ``mosaics``: label -> kernel mosaic) kernels.png under
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    comparisons = [{**c, "paired": c["paired"].to_dict()} for c in panel_comparisons(study, out)]
    markdown = study_markdown(study) + ("\n" + panels_markdown(study, out) if study.get("panels") else "")
    for name, text in (("study.json", json.dumps({**study, "comparisons": comparisons}, indent=2)),
                       ("study.md", markdown)):  # fmt: skip
        write_text_atomically(out / name, text, "study results")
    _pareto_plot(study, out / "pareto.png")
    plot_panels(study, out)
    if mosaics:
        from .figures import plot_kernel_mosaics

        rows = {r["label"]: r for r in study["rows"]}
        panels = [
            (f"{label}\ngrid {rows[label]['grid']}, topography {rows[label]['topography']:.3f}", m)
            for label, m in mosaics.items()
            if label in rows
        ]
        plot_kernel_mosaics(
            panels, out / "kernels.png", title=f"{Path(study['study']).stem}: first-layer kernels on the channel grid"
        )
