"""``kapify`` command line: convert a timm/torchvision model and print (or save) its summary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kapify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a model and print its KAP summary")
    conv.add_argument("model", help="timm or torchvision model name, e.g. resnet18 or torchvision/mobilenet_v2")
    conv.add_argument("--k", type=int, default=3, help="KAP kernel size (odd)")
    conv.add_argument("--sigma", type=float, default=0.1, help="training noise std (0: no noise)")
    conv.add_argument("--pool", choices=["avg", "max", "none"], default="avg", help="avg=KAP, max=KMP, none=noise only")
    conv.add_argument(
        "--grid",
        default="square",
        help="channel layout: square (re-widen to perfect squares), rect (keep widths) or line",
    )
    conv.add_argument("--no-input-noise", dest="input_noise", action="store_false", help="no noise on the input")
    conv.add_argument("--exclude", nargs="*", default=None, help="conv name patterns to leave alone")
    conv.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    conv.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    conv.add_argument("--save", metavar="PATH", help="save the converted model (.safetensors)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    import kapify
    from kapify.reporting import summary

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    try:
        model = kapify.create_model(args.model, **kwargs)
        converted = kapify.convert(
            model,
            k=args.k,
            sigma=args.sigma,
            pool=None if args.pool == "none" else args.pool,
            grid=args.grid,
            input_noise=args.input_noise,
            exclude=args.exclude,
        )
    except (ValueError, NotImplementedError, kapify.TracingError) as err:
        print(f"kapify: error: {err}", file=sys.stderr)
        return 2
    report = summary(converted)
    print(report)
    converted.eval()
    with torch.no_grad():
        x = torch.rand(2, *kapify.surgery.tracing.example_input_shape(converted))
        out = converted(x)
    print(f"forward check: input {tuple(x.shape)} -> output {tuple(out.shape)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {args.json}")
    if args.save:
        kapify.save(converted, args.save)
        print(f"saved {args.save}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
