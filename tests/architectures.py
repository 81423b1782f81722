"""Small random CNNs from the building blocks timm and torchvision use, drawn by hypothesis (issue 31).

A drawn architecture is a list of block specs (plain data, so hypothesis shrinks it to a short failing
example); :class:`RandomCNN` builds it as an ordinary ``nn.Module`` whose ``forward`` torch.fx traces.
Blocks (each keeps the channel count consistent with what it was drawn for):

- ``conv``: any conv kind: plain, grouped, depthwise, depth multiplier (groups = C, out = m x C), dilated,
  strided, then an optional norm (BatchNorm, GroupNorm, timm's LayerNorm2d) and activation;
- ``residual``: conv -> norm -> act -> conv, added to its input (optionally through a 1x1 projection);
- ``concat``: two conv branches concatenated on channels;
- ``split``: chunk / split / narrow / slice into two streams, one convolved, then concatenated or added back;
- ``gate``: a squeeze-excite gate (pool -> 1x1 -> act -> 1x1 -> sigmoid) or a spatial gate multiplying the stream;
- ``shuffle``: channel shuffle (view -> transpose -> reshape);
- ``pool``: max / avg / adaptive pooling, or nearest upsampling.

The head is a linear classifier on the pooled features or a 1x1 conv head.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from timm.layers import LayerNorm2d
from torch import nn

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "none": nn.Identity}


def _norm(kind: str, c: int, groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(groups if c % groups == 0 else 1, c)
    if kind == "ln":
        return LayerNorm2d(c)  # timm's LayerNorm over the channels of NCHW (ConvNeXt)
    return nn.Identity()


class ConvBlock(nn.Module):
    def __init__(self, cin: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, spec["out"], spec["k"], spec["stride"], padding=spec["dilation"] * (spec["k"] // 2),
                              dilation=spec["dilation"], groups=spec["groups"], bias=spec["bias"])  # fmt: skip
        self.norm = _norm(spec["norm"], spec["out"], spec["norm_groups"])
        self.act = ACTS[spec["act"]]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        mid = spec["mid"]
        self.conv1 = nn.Conv2d(c, mid, 3, padding=1, groups=spec["groups"], bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = ACTS[spec["act"]]()
        self.conv2 = nn.Conv2d(mid, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.proj = nn.Conv2d(c, c, 1, bias=False) if spec["project"] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(y + (self.proj(x) if self.proj is not None else x))


class Concat(nn.Module):
    def __init__(self, c: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, spec["a"], 1)
        self.b = nn.Conv2d(c, spec["b"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), F.relu(self.b(x))], dim=1)


class Split(nn.Module):
    """Cut the stream at ``first`` channels (how: chunk, split, narrow or slice), convolve the first part, then
    concatenate the parts again or add them (equal parts only)."""

    def __init__(self, c: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.how, self.merge, self.first = spec["how"], spec["merge"], spec["first"]
        self.conv = nn.Conv2d(self.first, self.first, 3, padding=1, groups=spec["groups"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "chunk":
            a, b = x.chunk(2, dim=1)
        elif self.how == "split":
            a, b = torch.split(x, [self.first, x.shape[1] - self.first], dim=1)
        elif self.how == "narrow":
            a, b = x.narrow(1, 0, self.first), x.narrow(1, self.first, x.shape[1] - self.first)
        else:
            a, b = x[:, : self.first], x[:, self.first :]
        a = self.conv(a)
        return a + b if self.merge == "add" else torch.cat([a, b], dim=1)


class Gate(nn.Module):
    def __init__(self, c: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.kind = spec["kind"]
        if self.kind == "se":
            self.reduce = nn.Conv2d(c, spec["hidden"], 1)
            self.expand = nn.Conv2d(spec["hidden"], c, 1)
        else:
            self.spatial = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "se":
            return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * torch.sigmoid(self.spatial(x))


class Shuffle(nn.Module):
    def __init__(self, c: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.groups = spec["groups"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Resample(nn.Module):
    def __init__(self, c: int, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.kind = spec["kind"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, 2, ceil_mode=True)
        if self.kind == "avg":
            return F.avg_pool2d(x, 3, 1, 1)
        if self.kind == "adaptive":
            return F.adaptive_avg_pool2d(x, 4)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


BLOCKS = {"conv": ConvBlock, "residual": Residual, "concat": Concat, "split": Split, "gate": Gate,
          "shuffle": Shuffle, "resample": Resample}  # fmt: skip


class RandomCNN(nn.Module):
    """The network an architecture (:func:`architectures`) describes: stem conv, blocks, head."""

    def __init__(self, arch: Dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.stem = nn.Conv2d(3, arch["stem"], 3, padding=1, bias=False)
        c, blocks = arch["stem"], []
        for spec in arch["blocks"]:
            blocks.append(BLOCKS[spec["block"]](c, spec))
            c = spec["c_out"]
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = arch["head"] == "conv"
        self.head = nn.Conv2d(c, 5, 1) if self.conv_head else nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        if self.conv_head:
            return self.head(x).mean((2, 3))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _block(draw, c: int) -> Dict[str, Any]:
    """One block spec for an input of ``c`` channels, with its output width ``c_out``."""
    kind = draw(st.sampled_from(sorted(BLOCKS)))
    if kind == "conv":
        conv_kind = draw(st.sampled_from(["plain", "grouped", "depthwise", "multiplier"]))
        if conv_kind == "plain":
            groups, out = 1, draw(st.integers(2, 20))
        elif conv_kind == "grouped":
            groups = draw(st.sampled_from(_divisors(c)))
            out = groups * draw(st.integers(1, max(1, 20 // groups)))
        elif conv_kind == "depthwise":
            groups, out = c, c
        else:
            groups, out = c, c * draw(st.integers(2, 3))
        spec = {
            "out": out,
            "groups": groups,
            "k": draw(st.sampled_from([1, 3])),
            "stride": draw(st.sampled_from([1, 2])),
            "dilation": draw(st.sampled_from([1, 2])),
            "bias": draw(st.booleans()),
            "norm": draw(st.sampled_from(["bn", "gn", "ln", "none"])),
            "norm_groups": draw(st.sampled_from([1, 2])),
            "act": draw(st.sampled_from(sorted(ACTS))),
        }
        return {"block": kind, **spec, "c_out": out}
    if kind == "residual":
        groups = draw(st.sampled_from(_divisors(c)))
        mid = groups * draw(st.integers(1, max(1, 16 // groups)))
        return {"block": kind, "mid": mid, "groups": groups, "act": draw(st.sampled_from(["relu", "silu"])),
                "project": draw(st.booleans()), "c_out": c}  # fmt: skip
    if kind == "concat":
        a, b = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return {"block": kind, "a": a, "b": b, "c_out": a + b}
    if kind == "split" and c >= 2:
        how = draw(st.sampled_from(["chunk", "split", "narrow", "slice"]))
        first = c // 2 if how == "chunk" or c % 2 == 0 and draw(st.booleans()) else draw(st.integers(1, c - 1))
        merge = "add" if 2 * first == c and c % 2 == 0 and draw(st.booleans()) else "cat"
        if how == "chunk" and c % 2:
            how = "split"  # chunk(2) of an odd count gives unequal parts; split says the sizes
        groups = draw(st.sampled_from(_divisors(first)))
        return {"block": kind, "how": how, "first": first, "merge": merge, "groups": groups,
                "c_out": first if merge == "add" else c}  # fmt: skip
    if kind == "gate":
        return {"block": kind, "kind": draw(st.sampled_from(["se", "spatial"])), "hidden": draw(st.integers(1, 8)),
                "c_out": c}  # fmt: skip
    if kind == "shuffle" and len(_divisors(c)) > 2:
        return {"block": kind, "groups": draw(st.sampled_from(_divisors(c)[1:-1])), "c_out": c}
    return {"block": "resample", "kind": draw(st.sampled_from(["max", "avg", "adaptive", "up"])), "c_out": c}


@st.composite
def architectures(draw, max_blocks: int = 5) -> Dict[str, Any]:
    """A random small CNN's description: ``{"stem": C, "blocks": [spec, ...], "head": "linear" | "conv"}``."""
    c = draw(st.integers(2, 12))
    arch: Dict[str, Any] = {"stem": c, "blocks": [], "head": draw(st.sampled_from(["linear", "conv"]))}
    for _ in range(draw(st.integers(1, max_blocks))):
        spec = draw(_block(c))
        arch["blocks"].append(spec)
        c = spec["c_out"]
    return arch
