"""What KAP costs: ResNet18 training step / inference time (and peak GPU memory) per variant,
measured side by side in one run and printed as ratios to the plain model.

Variants: plain; NT(sigma) (noise only, no pool: the cost of drawing noise); KAP on activations;
KAP on weights (Eq. 3); KAP auto (the default: whichever of the two is smaller, per conv and call);
KAP auto + noise (the paper's training setting); the noise ones again with torch's own generator
instead of kapify's CPU noise kernel (``kapify/layers/fast_noise.py``; same on CUDA); plain and KAP
+ noise under ``torch.compile`` (its compilation in the warm-up); KAP folded into
plain conv weights (inference only); the same with square grids (ResNet18 re-widened 128 -> 144,
512 -> 576: what grid="square" costs at inference). Variants are interleaved repeat by repeat so that drift in
machine speed hits all alike; the median of the repeats is reported, warm-up excluded; CUDA events
time GPU runs.

    python benchmarks/overhead.py                                   # GPU: batch 256 @32px, 64 @224px
    python benchmarks/overhead.py --device cpu --cifar-batch 32 --imagenet-batch 8 --repeats 5
    python benchmarks/overhead.py --device cpu --scenarios cifar --cifar-batch 32,256   # batch-size sweep
    python benchmarks/overhead.py --device cpu --scenarios cifar --cifar-batch 32,256 --amp bf16 \
        --variants "plain,NT(sigma) noise only,KAP auto (sigma=0),KAP auto + noise"          # the noise cost in bf16

``--amp auto`` (default) is what the recipes run: bf16 autocast + channels_last on CUDA and on CPUs
with native bf16 (AMX / AVX512-BF16), fp32 elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
from torch import nn

import kapify
from kapify.layers.fast_noise import torch_generator
from kapify.models import small_image_stem
from kapify.precision import resolve_precision

SIGMA = 0.1
VARIANTS: Dict[str, dict] = {
    "plain": {},
    "NT(sigma) noise only": dict(pool=None, sigma=SIGMA),
    "NT(sigma) torch RNG": dict(pool=None, sigma=SIGMA, torch_rng=True),  # without kapify's CPU noise kernel
    "KAP activation": dict(impl="activation", sigma=0.0),
    "KAP weight": dict(impl="weight", sigma=0.0),
    "KAP auto (sigma=0)": dict(impl="auto", sigma=0.0),  # the default: filters or output, whichever is smaller per call
    "KAP auto + noise": dict(impl="auto", sigma=SIGMA),  # the paper's training setting
    "KAP auto + noise torch RNG": dict(impl="auto", sigma=SIGMA, torch_rng=True),
    "plain compiled": dict(compile=True),  # torch.compile(model), inductor (train and infer compile apart)
    "KAP auto + noise compiled": dict(impl="auto", sigma=SIGMA, compile=True),
    "KAP folded": dict(impl="auto", sigma=0.0, fold=True),
    "KAP square folded": dict(impl="auto", sigma=0.0, fold=True, grid="square"),
}


def build(variant: dict, small: bool, num_classes: int) -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    if small:
        model = small_image_stem(model)  # the CIFAR ResNet18 of the paper: 3x3 stride-1 stem, no max-pool
    if not variant or set(variant) == {"compile"}:
        return model
    options = {
        "grid": "rect",
        **{k: v for k, v in variant.items() if k not in ("fold", "torch_rng", "compile")},
    }  # rect: the plain model's widths
    kap = kapify.convert(
        model, k=3, example_input=torch.randn(1, 3, 32 if small else 224, 32 if small else 224), **options
    )
    return kapify.fold(kap) if variant.get("fold") else kap


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def bench(scenario: str, batch: int, size: int, args, device: torch.device) -> List[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    models = {name: build(VARIANTS[name], size <= 64, 10).to(device) for name in args.variants}
    precision = resolve_precision(args.amp, None, device)
    if precision.channels_last:
        x = x.to(memory_format=torch.channels_last)
        models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items()}
    optims = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in models.items()}
    models = {n: torch.compile(m) if VARIANTS[n].get("compile") else m for n, m in models.items()}
    clock = timer(device)
    amp = torch.autocast(device.type, dtype=precision.dtype or torch.bfloat16, enabled=precision.dtype is not None)

    def train_step(name: str) -> None:
        model, opt = models[name], optims[name]
        model.train()
        with amp, torch_generator() if VARIANTS[name].get("torch_rng") else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(name: str) -> None:
        model = models[name].eval()
        with torch.no_grad(), amp:
            model(x)

    times: Dict[tuple, List[float]] = {}
    memory: Dict[tuple, float] = {}
    for mode, fn in (("train", train_step), ("infer", infer)):
        names = [n for n in models if mode == "infer" or not VARIANTS[n].get("fold")]
        for rep in range(args.warmup + args.repeats):
            for name in names:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = clock(lambda: fn(name))
                if rep >= args.warmup:
                    times.setdefault((mode, name), []).append(t)
                    if device.type == "cuda":
                        memory[(mode, name)] = torch.cuda.max_memory_allocated() / 2**20
    rows = []
    for (mode, name), ts in times.items():
        median = statistics.median(ts)
        base = statistics.median(times[(mode, "plain")])
        rows.append(
            dict(
                scenario=scenario,
                batch=batch,
                size=size,
                precision=precision.describe(),
                mode=mode,
                variant=name,
                median_s=median,
                ratio=median / base,
                peak_mib=memory.get((mode, name)),
                mem_ratio=(memory[(mode, name)] / memory[(mode, "plain")]) if memory else None,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cifar-batch", default="256", help="batch size(s) at 32 px, comma-separated for a sweep (e.g. 32,256)"
    )
    parser.add_argument("--imagenet-batch", default="64", help="batch size(s) at 224 px, comma-separated")
    parser.add_argument("--scenarios", default="cifar,imagenet")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "none"],
        help="auto: bf16 + channels_last where the device runs them fast (as the recipes), else fp32",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or "plain" not in args.variants:
        parser.error(f"--variants must include 'plain' and name only {list(VARIANTS)}; unknown: {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = {"cifar": (args.cifar_batch, 32), "imagenet": (args.imagenet_batch, 224)}
    rows = []
    for scenario in args.scenarios.split(","):
        batches, size = plan[scenario]
        for batch in (int(b) for b in str(batches).split(",")):
            rows += bench(scenario, batch, size, args, device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {name}; torch {torch.__version__}; {rows[0]['precision']}; median of {args.repeats} (warm-up "
        f"{args.warmup})"
    )
    print(f"{'scenario':<10} {'mode':<6} {'variant':<22} {'median':>10} {'x plain':>8} {'peak MiB':>9}")
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(
            f"{r['scenario'] + '/' + str(r['batch']):<10} {r['mode']:<6} {r['variant']:<22} "
            f"{r['median_s'] * 1000:>8.1f}ms {r['ratio']:>7.2f}x {peak:>9}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
