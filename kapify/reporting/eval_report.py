"""Write ``kapify-eval`` results: results.json (schema ``kapify-eval/1``), results.md in the
paper's table layout, and PNG plots (accuracy vs eps, certified accuracy vs radius, kernels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..files import write_text_atomically

__all__ = ["write_report", "markdown_table"]


def _pct(acc: Dict[str, float]) -> str:
    return f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" if acc.get("std") else f"{100 * acc['mean']:.2f}"


def markdown_table(results: Dict[str, Any]) -> str:
    """Rows = eps, columns = attacks (the paper's Table 1 layout), plus noise/transfer/flags sections."""
    rows: List[Dict[str, Any]] = results["results"]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    eps_values = sorted({r["eps"] for r in rows if r["attack"] != "clean"}) or sorted({r["eps"] for r in rows})
    lookup = {(r["attack"], r["eps"]): r for r in rows}
    clean = next((r for r in rows if r["attack"] == "clean"), None)
    model = results.get("model") or {}
    lines = [
        f"# kapify-eval: {model.get('checkpoint') or model.get('name')}",
        "",
        f"{results['dataset']['name']}, {results['n_examples']} examples x {len(results['seeds'])} seed(s) "
        f"{results['seeds']}, {results['device']}; accuracy in % (mean ± std over seeds)."
        + (
            " Test-time noise ON while attacking and scoring (randomised defence)."
            if results["config"].get("test_noise")
            else ""
        ),
        "",
        "| norm | eps | " + " | ".join(attacks) + " |",
        "|---|---|" + "---|" * len(attacks),
    ]
    norm = rows[0]["norm"] if rows else ""
    for e in eps_values:
        cells = [
            _pct(clean["accuracy"])
            if a == "clean" and clean
            else (_pct(lookup[(a, e)]["accuracy"]) if (a, e) in lookup else "")
            for a in attacks
        ]
        lines.append(f"| {norm} | {e:g} | " + " | ".join(cells) + " |")
    if "noise_sensitivity" in results:
        ns = results["noise_sensitivity"]
        lines += [
            "",
            f"## Noise sensitivity ({ns['attack']} examples, eps={ns['eps']:g}; Table 2)",
            "",
            f"Protocol: {ns.get('protocol', 'non-adaptive')}.",
            "",
            "| input noise | activation noise | accuracy |",
            "|---|---|---|",
        ]
        lines += [
            f"| {'✓' if r['input_noise'] else '×'} | {'✓' if r['activation_noise'] else '×'} | "
            f"{100 * r['accuracy']:.2f} |"
            for r in ns["rows"]
        ]
    if "transfer" in results:
        lines += [
            "",
            f"## Transfer from {results['transfer']['reference']} (Table A3)",
            "",
            "| attack | eps | accuracy |",
            "|---|---|---|",
        ]
        lines += [f"| {r['attack']} | {r['eps']:g} | {_pct(r['accuracy'])} |" for r in results["transfer"]["results"]]
    if "certification" in results:
        c = results["certification"]
        lines += [
            "",
            f"## Certified accuracy (sigma={c['sigma']}, n0={c['n0']}, n={c['n']}, alpha={c['alpha']})",
            "",
            "| radius | " + " | ".join(f"{r:g}" for r in c["radii"][::2]) + " |",
            "|---|" + "---|" * len(c["radii"][::2]),
            "| accuracy % | " + " | ".join(f"{100 * a:.1f}" for a in c["certified_accuracy"][::2]) + " |",
        ]
    if "diagnostics" in results:
        t = results["diagnostics"]["topography"]
        lines += [
            "",
            f"## Topography of {results['diagnostics']['first_conv']} (grid {results['diagnostics']['grid']})",
            "",
            f"neighbour cosine similarity {t['neighbour']:.3f} vs all pairs {t['all_pairs']:.3f}: score "
            f"{t['score']:.3f}",
        ]
    lines += ["", "## Flags", ""]
    lines += [f"- **{f['kind']}**: {f['message']}" for f in results["flags"]] or ["none"]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _accuracy_vs_eps(results: Dict[str, Any], out: Path) -> Optional[str]:
    """Fig. 5: robust accuracy against eps, one line per attack (with an eps sweep)."""
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] if r["attack"] != "clean"]
    if len({r["eps"] for r in rows}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for attack in dict.fromkeys(r["attack"] for r in rows):
        pts = sorted(
            (r["eps"], 100 * r["accuracy"]["mean"], 100 * r["accuracy"]["std"]) for r in rows if r["attack"] == attack
        )
        xs, ys, errors = zip(*pts)
        ax.errorbar(xs, ys, yerr=errors, marker="o", label=attack, capsize=3)
    ax.set(
        xlabel=f"eps ({rows[0]['norm']})", ylabel="robust accuracy (%)", ylim=(0, 100), title="Robust accuracy vs eps"
    )
    ax.legend()
    return _save(fig, out / "accuracy_vs_eps.png")


def _certified_accuracy(results: Dict[str, Any], out: Path) -> Optional[str]:
    """Fig. 6: certified accuracy against the L2 radius."""
    import matplotlib.pyplot as plt

    c = results.get("certification")
    if not c:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(c["radii"], [100 * a for a in c["certified_accuracy"]], marker=".")
    title = f"Randomized smoothing, sigma={c['sigma']}"
    ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)", ylim=(0, 100), title=title)
    return _save(fig, out / "certified_accuracy.png")


def _kernels(results: Dict[str, Any], out: Path, mosaics: List[Any]) -> Optional[str]:
    """Fig. 7: the first layer's kernels on the channel grid (the reference model's beside them)."""
    if not mosaics:
        return None
    from .figures import plot_kernel_mosaics

    def short(path: Any) -> str:  # run folder + file name: what tells two checkpoints apart
        return "/".join(Path(str(path)).parts[-2:]) if path else "model"

    d = results["diagnostics"]
    described = [(short((results.get("model") or {}).get("checkpoint")), d)]
    if "reference" in d:
        described.append((f"reference {short(d['reference']['checkpoint'])}", d["reference"]))
    panels = [
        (f"{who}\n{part['first_conv']}, grid {part['grid']}, topography {part['topography']['score']:.3f}", mosaic)
        for (who, part), mosaic in zip(described, mosaics)
    ]
    plot_kernel_mosaics(panels, out / "first_layer_kernels.png")
    return "first_layer_kernels.png"


def _activation_change(results: Dict[str, Any], out: Path) -> Optional[str]:
    """Fig. A4: the normalised activation change under attack, per conv layer in forward order."""
    import matplotlib.pyplot as plt

    change = (results.get("diagnostics") or {}).get("activation_change")
    if not change:
        return None
    names = list(change["layers"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.plot(range(len(names)), list(change["layers"].values()), marker="o")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    title = f"Activation change ({change['attack']}, eps={change['eps']:g})"
    ax.set(xlabel="conv layer (forward order)", ylabel="||f(x_adv) - f(x)|| / ||f(x)||", title=title)
    return _save(fig, out / "activation_change.png")


def _plots(results: Dict[str, Any], out: Path, mosaics: List[Any]) -> List[str]:
    """Every plot the results call for; the names of the files written."""
    import matplotlib

    matplotlib.use("Agg")
    written = [
        _accuracy_vs_eps(results, out),
        _certified_accuracy(results, out),
        _kernels(results, out, mosaics),
        _activation_change(results, out),
    ]
    return [name for name in written if name]


def write_report(results: Dict[str, Any], out: Path, mosaics: Sequence[torch.Tensor] = ()) -> None:
    """Write results.json, results.md and the plots into ``out``; ``mosaics``: the first-layer kernel mosaics of
    the diagnostics section (this model's, then the reference model's)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = _plots(results, out, list(mosaics))
    write_text_atomically(out / "results.json", json.dumps(results, indent=2), "results")
    write_text_atomically(out / "results.md", markdown_table(results), "results table")
