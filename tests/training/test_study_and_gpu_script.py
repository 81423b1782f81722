"""recipes/study.py end to end on a tiny subset, and benchmarks/gpu_table1.py --smoke (so the one GPU run cannot fail
for a trivial reason)."""

import json

import pytest

from kapify.training.study import main as study_main
from tests.helpers import ROOT

STUDY = """
description: tiny two-run study
train: {model_kwargs: {depth: 1, width: 9}, train_samples: 64, val_samples: 0, test_samples: 40,
        batch_size: 32, epochs: 1}
runs:
  - {name: nt, label: NT, config: %(root)s/recipes/configs/cifar10_convnet3_nt.yaml, overrides: {sigma: 0.1}}
  - {name: kap, label: KAP, config: %(root)s/recipes/configs/cifar10_convnet3_kap.yaml, overrides: {sigma: 0.1}}
  - {name: ft, label: KAP fine-tuned, config: %(root)s/recipes/configs/cifar10_convnet3_kap.yaml, init_from: nt,
     overrides: {sigma: 0.1, kap_warmup_epochs: 1, arrange: similarity}}
evaluation:
  n_examples: 8
  attacks: [{attack: pgd, eps: [0.25, 1.0]}, {attack: square, eps: [0.5]}]
  options: {pgd_steps: 3, square_queries: 20}
panels:
  - {title: "depth panel", x: depth, values: [1], lines: {NT: [nt], KAP: [kap]}}
"""


@pytest.mark.slow  # over 10 s on the 2-core machine: the full run (CI) only
def test_two_run_study_end_to_end_and_rerun_skips_finished_runs(cifar_dir, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(STUDY % {"root": ROOT})
    argv = [
        "--config",
        str(spec),
        "--out",
        str(tmp_path / "out"),
        "--data-dir",
        cifar_dir,
        "--no-download",
        "--no-progress",
    ]
    out = tmp_path / "out"
    assert study_main(argv + ["--stage", "train", "--only", "nt"]) == 0
    assert (out / "runs" / "nt" / "model.safetensors").is_file() and not (out / "study.json").exists()
    assert study_main(argv + ["--stage", "evaluate"]) == 0  # beside a training invocation: finished runs only
    assert [r["name"] for r in json.loads((out / "study.json").read_text())["rows"]] == ["nt"]
    assert (
        not (out / "runs" / "kap").exists()
        and "Not trained or evaluated yet: kap, ft" in (out / "study.md").read_text()
    )
    assert study_main(argv) == 0
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["name"] for r in study["rows"]] == ["nt", "kap", "ft"]
    assert {(c["run"], c["against"], c["attack"]) for c in study["comparisons"]} == {
        ("kap", "nt", "pgd eps=0.25"), ("kap", "nt", "pgd eps=1"), ("kap", "nt", "square eps=0.5")
    }  # fmt: skip
    paired = study["comparisons"][0]["paired"]
    assert paired["n"] == 8 and paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
    assert "## depth panel" in (out / "study.md").read_text() and (out / "panel-1.png").stat().st_size > 5_000
    kap = study["rows"][1]
    assert kap["pool"] == "avg" and set(kap["robust"]) == {"pgd@0.25", "pgd@1", "square@0.5"}
    assert all(0 <= v <= kap["clean"] for v in kap["robust"].values()) and kap["train_time_s"] > 0
    table = (tmp_path / "out" / "study.md").read_text()
    assert "| KAP | KAP | 0.1 | 3 | 1 |" in table and "pgd@0.25" in table
    assert "| KAP fine-tuned | KAP | 0.1 | 3 | 1 (+1 as NT) |" in table
    log = (tmp_path / "out" / "runs" / "ft" / "log.csv").read_text()
    assert "kap_blend" in log.splitlines()[0]  # the warm-start ran
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000 and (tmp_path / "out" / "kernels.png").is_file()
    model = tmp_path / "out" / "runs" / "kap" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    assert study_main(argv + ["--only", "kap"]) == 0
    assert model.stat().st_mtime_ns == stamp  # finished runs are not trained again
    assert [r["name"] for r in json.loads((tmp_path / "out" / "study.json").read_text())["rows"]] == ["nt", "kap", "ft"]
    assert study_main(argv + ["--only", "nope"]) == 2 and "unknown run" in capsys.readouterr().err


def test_study_file_errors_are_specific(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("runs: [{name: a}]\n")
    assert study_main(["--config", str(spec)]) == 2
    assert "'runs' must be a list" in capsys.readouterr().err
    spec.write_text("runs: [{name: a, config: x.yaml, init_from: b}, {name: b, config: x.yaml}]\n")
    assert study_main(["--config", str(spec)]) == 2
    assert "init_from 'b', which must name an earlier run" in capsys.readouterr().err
    spec.write_text("runs: [{name: a, config: x.yaml}]\npanels: [{title: t, x: d, values: [1], lines: {L: [b]}}]\n")
    assert study_main(["--config", str(spec)]) == 2
    assert "panel 't' names unknown run(s) ['b']" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_table1_smoke_runs_every_stage(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_table1

    out = tmp_path / "t1"
    assert gpu_table1.main(["--out", str(out), "--data-dir", cifar_dir, "--smoke"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] and not results["errors"] and "overhead" in results
    for model in results["models"].values():
        assert set(model["eval"]) == {"pgd", "aa", "square"} and model["epoch_time_s"]
    assert "SMOKE RUN" in (out / "results.md").read_text()
    assert (
        gpu_table1.main(["--out", str(out), "--data-dir", cifar_dir, "--smoke"]) == 0
    )  # rerun resumes: nothing left to do
    assert len(json.loads((out / "results.json").read_text())["stage_time_s"]) == 2


def test_gpu_table1_rejects_unknown_models(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_table1

    with pytest.raises(SystemExit):
        gpu_table1.main(["--out", str(tmp_path / "t1"), "--models", "nt_s0.1,resnet"])
    assert "--models takes a comma-separated subset of ['kap_s0.1', 'nt_s0.1']" in capsys.readouterr().err
    assert not (tmp_path / "t1").exists()  # nothing written


def test_bf16_shards_round_trip_under_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch
    from bf16_shards import export_shards, import_shards

    import kapify

    model = kapify.convert(kapify.create_model("kapify/small_convnet", num_classes=10, depth=2, width=16), sigma=0.1)
    kapify.save(model, tmp_path / "model.safetensors", extra={"epoch": 3})
    shards = export_shards(tmp_path / "model.safetensors", tmp_path / "carry" / "m", max_bytes=6_000)
    header = len(json.dumps(kapify.get_config(model).to_dict())) + 2_000  # the first shard carries the metadata
    assert len(shards) > 1 and all(p.stat().st_size < 6_000 + header for p in shards)
    restored = kapify.load(import_shards(tmp_path / "carry" / "m", tmp_path / "back" / "model.safetensors"))
    assert kapify.load_extra(tmp_path / "back" / "model.safetensors") == {"epoch": 3}
    for (name, want), got in zip(model.state_dict().items(), restored.state_dict().values()):
        expected = want.bfloat16().float() if want.is_floating_point() else want
        assert torch.equal(got, expected), name
    shards[-1].unlink()
    with pytest.raises(ValueError, match="copy all of them"):
        import_shards(tmp_path / "carry" / "m", tmp_path / "again.safetensors")


@pytest.mark.slow
def test_gpu_table1_paper_schedule_trains_exports_and_attacks_in_a_fresh_folder(cifar_dir, tmp_path, monkeypatch):
    """The planned GPU sessions, rehearsed: session A trains and exports; session B starts from the export alone."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_table1

    handed_back = tmp_path / "OUT"
    common = ["--schedule", "paper", "--data-dir", cifar_dir, "--smoke", "--n-examples", "6"]
    assert (
        gpu_table1.main(common + ["--out", str(tmp_path / "a"), "--stages", "train", "--export", str(handed_back)]) == 0
    )
    first = json.loads((handed_back / "results.json").read_text())
    assert first["schedule"] == "paper" and set(first["models"]) == {gpu_table1.KAP, gpu_table1.NT}
    assert all(m["compile"] == "off" and m["shards"] for m in first["models"].values())  # auto: eager on a CPU
    assert len(list(handed_back.glob("*.bf16-*.safetensors"))) <= 6  # with results.json/.md: within the 8 files
    assert (
        gpu_table1.main(
            common
            + [
                "--out",
                str(tmp_path / "b"),
                "--stages",
                "attack",
                "--import",
                str(handed_back),
                "--skip-overhead",
                "--skip-square",
            ]
        )
        == 0
    )
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    for model in second["models"].values():
        assert model["weights"] == "bf16 (imported)" and set(model["eval"]) == {"test", "aa1", "pgd", "aa05"}
    paired = second["paired"]["autoattack eps=1"]
    assert paired["n"] == 6 and paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
    assert abs(paired["difference"] - (paired["kap"] - paired["nt"])) < 1e-9
    assert "KAP − NT on the same images" in (tmp_path / "b" / "results.md").read_text()


@pytest.mark.slow
def test_gpu_table1_hands_compiled_kernels_to_the_next_session(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_table1
    import torch

    compiled = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    compiled(torch.randn(8))
    written = gpu_table1.save_compile_cache(tmp_path, "kap_s0.1")
    assert written and (tmp_path / "compile_cache-kap_s0.1.bin").stat().st_size == written
    torch._dynamo.reset()
    assert gpu_table1.load_compile_cache(tmp_path) == ["compile_cache-kap_s0.1.bin"]
    assert gpu_table1.load_compile_cache(tmp_path / "nothing-here") == []


@pytest.mark.slow
def test_gpu_compile_check_rehearses_on_a_cpu(tmp_path):
    """benchmarks/gpu_compile_check.py (issue 30's first GPU step) runs end to end and compares what it says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_compile_check", ROOT / "benchmarks" / "gpu_compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    assert module.main(["--smoke", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"NT σ=0", "NT σ=0.1", "KAP σ=0", "KAP σ=0.1"} and report["passed"]
    nt = report["runs"]["NT σ=0"]
    assert len(nt["eager"]["losses"]) == 2 and nt["worst_relative_difference"] <= 0.02
