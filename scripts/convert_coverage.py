"""Coverage of ``kapify.convert`` over timm's and torchvision's model zoos (not a test).

For every timm model name with a convolution (parameters counted on the meta device; models over
``--max-params`` are skipped as too big for a 24 GB CPU machine) and every torchvision
classification model: build it (pretrained=False), convert it, run the converted model in eval
mode and check the output shape and that every conv the eager model calls is pooled.
Results stream to a JSONL file (a rerun resumes), then a Markdown report is written.

    python scripts/convert_coverage.py        # everything: results/coverage/square.{jsonl,md} (hours on 2 cores)
    python scripts/convert_coverage.py --timm 'resnet*' --no-torchvision
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings

import torch


class _Timeout(BaseException):  # not an Exception: no fallback inside convert may swallow it and go on
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


def check_model(build, timeout: int, grid: str = "square") -> dict:
    import kapify
    from kapify.surgery.conv_types import is_conv
    from kapify.surgery.kap_conv import is_kap_conv
    from kapify.surgery.tracing import example_input

    signal.alarm(timeout)
    start = time.time()
    try:
        model = build().eval()
        x = example_input(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kap = kapify.convert(model, k=3, sigma=0.1, grid=grid, example_input=x).eval()
        unpooled, handles = set(), []
        for name, module in kap.named_modules():  # every conv the forward calls must be pooled
            if is_conv(module) and not is_kap_conv(module):
                handles.append(module.register_forward_hook(lambda m, i, o, n=name: unpooled.add(n)))
        with torch.no_grad():
            out = kap(x)
        for h in handles:
            h.remove()
        unpooled = sorted(unpooled)
        want_shape = (1, model.num_classes) if getattr(model, "num_classes", 0) else None
        if want_shape is None:
            with torch.no_grad():
                want_shape = tuple(model(x).shape)
        shapes_ok = isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(want_shape)
        if unpooled:
            return {"status": "failed", "reason": f"convs left unpooled: {unpooled[:3]}"}
        if not shapes_ok:
            return {"status": "failed", "reason": "output shape changed"}
        cfg = kapify.get_config(kap)
        extra = {}
        if grid == "square":  # re-widening must preserve the function, and most grids should be square
            from kapify.surgery.rewiden import RewidenError

            try:
                wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
                with torch.no_grad():
                    want, got = model(x), wide(x)
                scale = max(1.0, want.abs().max().item())
                extra["preserved"] = bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * scale))
                extra["preserve_err"] = float((got - want).abs().max().item() / scale)
            except RewidenError:  # convert fell back to rect widths (warned); nothing was widened
                extra["preserved"] = True
            report = kapify.summary(kap)
            spare = set(report.spare_filters)  # width fixed, pooled on a square sheet with spare filters
            extra["square_layers"] = sum(1 for r in cfg.layers if math.isqrt(r.out_channels) ** 2 == r.out_channels)
            extra["spare_layers"] = len(spare)
            extra["params_ratio"] = round(report.params_after / max(1, report.params_before), 3)
            kinds = collections.Counter(_reason_kind(why) for n, why in cfg.fixed_widths.items() if n not in spare)
            extra["bound_layers"] = kinds.pop(
                "model output", 0
            )  # the logits conv (a headless model's features): may stay
            extra["fixed"] = dict(kinds.most_common())
            extra["spare"] = dict(
                collections.Counter(_reason_kind(cfg.fixed_widths.get(n, "")) for n in spare).most_common()
            )
        notes = sorted({str(w.message).split(":")[1].strip()[:60] for w in caught if "not trusted" in str(w.message)})
        return {
            "status": "converted",
            "convs": len(cfg.layers),
            "functional": len(cfg.skipped),
            "routes": sorted({r.route for r in cfg.layers}),
            "notes": notes,
            "seconds": round(time.time() - start, 2),
            **extra,
        }
    except _Timeout:
        return {"status": "failed", "reason": f"timeout > {timeout}s"}
    except Exception as err:  # the report groups these
        return {"status": "failed", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        signal.alarm(0)


def _reason_kind(why: str) -> str:
    """A fixed-width reason without node and module names, so that the report can count models per kind."""
    why = re.sub(r"'[^']*'", "'.'", why.split(": re-widening broke")[0])
    why = re.sub(r"\b([a-z]+(?:_[a-z]+)*)_\d+\b", r"\1", why)  # view_23 -> view
    return re.sub(r"\b\d+\b", "N", why)[:80]


def timm_candidates(patterns, max_params):
    import timm

    for name in timm.list_models():
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        try:
            with torch.device("meta"):
                meta = timm.create_model(name, pretrained=False)
        except Exception as err:
            yield name, {"status": "failed", "reason": f"build on meta device: {type(err).__name__}: {err}"[:300]}
            continue
        from kapify.surgery.conv_types import is_conv

        if not any(is_conv(m) for m in meta.modules()):
            yield name, {"status": "no-conv"}
            continue
        params = sum(p.numel() for p in meta.parameters())
        if params > max_params:
            yield name, {"status": "skipped", "reason": f"{params / 1e6:.0f}M params > {max_params / 1e6:.0f}M"}
            continue
        yield name, (lambda n=name: timm.create_model(n, pretrained=False))


def torchvision_candidates():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        yield f"torchvision/{name}", (lambda n=name: torchvision.models.get_model(n, weights=None))


def _fully_square(r: dict) -> bool:
    """Every pooled conv square, except those whose output is the model's output (logits)."""
    return r["square_layers"] + r.get("bound_layers", 0) == r["convs"]


def _params_line(done: dict) -> str:
    """How much the conversion grew the models' parameter counts (re-widening and spare filters)."""
    ratios = sorted((r["params_ratio"], n) for n, r in done.items() if "params_ratio" in r)
    if not ratios:
        return "- parameters after / before: not recorded in this run"
    return (
        f"- parameters after / before conversion: median {ratios[len(ratios) // 2][0]:.2f}x, 90th percentile "
        f"{ratios[int(0.9 * (len(ratios) - 1))][0]:.2f}x, largest {ratios[-1][0]:.2f}x ({ratios[-1][1]}); "
        f"over 2x: {sum(r > 2 for r, _ in ratios)} models"
    )


def _kinds(r: dict) -> dict:
    fixed = r.get("fixed", {})
    return fixed if isinstance(fixed, dict) else {k: 1 for k in fixed}  # older rows list up to 3 kinds


def write_report(rows: dict, path: str, grid: str = "square", limit=None, compare: tuple = None) -> None:
    sample = f" --limit {limit}" if limit else ""
    lines = [
        "# `kapify.convert` coverage",
        "",
        f"Produced by `python scripts/convert_coverage.py --grid {grid}{sample}` (k=3, sigma=0.1, pool=avg; eval-mode "
        "forward at each model's default input size; a model counts as converted when every conv its eager "
        "forward calls is pooled and the output shape is unchanged). With grid=square, 'function preserved' "
        "is `kapify.rewiden(model, 'square', function_preserving=True)` matching the original model's "
        "outputs; `convert` itself also widens channel-normalised groups (LayerNorm/GroupNorm). 'Fully square': "
        "every pooled conv has a square grid except a conv whose output is the model's output (the logits of a "
        "conv head), which keeps its width. A conv whose width stays non-square is counted square when it pools on a "
        "square sheet with spare filters (an ungrouped conv whose width C is fixed gets the next square number of "
        "filters and passes on the first C); the lines 'by width alone' count without them.",
        "",
    ]
    for zoo, keep in (
        ("timm", lambda n: not n.startswith("torchvision/")),
        ("torchvision", lambda n: n.startswith("torchvision/")),
    ):
        sub = {n: r for n, r in rows.items() if keep(n)}
        if not sub:
            continue
        counts = collections.Counter(r["status"] for r in sub.values())
        tried = counts["converted"] + counts["failed"]
        rate = 100 * counts["converted"] / tried if tried else 0.0
        lines += [
            f"## {zoo}",
            "",
            f"- models with a convolution tried: {tried}; converted: {counts['converted']} ({rate:.1f}%); "
            f"failed: {counts['failed']}",
            f"- skipped as too big for this CPU machine: {counts['skipped']}; without any convolution: "
            f"{counts['no-conv']}",
            f"- graph not trusted (module-walk fallback used): {sum(1 for r in sub.values() if r.get('notes'))}",
        ]
        done = {n: r for n, r in sub.items() if r["status"] == "converted" and "preserved" in r}
        if done:
            layers = sum(r["convs"] for r in done.values())
            square = sum(r["square_layers"] for r in done.values())
            bound = sum(r.get("bound_layers", 0) for r in done.values())
            full = sum(_fully_square(r) for r in done.values())
            spare = sum(r.get("spare_layers", 0) for r in done.values())
            bound_spare = sum(
                r.get("spare", {}).get("model output", 0) for r in done.values()
            )  # logits convs: may stay
            by_width = sum(
                _fully_square(r) and r.get("spare_layers", 0) == r.get("spare", {}).get("model output", 0)
                for r in done.values()
            )
            mostly_square = sum(
                r["square_layers"] + r.get("bound_layers", 0) >= 0.9 * r["convs"] for r in done.values()
            )
            lines += [
                f"- grid=square: re-widening preserved the function (float32 rounding) in "
                f"{sum(r['preserved'] for r in done.values())}/{len(done)} models",
                f"- **fully square: {full}/{len(done)} models ({100 * full / len(done):.1f}%)**; "
                f"at least 90% square: {mostly_square}/{len(done)}",
                f"- **pooled convs with a square grid: {square}/{layers} ({100 * square / max(layers, 1):.1f}%)**; "
                f"{bound} more output the logits and keep their width "
                f"({100 * (square + bound) / max(layers, 1):.1f}% square or output-bound)",
                f"- by width alone (spare filters not counted; a logits conv excepted): fully square "
                f"{by_width}/{len(done)} "
                f"models ({100 * by_width / len(done):.1f}%); {square - spare}/{layers} pooled convs square "
                f"({100 * (square - spare) / max(layers, 1):.1f}%), {bound_spare} more output the logits; {spare} "
                f"convs in "
                f"{sum(bool(r.get('spare_layers')) for r in done.values())} models have spare filters",
                _params_line(done),
                "- largest output error of the models not preserved (relative to max(1, |logit|)): "
                + (
                    ", ".join(
                        f"{n} {r['preserve_err']:.1e}"
                        for n, r in done.items()
                        if not r["preserved"] and "preserve_err" in r
                    )
                    or "-"
                ),
            ]
            for title, kinds_of in (
                ("Why convs kept a rectangular grid, by kind, in the models not fully square", _kinds),
                ("Why widths stayed non-square where spare filters fill the sheet", lambda r: r.get("spare", {})),
            ):
                lines += [
                    "",
                    f"{title} (models, convs, examples):",
                    "",
                    "| reason | models | convs | e.g. |",
                    "|---|---|---|---|",
                ]
                by_kind = collections.defaultdict(list)
                for n, r in done.items():
                    for kind, count in kinds_of(r).items():
                        by_kind[kind].append((n, count))
                for kind, hits in sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                    names = ", ".join(n.replace("torchvision/", "") for n, _ in hits[:5]) + (
                        " ..." if len(hits) > 5 else ""
                    )
                    lines.append(f"| {kind.replace('|', '/')} | {len(hits)} | {sum(c for _, c in hits)} | {names} |")
        lines.append("")
        reasons = collections.defaultdict(list)
        for n, r in sub.items():
            if r["status"] == "failed":
                reasons[r["reason"].split(":")[0] + ": " + r["reason"].split(":", 1)[-1][:120]].append(n)
        if reasons:
            lines += ["| failure | models |", "|---|---|"]
            for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
                lines.append(
                    f"| {reason.replace('|', '/')} | {len(names)}: "
                    f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''} |"
                )
            lines.append("")
    if compare:
        lines += _comparison(rows, *compare)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _comparison(rows: dict, before: dict, label: str) -> list:
    """Against an earlier run (``--compare``): models that stopped converting, square counts, convert time."""
    both = [n for n in rows if n in before and rows[n]["status"] == before[n]["status"] == "converted"]
    lost = sorted(
        n for n in before if before[n]["status"] == "converted" and n in rows and rows[n]["status"] != "converted"
    )
    ratios = sorted(rows[n]["seconds"] / before[n]["seconds"] for n in both if before[n].get("seconds"))
    was = sum(before[n]["square_layers"] == before[n]["convs"] for n in both if "square_layers" in before[n])
    now = sum(_fully_square(rows[n]) for n in both if "square_layers" in rows[n])
    lines = [
        f"## Compared with the earlier run ({label})",
        "",
        f"- models converted in both runs: {len(both)}; converted before but not now: {len(lost)}"
        + (f" ({', '.join(lost)})" if lost else ""),
        f"- fully square among them: {was} before (no output-bound exception), {now} now",
        f"- pooled square convs: {sum(before[n].get('square_layers', 0) for n in both)} before, "
        f"{sum(rows[n].get('square_layers', 0) for n in both)} now",
    ]
    if ratios:
        lines.append(
            f"- convert + check time per model, now / before: median {ratios[len(ratios) // 2]:.2f}x, "
            f"90th percentile {ratios[int(0.9 * (len(ratios) - 1))]:.2f}x, total "
            f"{sum(rows[n]['seconds'] for n in both) / sum(before[n]['seconds'] for n in both):.2f}x"
        )
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default=None, help="output prefix (.jsonl and .md are written; default results/coverage/<grid>)"
    )
    parser.add_argument("--timm", nargs="*", default=None, help="fnmatch patterns of timm names (default: all)")
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th model from the i-th (parallel workers)")
    parser.add_argument("--grid", default="square", choices=["square", "rect", "line"], help="convert's grid option")
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N timm names of the seeded order (a sample)"
    )
    parser.add_argument("--report-only", action="store_true", help="only rewrite the Markdown report from the JSONL")
    parser.add_argument(
        "--compare", default=None, help="an earlier run's JSONL: report regressions, square counts and time against it"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    shard, shards = (int(v) for v in args.shard.split("/"))
    signal.signal(signal.SIGALRM, _alarm)
    args.out = args.out or f"results/coverage/{args.grid}"
    jsonl = args.out + ".jsonl"
    rows = {}
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            rows = {r["model"]: r for r in map(json.loads, f)}
    candidates = []
    if args.report_only:
        args.no_torchvision = args.no_timm = True
    if not args.no_torchvision:
        candidates += list(torchvision_candidates())
    if not args.no_timm:
        timm_list = list(timm_candidates(args.timm, args.max_params))
        random.Random(0).shuffle(timm_list)  # a run cut short is still a sample across all families
        timm_list = timm_list[: args.limit]
        candidates += timm_list
    with open(jsonl, "a") as f:
        for i, (name, build) in enumerate(candidates):
            if name in rows or i % shards != shard:
                continue
            result = build if isinstance(build, dict) else check_model(build, args.timeout, args.grid)
            rows[name] = {"model": name, **result}
            f.write(json.dumps(rows[name]) + "\n")
            f.flush()
            print(f"[{i + 1}/{len(candidates)}] {name}: {result['status']} {result.get('reason', '')}", flush=True)
    compare = None
    if args.compare:
        with open(args.compare) as f:
            compare = ({r["model"]: r for r in map(json.loads, f)}, f"`{args.compare}`")
    write_report(rows, args.out + ".md", args.grid, args.limit, compare)
    print(f"wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
