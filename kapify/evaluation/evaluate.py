"""``kapify.evaluation.evaluate``: robust accuracy of a model under a list of attacks, every
adversarial example verified, batches cached on disk so an interrupted run resumes."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..distributed import all_gather_tensor, all_reduce_sum
from ..files import write_atomically
from ..layers import GaussianNoise
from ..layers.input_stage import input_stages
from ..surgery.tracing import eval_mode
from .attacks import ATTACKS, AttackSpec
from .checks import verify_examples

__all__ = ["evaluate", "attack_mode", "predict"]


@contextlib.contextmanager
def attack_mode(model: nn.Module, test_noise: bool = False) -> Iterator[nn.Module]:
    """Eval mode with every kapify noise layer off (paper §4.1: attacks run noise-free); restored after.
    ``test_noise=True`` leaves test-time noise as :func:`kapify.set_noise` set it (a randomised defence)."""
    noise = [m for m in list(model.modules()) + input_stages(model) if isinstance(m, GaussianNoise)]
    flags = [m.test_time for m in noise]
    with eval_mode(model):
        for m in noise:
            m.test_time = m.test_time and test_noise
        try:
            yield model
        finally:
            for m, flag in zip(noise, flags):
                m.test_time = flag


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes; NaN/inf logits are an error, not a silent wrong answer."""
    logits = model(x)
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            "the model returned NaN/inf logits; check the checkpoint and the input range ([0, 1] pixels)"
        )
    return logits.argmax(1)


def _shard(n: int) -> tuple[int, int, torch.Tensor]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    return rank, world, torch.arange(rank, n, world)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[str] = ("clean", "pgd", "autoattack"),
    norm: str = "L2",
    eps: Union[float, Sequence[float]] = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    spec: Optional[AttackSpec] = None,
    return_examples: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    test_noise: bool = False,
    search_model: Optional[nn.Module] = None,
) -> Dict[str, Any]:
    """Accuracy of ``model`` on ``images`` (N,C,H,W in [0,1]) under each attack and each eps.

    An example counts as robust when the model classifies both it and its adversarial version
    correctly. Every adversarial example is checked (budget, [0,1] box, shape) before it counts;
    a violation raises :class:`~kapify.evaluation.checks.AdversarialExampleError`. Under torchrun
    each process attacks its share of the examples and the counts are summed.

    With ``test_noise=True`` the noise switched on by :func:`kapify.set_noise` stays on while attacking
    and scoring: use an attack that averages over it (``autoattack-rand``: EOT) to be adaptive.
    ``search_model`` (default ``model``) is what the attacks run on, e.g. a faster form of the same
    function (:func:`~kapify.evaluation.attack_model.attack_model`); every example is scored on ``model``.

    Returns ``{"results": [{attack, norm, eps, seed, accuracy, n, time_s, notes}], "examples":
    {(attack, eps): x_adv}, "correct": {(attack, eps): bool tensor (N,)}}`` (examples only with
    ``return_examples``; ``correct`` says which images stayed correct, in the order of ``images``:
    two models evaluated on the same images can be compared image by image).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
        >>> x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 4, (8,))
        >>> out = evaluate(model, x, y, attacks=["clean", "pgd"], progress=False)
        >>> [r["attack"] for r in out["results"]]
        ['clean', 'pgd']
    """
    eps_list = _checked(attacks, eps, images, labels)
    device = next(model.parameters()).device
    with attack_mode(model, test_noise), torch.no_grad():
        num_classes = model(images[:1].float().to(device)).shape[1]
    base = dataclasses.replace(spec or AttackSpec(), num_classes=num_classes)
    rank, world, index = _shard(images.shape[0])
    x_all, y_all = images[index].float().contiguous(), labels[index]
    results: List[Dict[str, Any]] = []
    examples: Dict[Any, torch.Tensor] = {}
    per_image: Dict[Any, torch.Tensor] = {}
    with attack_mode(model, test_noise):
        clean_correct = _correct(model, x_all, y_all, batch_size, device)
        for attack in attacks:
            for e in eps_list if attack != "clean" else eps_list[:1]:
                folder = None
                if cache_dir is not None:
                    name = f"{attack}-{norm}-eps{e:g}-seed{seed}-n{images.shape[0]}-bs{batch_size}-rank{rank}of{world}"
                    folder = Path(cache_dir) / name
                    folder.mkdir(parents=True, exist_ok=True)
                spec_e = dataclasses.replace(base, norm=norm, eps=e)
                run = _Attack(model, search_model or model, attack, spec_e, seed, return_examples)
                mine, advs, notes, elapsed = run.all_batches(
                    x_all, y_all, clean_correct, batch_size, folder, progress and rank == 0
                )
                per_image[(attack, e)] = _unshard(mine, index, images.shape[0], world)
                hits, total = all_reduce_sum([float(mine.sum()), float(mine.numel())], device)
                accuracy = hits / max(total, 1)
                results.append({"attack": attack, "norm": norm, "eps": e, "seed": seed, "accuracy": accuracy,
                                "n": int(total), "time_s": elapsed, "notes": notes})  # fmt: skip
                if return_examples and advs:
                    examples[(attack, e)] = _unshard(torch.cat(advs), index, images.shape[0], world)
    return {"results": results, "examples": examples, "correct": per_image}


def _checked(attacks: Sequence[str], eps: Union[float, Sequence[float]], images: torch.Tensor, labels: torch.Tensor):
    """The eps values; a ValueError naming what is wrong with the attacks, eps or shapes."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; available: {sorted(ATTACKS)}")
    eps_list = [float(e) for e in ([eps] if isinstance(eps, (int, float)) else eps)]
    if not eps_list or any(not e > 0 for e in eps_list):
        raise ValueError(f"eps must be > 0, got {eps}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return eps_list


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Per image: whether ``model`` classifies it correctly."""
    if not len(y):
        return torch.zeros(0, dtype=torch.bool)
    steps = range(0, len(y), batch_size)
    return torch.cat([predict(model, x[i : i + batch_size].to(device)).cpu() == y[i : i + batch_size] for i in steps])


@dataclasses.dataclass
class _Attack:
    """One attack at one eps over this process's images, batch by batch, each batch's result cached."""

    model: nn.Module  # scores the examples
    search_model: nn.Module  # the attack runs on it
    attack: str
    spec: AttackSpec
    seed: int
    keep_examples: bool

    def all_batches(self, x_all, y_all, clean_correct, batch_size: int, folder: Optional[Path], progress: bool):
        """(correct per image, adversarial batches if kept, the attack's notes, its seconds: those of the run that
        attacked each batch, cached or not)."""
        correct, advs, notes, seconds = [], [], [], 0.0
        desc = f"{self.attack} {self.spec.norm} eps={self.spec.eps:g}"
        for b in tqdm(range(0, len(y_all), batch_size), desc=desc, disable=not progress, leave=False):
            cached = folder / f"batch{b // batch_size:05d}.pt" if folder is not None else None
            x, y = x_all[b : b + batch_size], y_all[b : b + batch_size]
            batch_correct, x_adv, batch_notes, batch_seconds = self.batch(
                x, y, clean_correct[b : b + batch_size], b, cached
            )
            correct.append(batch_correct)
            seconds += batch_seconds
            notes.extend(n for n in batch_notes if n not in notes)
            if self.keep_examples:
                advs.append(x_adv)
        return (torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)), advs, notes, seconds

    def batch(self, x, y, clean, offset: int, cached: Optional[Path]):
        """One batch: its saved result, or the attack run, verified, scored and saved (whole or not at all)."""
        saved = _cached_batch(cached, len(y), self.keep_examples)
        if saved is not None:  # caches written before the time was saved count 0 s
            return saved["correct"], saved.get("x_adv"), [], float(saved.get("time_s", 0.0))
        started = time.perf_counter()
        device = next(self.model.parameters()).device
        x, y = x.to(device), y.to(device)
        x_adv, notes = ATTACKS[self.attack](self.search_model, x, y, self.spec, self.seed + offset)
        verify_examples(x, x_adv, self.spec.eps, self.spec.norm, self.attack)
        batch_correct = (predict(self.model, x_adv) == y).cpu() & clean
        x_adv = x_adv.detach().cpu()
        seconds = time.perf_counter() - started
        if cached is not None:
            saved = {"correct": batch_correct, "x_adv": x_adv if self.keep_examples else None, "time_s": seconds}
            write_atomically(cached, lambda tmp: torch.save(saved, tmp), "attack cache file")
        return batch_correct, x_adv, notes, seconds


def _cached_batch(path: Optional[Path], size: int, need_examples: bool) -> Optional[Dict[str, Any]]:
    """A batch's saved result, or None to attack it (again): none saved, or a file that is unreadable or
    does not hold this batch's ``size`` flags (a corrupt or foreign cache is reported and replaced)."""
    if path is None or not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        fits = saved["correct"].dtype == torch.bool and saved["correct"].shape == (size,)
        fits = fits and (not need_examples or (saved.get("x_adv") is not None and len(saved["x_adv"]) == size))
        problem = None if fits else "wrong contents"
    except Exception as err:  # truncated zip, wrong pickle, missing keys
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        warnings.warn(
            f"kapify-eval: ignoring the corrupt attack cache file {path} ({problem}); attacking that batch again",
            stacklevel=3,
        )
        return None
    return saved


def _unshard(part: torch.Tensor, index: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """The full (N, ...) tensor from each process's rows (``index`` = this process's rows)."""
    if world == 1:
        return part
    rows = all_gather_tensor(index.to(part.device))
    values = all_gather_tensor(part)
    full = torch.empty((n,) + tuple(part.shape[1:]), dtype=part.dtype)
    full[rows.cpu()] = values.cpu()
    return full
