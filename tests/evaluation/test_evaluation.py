"""kapify-eval: attacks find what must be found, checks reject bad examples, resume, report, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import kapify
from kapify.evaluation import (
    ATTACKS,
    AdversarialExampleError,
    attack_mode,
    certify,
    evaluate,
    masking_flags,
    register_attack,
)
from kapify.evaluation.harness import main
from kapify.evaluation.topography import activation_change, topography_score
from kapify.layers import ChannelGrid


def linear_problem(n=200, classes=4, seed=0):
    """A linear classifier on 3x8x8 images in [0.3, 0.7], and each example's exact minimal L2 distance
    to a wrong class: min_j (margin_j / ||w_y - w_j||) (the box never binds at these distances)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, 192, generator=g))
        model[1].bias.zero_()
    x = 0.3 + 0.4 * torch.rand(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
        w = model[1].weight.clone()
    y = logits.argmax(1)  # every example starts correct
    margins = logits.gather(1, y[:, None]) - logits
    dist = margins / (w[y][:, None, :] - w[None]).norm(dim=2).clamp_min(1e-12)
    dist[torch.arange(n), y] = float("inf")
    return model, x, y, dist.min(1).values.detach()


@pytest.mark.parametrize("attack,slack", [("pgd", 0.02), pytest.param("autoattack", 0.0, marks=pytest.mark.slow)])
def test_attacks_find_exactly_the_examples_within_reach_of_a_linear_model(attack, slack):
    """No attack may break an example whose exact distance exceeds eps (sound); AutoAttack breaks every
    other one, PGD (maximising cross-entropy, not the margin) all but a couple of percent (strong)."""
    model, x, y, dist = linear_problem()
    eps = float(dist.detach().median())
    keep = (dist - eps).abs() > 0.05 * eps  # leave out examples on the edge of the budget
    out = evaluate(model, x[keep], y[keep], attacks=[attack], eps=eps, batch_size=100, progress=False)
    n = int(keep.sum())
    robust = round(out["results"][0]["accuracy"] * n)
    out_of_reach = int((dist[keep] > eps).sum())
    assert out_of_reach <= robust <= out_of_reach + slack * n


def test_square_is_black_box_and_weaker_or_equal():
    model, x, y, dist = linear_problem(n=40)
    eps = float(dist.detach().median())
    out = evaluate(
        model,
        x,
        y,
        attacks=["clean", "pgd", "square"],
        eps=eps,
        batch_size=40,
        progress=False,
        spec=kapify.evaluation.AttackSpec(square_queries=300),
    )
    acc = {r["attack"]: r["accuracy"] for r in out["results"]}
    assert acc["clean"] == 1.0 and acc["pgd"] <= acc["square"] <= 1.0


@pytest.fixture
def planted_attack():
    @register_attack("planted")
    def planted(model, x, y, spec, seed):
        x_adv = x.clone()
        x_adv[0] = (x[0] + 2 * spec.eps / x[0].numel() ** 0.5).clamp(0, 1)  # one example twice over budget
        return x_adv, []

    yield "planted"
    del ATTACKS["planted"]


def test_an_example_over_budget_is_an_error_not_a_number(planted_attack):
    model, x, y, _ = linear_problem(n=8)
    with pytest.raises(AdversarialExampleError, match="exceed the L2 budget"):
        evaluate(model, x, y, attacks=[planted_attack], eps=0.5, progress=False)


def test_pixels_outside_the_box_are_an_error():
    ATTACKS["out_of_box"] = lambda model, x, y, spec, seed: (x * 0 - 0.01, [])
    try:
        model, x, y, _ = linear_problem(n=4)
        with pytest.raises(AdversarialExampleError, match="outside"):
            evaluate(model, x * 0 + 1e-3, y, attacks=["out_of_box"], eps=1.0, progress=False)
    finally:
        del ATTACKS["out_of_box"]


def test_noise_is_off_during_attacks_and_restored_after():
    model = kapify.convert(kapify.models.SmallConvNet(depth=1, width=9, num_classes=4), sigma=0.5)
    kapify.set_noise(model, True, site="activation")
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6,))
    a = evaluate(model, x, y, attacks=["clean"], progress=False)["results"][0]["accuracy"]
    b = evaluate(model, x, y, attacks=["clean"], progress=False)["results"][0]["accuracy"]
    assert a == b  # deterministic: no noise while evaluating
    assert all(m.test_time for m in model.modules() if isinstance(m, kapify.GaussianNoise))


def test_cached_batches_resume_without_attacking_again(tmp_path, monkeypatch):
    model, x, y, dist = linear_problem(n=30)
    first = evaluate(model, x, y, attacks=["pgd"], eps=0.5, batch_size=10, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.rglob("*.pt"))) == 3

    def fail(*args):
        raise AssertionError("attacked again instead of using the cache")

    monkeypatch.setitem(ATTACKS, "pgd", fail)
    again = evaluate(model, x, y, attacks=["pgd"], eps=0.5, batch_size=10, cache_dir=tmp_path, progress=False)
    assert again["results"][0]["accuracy"] == first["results"][0]["accuracy"]
    # the time reported is the attack's, read back from the cache, not the seconds spent reading it
    assert again["results"][0]["time_s"] == pytest.approx(first["results"][0]["time_s"], rel=0.05)


@pytest.mark.slow  # over 10 s on the 2-core machine: the full run (CI) only
def test_an_autoattack_run_interrupted_mid_batch_resumes_with_the_uninterrupted_result(tmp_path, monkeypatch):
    model, x, y, dist = linear_problem(n=30)
    run = dict(attacks=["autoattack"], eps=0.5, batch_size=10, progress=False)
    whole = evaluate(model, x, y, cache_dir=tmp_path / "whole", **run)
    autoattack, calls = ATTACKS["autoattack"], []

    def interrupted_on_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill while the batch is being attacked
        return autoattack(*args)

    monkeypatch.setitem(ATTACKS, "autoattack", interrupted_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, cache_dir=tmp_path / "cut", **run)
    assert len(list((tmp_path / "cut").rglob("*.pt"))) == 1 and not list((tmp_path / "cut").rglob("*.tmp"))
    resumed = evaluate(model, x, y, cache_dir=tmp_path / "cut", **run)
    assert len(calls) == 4  # the rerun attacked the second and third batches only
    assert torch.equal(resumed["correct"][("autoattack", 0.5)], whole["correct"][("autoattack", 0.5)])


def test_a_corrupt_attack_cache_is_reported_and_the_batch_attacked_again(tmp_path):
    model, x, y, dist = linear_problem(n=30)
    first = evaluate(model, x, y, attacks=["pgd"], eps=0.5, batch_size=10, cache_dir=tmp_path, progress=False)
    files = sorted(tmp_path.rglob("batch*.pt"))
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated (a killed write, a full disk)
    torch.save({"correct": torch.ones(3, dtype=torch.bool), "x_adv": None}, files[1])  # another run's batch
    with pytest.warns(UserWarning, match="corrupt attack cache") as caught:
        again = evaluate(model, x, y, attacks=["pgd"], eps=0.5, batch_size=10, cache_dir=tmp_path, progress=False)
    assert len([w for w in caught if "corrupt attack cache" in str(w.message)]) == 2
    assert again["results"][0]["accuracy"] == first["results"][0]["accuracy"]
    assert torch.equal(again["correct"][("pgd", 0.5)], first["correct"][("pgd", 0.5)])
    assert not list(tmp_path.rglob("*.tmp"))
    assert torch.load(files[0], weights_only=True)["correct"].shape == (10,)  # rewritten whole


def test_masking_flags():
    def row(attack, eps, acc):
        return {"attack": attack, "norm": "L2", "eps": eps, "accuracy": {"mean": acc}}

    flags = masking_flags([row("pgd", 1.0, 0.63), row("autoattack", 1.0, 0.19), row("square", 1.0, 0.20)])
    kinds = {f["kind"] for f in flags}
    assert kinds == {"pgd_above_autoattack", "black_box_beats_white_box"}
    sweep = [row("autoattack", e, a) for e, a in [(0.5, 0.3), (1.0, 0.35), (4.0, 0.3)]]
    assert {f["kind"] for f in masking_flags(sweep)} == {"accuracy_rises_with_eps", "accuracy_not_falling_to_zero"}
    assert masking_flags([row("autoattack", e, a) for e, a in [(0.5, 0.3), (1.0, 0.1), (4.0, 0.0)]]) == []


def test_certify_constant_classifier():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    rows = certify(
        model, torch.rand(3, 3, 2, 2), torch.tensor([0, 1, 0]), sigma=0.5, n0=10, n=200, alpha=0.01, progress=False
    )
    assert [r["correct"] for r in rows] == [True, False, True]
    from scipy.stats import beta, norm

    assert rows[0]["radius"] == pytest.approx(0.5 * norm.ppf(beta.ppf(0.01, 200, 1)))


def test_diagnostics():
    grid = ChannelGrid(4, 4)
    smooth = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 3, 3, 3) + torch.randn(16, 3, 3, 3) * 0.01
    assert topography_score(smooth - smooth.mean(0), grid)["score"] > 0.2
    model = kapify.models.SmallConvNet(depth=2, width=4, num_classes=3).eval()
    x = torch.rand(2, 3, 8, 8)
    change = activation_change(model, x, x)
    assert list(change) == ["features.0.0", "features.1.0"] and all(v == 0 for v in change.values())


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = kapify.convert(
        kapify.models.adapt(
            kapify.create_model("kapify/small_convnet", depth=2, width=16),
            "normalize_input",
            mean=[0.5] * 3,
            std=[0.25] * 3,
        ),
        sigma=0.1,
    )
    path = tmp_path / "tiny.safetensors"
    kapify.save(model, path)
    return path


def test_cli_end_to_end_json_markdown_plots_resume(tiny_checkpoint, cifar_dir, tmp_path, capsys):
    out = tmp_path / "res"
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data-dir",
        cifar_dir,
        "--download",
        "false",
        "--n-examples",
        "16",
        "--repeats",
        "2",
        "--attacks",
        "clean,pgd,square",
        "--eps",
        "0.25,1,4",
        "--pgd-steps",
        "3",
        "--square-queries",
        "10",
        "--batch-size",
        "8",
        "--noise-sensitivity",
        "true",
        "--diagnostics",
        "true",
        "--out",
        str(out),
        "--progress",
        "false",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "kapify-eval/1" and results["seeds"] == [0, 1]
    assert {"config", "versions", "results", "flags", "noise_sensitivity", "diagnostics", "model"} <= set(results)
    pgd_rows = [r for r in results["results"] if r["attack"] == "pgd"]
    assert [r["eps"] for r in pgd_rows] == [0.25, 1.0, 4.0] and all(len(r["runs"]) == 2 for r in pgd_rows)
    assert results["model"]["kapify"]["sigma"] == 0.1
    assert (out / "results.md").read_text().startswith("# kapify-eval") and (out / "accuracy_vs_eps.png").is_file()
    assert (out / "first_layer_kernels.png").is_file()
    cached = len(list((out / "cache").rglob("*.pt")))
    assert main(argv) == 0 and len(list((out / "cache").rglob("*.pt"))) == cached  # second run reuses every batch


def test_a_failed_results_write_leaves_the_previous_results_intact(
    tiny_checkpoint, cifar_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "res"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data-dir", cifar_dir, "--download", "false", "--n-examples", "8",
            "--attacks", "clean,pgd", "--eps", "1", "--pgd-steps", "2", "--out", str(out),
            "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md", "per_image.json")}

    def disk_full(self, text, *args, **kwargs):
        open(self, "w").write(text[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write the" in err and "No space left on device" in err and "unchanged" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--checkpoint", "/nonexistent.safetensors"], "no kapify checkpoint"),
        (["--attacks", "clean,fgsm"], "unknown attack"),
        (["--eps", "0"], "eps must be > 0"),
        (["--eps", "one"], "eps must be numbers"),
        (["--data-dir", "/nonexistent-kapify"], "cifar10 not found"),
        (["--model", "resnet18"], "--weights"),
    ],
)
def test_bad_input_is_a_clear_error(flags, message, tiny_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_checkpoint), "--download", "false", "--out", str(tmp_path)] + flags
    if flags[0] == "--model":
        argv = argv[2:]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_corrupt_checkpoint_and_nan_logits(tiny_checkpoint, cifar_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(bad), "--data-dir", cifar_dir, "--download", "false", "--out", str(tmp_path)]) == 2
    assert "corrupt" in capsys.readouterr().err
    model = kapify.load(tiny_checkpoint)
    with torch.no_grad():
        model.head[2].bias.fill_(float("nan"))
    nan_path = tmp_path / "nan.safetensors"
    kapify.save(model, nan_path)
    assert (
        main(
            [
                "--checkpoint",
                str(nan_path),
                "--data-dir",
                cifar_dir,
                "--download",
                "false",
                "--n-examples",
                "4",
                "--attacks",
                "clean",
                "--out",
                str(tmp_path / "o"),
                "--progress",
                "false",
            ]
        )
        == 2
    )
    assert "NaN" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_shards_examples_over_two_gloo_processes(tiny_checkpoint, cifar_dir, tmp_path):
    common = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data-dir",
        cifar_dir,
        "--download",
        "false",
        "--n-examples",
        "30",
        "--attacks",
        "clean",
        "--progress",
        "false",
    ]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # torchrun binds a free port itself: no port picked here and freed again (a race)
            "-m",
            "kapify.evaluation.harness",
        ]
        + common
        + ["--out", str(tmp_path / "two")]
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["results"][0]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["results"][0]["n"] == 30 and two["results"][0]["accuracy"] == one["accuracy"]


def test_test_time_noise_stays_on_only_when_asked():
    model = kapify.convert(kapify.models.SmallConvNet(depth=1, width=9, num_classes=4), sigma=0.5)
    kapify.set_noise(model, True)
    noise = [m for m in model.modules() if isinstance(m, kapify.GaussianNoise)]
    x = torch.rand(4, 3, 8, 8)
    with attack_mode(model, test_noise=True), torch.no_grad():
        assert not model.training and all(m.test_time for m in noise)
        assert not torch.equal(model(x), model(x))  # a random defence
    with attack_mode(model), torch.no_grad():
        assert not any(m.test_time for m in noise) and torch.equal(model(x), model(x))
    assert all(m.test_time for m in noise)


def test_adaptive_autoattack_rand_and_the_non_adaptive_label(tiny_checkpoint, cifar_dir, tmp_path):
    out = tmp_path / "rand"
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data-dir",
        cifar_dir,
        "--no-download",
        "--n-examples",
        "4",
        "--attacks",
        "clean,autoattack-rand",
        "--eps",
        "0.5",
        "--test-noise",
        "--noise-sensitivity",
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["test_noise"] and [r["attack"] for r in results["results"]] == ["clean", "autoattack-rand"]
    assert results["noise_sensitivity"]["protocol"].startswith("non-adaptive")
    text = (out / "results.md").read_text()
    assert "Test-time noise ON" in text and "Protocol: non-adaptive" in text


def test_kernel_picture_is_readable_and_shows_the_reference_beside(tiny_checkpoint, cifar_dir, tmp_path):
    import matplotlib.image

    out = tmp_path / "pic"
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data-dir",
        cifar_dir,
        "--no-download",
        "--n-examples",
        "4",
        "--attacks",
        "clean,pgd",
        "--pgd-steps",
        "2",
        "--diagnostics",
        "--transfer-from",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    picture = matplotlib.image.imread(out / "first_layer_kernels.png")
    assert picture.shape[1] >= 600 and picture.shape[0] >= 350  # two panels, each a 16-kernel grid drawn large
    results = json.loads((out / "results.json").read_text())
    assert results["diagnostics"]["reference"]["topography"]["score"] == results["diagnostics"]["topography"]["score"]
