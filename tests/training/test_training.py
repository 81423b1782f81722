"""recipes/train_timm.py: configs, objectives, learning on real CIFAR-10, resume, torchrun, bad input."""

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kapify
from kapify.data import dataset_info
from kapify.training import OBJECTIVES, build_model, main, parse_args, train, width_kwargs
from tests.helpers import ROOT

CONFIGS = sorted(glob.glob(str(ROOT / "recipes" / "configs" / "*.yaml")))
TINY = [
    "--model",
    "kapify/small_convnet",
    "--model-kwargs",
    "{depth: 2, width: 16}",
    "--download",
    "false",
    "--val-samples",
    "64",
    "--test-samples",
    "64",
    "--batch-size",
    "32",
    "--workers",
    "0",
]


def test_there_is_a_config_per_paper_row():
    names = {Path(c).stem for c in CONFIGS}
    for row in [
        "cifar10_resnet18_nt",
        "cifar10_resnet18_nt_s0.1",
        "cifar10_resnet18_at_es",
        "cifar10_resnet18_trades",
        "cifar10_resnet18_kap_s0.1",
        "cifar10_resnet18_kap_s0.2",
        "cifar100_resnet18_kap_s0.1",
        "tinyimagenet_resnet18_kap_s0.1",
        "imagenet_resnet18wide4_kap_s0.1",
        "cifar10_resnet18_fast_kap_s0.1",
        "cifar10_convnet1_kap",
        "cifar10_convnet3_kap_s0.2",
    ]:
        assert row in names


@pytest.mark.parametrize("path", CONFIGS, ids=[Path(c).stem for c in CONFIGS])
def test_config_parses_and_builds_its_model(path):
    cfg = parse_args(["--config", path])
    info = dataset_info(cfg.dataset)
    if cfg.width_mult > 1:  # the 4x wide ResNet18 has 180M parameters: build the 1x model, check the widths only
        assert width_kwargs(cfg.model, cfg.width_mult, {})["channels"] == (256, 512, 1024, 2048)
        cfg.width_mult = 1.0
    model = build_model(cfg, info).eval()
    config = kapify.get_config(model)
    assert config.sigma == cfg.sigma and config.pool == (None if cfg.pool == "none" else cfg.pool)
    size = info.image_size
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, info.num_classes)
    assert cfg.objective in OBJECTIVES


def test_flags_override_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet18\nsigma: 0.2\nepochs: 7\n")
    cfg = parse_args(["--config", str(path), "--sigma", "0.05", "--input-noise", "false"])
    assert (cfg.model, cfg.sigma, cfg.epochs, cfg.input_noise) == ("resnet18", 0.05, 7, False)
    path.write_text("sigmaa: 0.2\n")
    with pytest.raises(ValueError, match="unknown option"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("objective", ["pgd_at", "trades"])
def test_adversarial_objectives_train_and_stay_in_budget(objective, cifar_dir, tmp_path, monkeypatch):
    import kapify.training.objectives as objectives

    budgets = []
    real_pgd = objectives.pgd

    def checked_pgd(model, x, y, eps, norm, **kwargs):
        x_adv = real_pgd(model, x, y, eps, norm, **kwargs)
        budgets.append(((x_adv - x).flatten(1).norm(dim=1).max().item(), eps, model.training))
        return x_adv

    monkeypatch.setattr(objectives, "pgd", checked_pgd)
    metrics = train(
        parse_args(
            TINY
            + [
                "--data-dir",
                cifar_dir,
                "--objective",
                objective,
                "--attack-steps",
                "2",
                "--epochs",
                "1",
                "--train-samples",
                "96",
                "--output",
                str(tmp_path),
                "--sigma",
                "0",
            ]
        )
    )
    assert metrics["finished"] and budgets and all(n <= eps + 1e-5 and not training for n, eps, training in budgets)


@pytest.mark.slow
def test_tiny_kap_convnet_learns_real_cifar10(cifar_dir, tmp_path):
    """A few hundred updates on 4,000 real CIFAR-10 images: clearly above chance (10%) on held-out test images
    (measured: 0.31; the same net without KAP and noise reaches 0.41, KAP learns more slowly, as in the paper)."""
    metrics = train(
        parse_args(
            [
                "--model",
                "kapify/small_convnet",
                "--model-kwargs",
                "{depth: 3, width: 36}",
                "--data-dir",
                cifar_dir,
                "--download",
                "false",
                "--train-samples",
                "4000",
                "--val-samples",
                "200",
                "--test-samples",
                "1000",
                "--batch-size",
                "32",
                "--epochs",
                "3",
                "--lr",
                "0.15",
                "--sigma",
                "0.1",
                "--workers",
                "0",
                "--output",
                str(tmp_path),
            ]
        )
    )
    assert metrics["steps"] >= 300 and metrics["test_acc"] > 0.2, metrics
    model = kapify.load(Path(metrics["run_dir"]) / "model.safetensors")
    assert (
        kapify.get_config(model).pool == "avg"
        and kapify.load_extra(Path(metrics["run_dir"]) / "model.safetensors")["args"]["sigma"] == 0.1
    )
    rows = list(csv.DictReader(open(Path(metrics["run_dir"]) / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and float(rows[-1]["images_per_s"]) > 0


def test_resume_mid_epoch_continues_with_identical_state(cifar_dir, tmp_path):
    args = TINY + [
        "--data-dir",
        cifar_dir,
        "--train-samples",
        "320",
        "--epochs",
        "2",
        "--sigma",
        "0.1",
        "--output",
        str(tmp_path),
    ]
    straight = train(parse_args(args + ["--experiment", "straight"]))
    cut = train(parse_args(args + ["--experiment", "cut", "--max-steps", "13"]))  # epoch 2, batch 3 of 10
    assert not cut["finished"] and (tmp_path / "cut" / "last.pth").is_file()
    resumed = train(parse_args(args + ["--experiment", "cut"]))
    assert resumed["finished"] and resumed["steps"] == straight["steps"] == 20
    a = kapify.load(tmp_path / "straight" / "model.safetensors").state_dict()
    b = kapify.load(tmp_path / "cut" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_gloo_processes(cifar_dir, tmp_path):
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # torchrun binds a free port itself: no port picked here and freed again (a race)
            str(ROOT / "recipes" / "train_timm.py"),
        ]
        + TINY
        + [
            "--data-dir",
            cifar_dir,
            "--train-samples",
            "256",
            "--epochs",
            "1",
            "--output",
            str(tmp_path),
            "--experiment",
            "ddp",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "log.csv")))
    assert len(rows) == 1 and int(rows[0]["step"]) == 4  # 256 images / (2 processes x 32)
    assert kapify.get_config(kapify.load(tmp_path / "ddp" / "model.safetensors")) is not None


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cifar_dir, tmp_path, monkeypatch, capsys):
    standard, calls = OBJECTIVES["standard"], []

    def diverges_at_update_13(model, x, y, cfg):
        loss, logits = standard(model, x, y, cfg)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 13 else loss), logits

    monkeypatch.setitem(OBJECTIVES, "standard", diverges_at_update_13)
    args = TINY + [
        "--data-dir",
        cifar_dir,
        "--train-samples",
        "320",
        "--epochs",
        "3",
        "--output",
        str(tmp_path),
        "--experiment",
        "nan",
        "--checkpoint-every",
        "4",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the training loss became nan by update 16" in err and "last.pth" in err  # caught at the next checkpoint
    state = torch.load(tmp_path / "nan" / "last.pth", weights_only=False)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 12)  # the save before the first nan update
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_corrupt_training_checkpoint_is_a_clear_error_not_a_silent_restart(cifar_dir, tmp_path, capsys):
    args = TINY + [
        "--data-dir",
        cifar_dir,
        "--train-samples",
        "64",
        "--epochs",
        "1",
        "--output",
        str(tmp_path),
        "--experiment",
        "c",
    ]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "last.pth").write_bytes(b"PK\x03\x04 truncated")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot read the training checkpoint" in err and "--resume none" in err
    assert (tmp_path / "c" / "last.pth").read_bytes() == b"PK\x03\x04 truncated"  # kept for the user to look at
    assert main(args + ["--resume", "none"]) == 0


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(cifar_dir, tmp_path, monkeypatch, capsys):
    args = TINY + ["--data-dir", cifar_dir, "--train-samples", "160", "--output", str(tmp_path), "--experiment", "full"]
    assert main(args + ["--epochs", "1"]) == 0
    before = (tmp_path / "full" / "last.pth").read_bytes()

    def disk_full(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(args + ["--epochs", "2"]) == 2
    assert "cannot write the training checkpoint" in capsys.readouterr().err
    assert (tmp_path / "full" / "last.pth").read_bytes() == before and not list((tmp_path / "full").glob("*.tmp"))
    monkeypatch.undo()
    assert main(args + ["--epochs", "2"]) == 0  # resumes from the intact checkpoint


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--dataset", "mnist"], "unknown dataset"),
        (["--model", "no_such_model"], "no model named"),
        (["--objective", "magic"], "unknown objective"),
        (["--early-stop", "true"], "val_attack_steps"),
        (["--kap-stride", "2", "--pool", "none"], "kap_stride only applies"),
        (["--grid", "diagonal"], "grid must be"),
        (["--data-dir", "/nonexistent-kapify"], "cifar10 not found"),
    ],
)
def test_bad_input_fails_before_training(flags, message, tmp_path, capsys):
    base = ["--download", "false", "--epochs", "1", "--output", str(tmp_path), "--experiment", "bad"]
    assert main(base + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "log.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 11])  # updates saved before the kill: inside epoch 1, inside epoch 2
def test_a_run_killed_at_any_point_resumes_bit_identically(cifar_dir, tmp_path, kill_after):
    """SIGKILL (no clean-up runs) once ``last.pth`` holds ``kill_after`` updates, possibly mid-write of the next one;
    the rerun resumes from the file and ends with the weights of a run never interrupted."""
    import signal
    import time

    from kapify.training.checkpoint import load_state

    args = TINY + ["--data-dir", cifar_dir, "--train-samples", "320", "--epochs", "2", "--sigma", "0.1",
                   "--checkpoint-every", "1", "--output", str(tmp_path)]  # fmt: skip
    command = [sys.executable, str(ROOT / "recipes" / "train_timm.py")] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in every process: the same float sums
    straight = subprocess.run(command + ["--experiment", "straight"], capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    process = subprocess.Popen(command + ["--experiment", "killed"], stderr=subprocess.DEVNULL, env=env)
    last, deadline = tmp_path / "killed" / "last.pth", time.time() + 300
    while process.poll() is None and time.time() < deadline:
        state = load_state(last) if last.is_file() else None  # written atomically: whole or the previous one
        if state is not None and state["step"] >= kill_after:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = subprocess.run(command + ["--experiment", "killed"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-2000:]
    a = kapify.load(tmp_path / "straight" / "model.safetensors").state_dict()
    b = kapify.load(tmp_path / "killed" / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validate_returns_the_epochs_metrics_and_record_epoch_writes_them(cifar_dir, tmp_path):
    """timm's split: validate measures and writes nothing; the loop's record_epoch writes log.csv and, with early
    stopping, best.safetensors."""
    from kapify.training.trainer import record_epoch, start, train_one_epoch, validate

    args = TINY + ["--data-dir", cifar_dir, "--train-samples", "64", "--epochs", "1", "--output", str(tmp_path)]
    run = start(parse_args(args + ["--early-stop", "--val-attack-steps", "1"]))
    log = run.run_dir / "log.csv"
    before = log.read_text() if log.is_file() else ""
    row, loss_sum = validate(run, 0, train_one_epoch(run, 0))
    assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["val_robust_acc"] <= 1.0 and loss_sum > 0
    assert (log.read_text() if log.is_file() else "") == before and not (run.run_dir / "best.safetensors").exists()
    record_epoch(run, 0, row)
    logged = list(csv.DictReader(log.open()))
    assert [int(r["epoch"]) for r in logged] == [1] and float(logged[0]["val_acc"]) == pytest.approx(row["val_acc"])
    assert kapify.load(run.run_dir / "best.safetensors") is not None
