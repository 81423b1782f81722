"""A study: several training runs evaluated the same way, summarised in one table and a Pareto plot.

A study file (YAML) names the runs (a recipe config plus overrides each), overrides shared by
all runs, and one evaluation spec::

    output: runs/studies/cpu_sigma_sweep
    train: {epochs: 30, data_dir: ../shared/data, download: false}
    runs:
      - {name: nt_s0.1, config: recipes/configs/cifar10_convnet3_nt.yaml, overrides: {sigma: 0.1}}
      - {name: kap_s0.1, config: recipes/configs/cifar10_convnet3_kap.yaml, overrides: {sigma: 0.1}}
      - {name: kap_ft, config: recipes/configs/cifar10_convnet3_kap.yaml, init_from: nt_s0.1,
         overrides: {epochs: 5, kap_warmup_epochs: 2}}   # fine-tune nt_s0.1's weights (--initial-checkpoint)
    evaluation:
      n_examples: 500
      attacks: [{attack: autoattack, eps: [0.25, 0.5, 1.0]}, {attack: square, eps: [0.5]}]
      options: {square_queries: 5000}   # any other kapify-eval option (EvalConfig field)

Each run trains with :func:`kapify.training.train` (a finished run is skipped, an interrupted one
resumes) and is evaluated through :func:`kapify.evaluation.run_evaluation` on the same test images
with the same seed (its batch cache resumes too). ``study.json``, ``study.md``, ``pareto.png`` and
``kernels.png`` (first-layer kernels of every run on its grid) are rewritten after every run, so a
crash loses at most the run in flight.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ..options import build_parser, option
from ..reporting.study_panels import check_panels
from .compiling import COMPILE_MODES
from .config import TrainConfig, parse_args

__all__ = ["StudyConfig", "run_study", "main"]


@dataclass
class StudyConfig:
    """Options of ``recipes/study.py --config STUDY.yaml``; they override the study file's ``train`` block."""

    out: Optional[str] = option(None, "output folder (default: the study file's 'output')")
    data_dir: Optional[str] = option(None, "data folder for training and evaluation")
    download: Optional[bool] = option(None, "download the dataset when absent")
    epochs: Optional[int] = option(None, "override every run's epochs (quick looks; the table says so)")
    train_samples: Optional[int] = option(None, "train every run on a subset of this size")
    n_examples: Optional[int] = option(None, "override the evaluation's number of test examples")
    device: Optional[str] = option(None, "auto, cuda or cpu")
    compile: Optional[str] = option(
        None,
        "torch.compile mode of every run (see train_timm.py --compile; default: the runs' own, auto)",
        choices=list(COMPILE_MODES),
    )
    only: Optional[str] = option(
        None, "comma-separated run names to train and evaluate now (the table keeps the others' earlier rows)"
    )
    stage: str = option(
        "all",
        "all: train and evaluate each run in turn; train: train only, write no report; evaluate: evaluate the runs "
        "whose training finished and skip the rest (so it can run beside a 'train' invocation)",
        choices=["all", "train", "evaluate"],
    )
    progress: bool = option(True, "progress bars")


def _load_study(path: str) -> Dict[str, Any]:
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    runs = spec.get("runs")
    if (
        not isinstance(runs, list)
        or not runs
        or not all(isinstance(r, dict) and "name" in r and "config" in r for r in runs)
    ):
        raise ValueError(f"{path}: 'runs' must be a list of {{name, config, overrides}} entries")
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names must be unique, got {names}")
    for i, run in enumerate(runs):
        if "init_from" in run and run["init_from"] not in names[:i]:
            raise ValueError(
                f"{path}: run {run['name']!r} has init_from {run['init_from']!r}, which must name an earlier run "
                f"(earlier: {names[:i]})"
            )
    attacks = (spec.get("evaluation") or {}).get("attacks") or []
    if not all(isinstance(a, dict) and "attack" in a and "eps" in a for a in attacks):
        raise ValueError(f"{path}: evaluation.attacks must be a list of {{attack, eps: [..]}} entries")
    spec["panels"] = check_panels(spec.get("panels"), names, path)
    return spec


def _train_config(run: Dict[str, Any], shared: Dict[str, Any], forced: Dict[str, Any], runs_dir: Path) -> TrainConfig:
    """The run's recipe config <- the study's ``train`` block <- the run's overrides <- command-line options."""
    cfg = parse_args(["--config", run["config"]])
    values = {**shared, **(run.get("overrides") or {}), **forced, "output": str(runs_dir), "experiment": run["name"]}
    if "init_from" in run:  # fine-tune: start from an earlier run's final weights
        values["initial_checkpoint"] = str(runs_dir / run["init_from"] / "model.safetensors")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"run {run['name']!r}: unknown training option(s) {unknown}")
    return dataclasses.replace(cfg, **values)


def _evaluate(
    checkpoint: Path, out: Path, evaluation: Dict[str, Any], common: Dict[str, Any]
) -> Tuple[Dict[str, Any], Any]:
    """Clean accuracy, each attack at its eps list, the first layer's topography score; and its kernel mosaic."""
    from .. import serialization
    from ..evaluation import EvalConfig, run_evaluation
    from ..evaluation.topography import first_conv, kernel_mosaic, topography_score

    row: Dict[str, Any] = {"robust": {}, "notes": []}
    for group in evaluation.get("attacks") or []:
        eps = ",".join(f"{e:g}" for e in group["eps"])
        cfg = EvalConfig(
            checkpoint=str(checkpoint),
            attacks=f"clean,{group['attack']}",
            eps=eps,
            out=str(out / group["attack"]),
            **common,
            **(evaluation.get("options") or {}),
        )
        results = run_evaluation(cfg)
        for r in results["results"]:
            if r["attack"] == "clean":
                row["clean"] = r["accuracy"]["mean"]
            else:
                row["robust"][f"{r['attack']}@{r['eps']:g}"] = r["accuracy"]["mean"]
        row["notes"].extend(f["message"] for f in results["flags"])
    model = serialization.load(checkpoint, device="cpu")
    name, conv, grid = first_conv(model)
    row["topography"] = topography_score(conv.weight, grid)["score"]
    row["grid"] = str(grid)
    return row, kernel_mosaic(conv.weight, grid)


def run_study(path: str, cfg: Optional[StudyConfig] = None) -> Dict[str, Any]:
    """Train and evaluate every run of the study file ``path``; write study.json, study.md and pareto.png."""
    from ..reporting.study_report import write_study_report
    from .trainer import train

    cfg = cfg or StudyConfig()
    spec = _load_study(path)
    out = Path(cfg.out or spec.get("output") or Path("runs/studies") / Path(path).stem)
    forced = {
        key: getattr(cfg, key)
        for key in ("data_dir", "download", "epochs", "train_samples", "device", "compile")
        if getattr(cfg, key) is not None
    }
    shared = {**(spec.get("train") or {}), **forced}  # what the evaluation reads (data, device)
    evaluation = dict(spec.get("evaluation") or {})
    common = {
        "n_examples": cfg.n_examples or evaluation.get("n_examples", 500),
        "seed": evaluation.get("seed", 0),
        "batch_size": evaluation.get("batch_size", 250),
        "progress": cfg.progress,
        "data_dir": shared.get("data_dir"),
        "download": shared.get("download", True),
        "device": shared.get("device", "auto"),
    }
    only = set(cfg.only.split(",")) if cfg.only else None
    mosaics: Dict[str, Any] = {}
    if only and not only <= {r["name"] for r in spec["runs"]}:
        raise ValueError(f"--only names unknown run(s) {sorted(only - {r['name'] for r in spec['runs']})}")
    study: Dict[str, Any] = {
        "study": str(path),
        "description": spec.get("description", ""),
        "evaluation": {**evaluation, **common},
        "train_overrides": shared,
        "planned": [r["name"] for r in spec["runs"]],
        "panels": spec["panels"],
        "rows": [],
    }
    earlier = json.loads((out / "study.json").read_text())["rows"] if (out / "study.json").is_file() else []
    for run in spec["runs"]:
        if only and run["name"] not in only:  # keep what an earlier invocation measured for it
            study["rows"] += [r for r in earlier if r["name"] == run["name"]]
            continue
        train_cfg = _train_config(run, shared, forced, out / "runs")
        if train_cfg.initial_checkpoint and not Path(train_cfg.initial_checkpoint).is_file():
            raise RuntimeError(
                f"run {run['name']} starts from run {run['init_from']!r}, which has not finished "
                f"({train_cfg.initial_checkpoint} is missing); run it first (drop --only or add it)"
            )
        run_dir = out / "runs" / run["name"]
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        if not metrics.get("finished") and cfg.stage == "evaluate":
            study["rows"] += [r for r in earlier if r["name"] == run["name"]]
            continue
        if not metrics.get("finished"):
            print(f"study: training {run['name']}", file=sys.stderr)
            metrics = train(train_cfg)
            if not metrics.get("finished"):
                raise RuntimeError(f"run {run['name']} stopped before its last epoch; rerun the study to resume it")
        if cfg.stage == "train":  # the report is left to the invocation that evaluates (it may run beside this one)
            continue
        print(f"study: evaluating {run['name']}", file=sys.stderr)
        row, mosaics[run.get("label", run["name"])] = _evaluate(
            run_dir / "model.safetensors", out / "eval" / run["name"], evaluation, common
        )
        row.update(
            {
                "name": run["name"],
                "label": run.get("label", run["name"]),
                "pool": train_cfg.pool,
                "sigma": train_cfg.sigma,
                "k": train_cfg.kap_k,
                "kap_stride": train_cfg.kap_stride,
                "depth": train_cfg.model_kwargs.get("depth"),
                "objective": train_cfg.objective,
                "epochs": train_cfg.epochs,
                "init_from": run.get("init_from"),
                "test_acc": metrics.get("test_acc"),
                "train_time_s": metrics.get("train_time_s"),
                "precision": metrics.get("precision"),
            }
        )
        study["rows"].append(row)
        write_study_report(study, out, mosaics)
    if cfg.stage != "train":
        write_study_report(study, out, mosaics)  # also keeps the rows of runs after the last one --only ran
    return study


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``recipes/study.py``."""
    parser = build_parser(
        StudyConfig, "Train and evaluate a study of kapify runs (table + Pareto plot)", prog="study.py"
    )
    values = vars(parser.parse_args(argv))
    path = values.pop("config", None)
    if not path:
        parser.error("--config STUDY.yaml is required (e.g. recipes/studies/cpu_sigma_sweep.yaml)")
    try:
        study = run_study(path, StudyConfig(**values))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2
    print(f"study: {len(study['rows'])} run(s) done", file=sys.stderr)
    return 0
