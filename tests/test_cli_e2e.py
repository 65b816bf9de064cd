"""The command line and the end-to-end pipeline, on synthetic and on real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secateurs import cli, data
from secateurs.zoo import build_model

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> int:
    return cli.main(list(args))


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["run"], ["sensitivity"], ["summary"], ["inspect"], ["bench"]]
)
def test_every_help_page_prints(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of the tool and of each subcommand (argparse %-formats help strings)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(*command, "--help")
    assert exit_.value.code == 0
    assert "usage: secateurs" in capsys.readouterr().out


def test_methods_json_lists_every_axis(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("methods", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    names = {(r["axis"], r["name"]) for r in rows}
    for pair in [
        ("structure", "nm"),
        ("criterion", "obd"),
        ("allocation", "lamp"),
        ("schedule", "gradual"),
        ("budget", "params"),
    ]:
        assert pair in names
    assert run_cli("methods") == 0
    assert "gradual" in capsys.readouterr().out


def test_bad_recipe_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune: {sparsity: 1.2}\n")
    assert run_cli("run", str(recipe)) == 2
    err = capsys.readouterr().err
    assert "prune.sparsity" in err and "1.2" in err
    assert run_cli("run", str(tmp_path / "missing.yaml")) == 2
    assert run_cli("summary", str(tmp_path / "missing.safetensors")) == 2


def test_run_synthetic_recipe_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = run_cli("run", str(REPO / "recipes" / "quick-synthetic.yaml"), "--out", str(out),
                   "--set", "data.limit_train=512", "--set", "data.limit_test=128")  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["nonzeros"] < report["dense"]["nonzeros"]
    # the checkpoint is a plain state dict that loads strictly into the original class
    state = load_file(str(out / "model.safetensors"))
    model = build_model("lenet-5")
    model.load_state_dict(state, strict=True)
    weights = [
        m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    # 80% of the weights in 1x4 blocks: within one block of rounding per layer
    assert abs(zeros / sum(w.numel() for w in weights) - 0.8) < 0.01
    assert run_cli("summary", str(out / "model.safetensors")) == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not data.DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_end_to_end(tmp_path: Path) -> None:
    """Train LeNet-300-100, prune it gradually to 90% while fine-tuning, check the result."""
    from secateurs import pipeline, recipe

    r = recipe.parse(
        {
            "name": "e2e",
            "model": {"name": "lenet-300-100"},
            "data": {"name": "fashion-mnist", "limit_train": 20000},
            "train": {"epochs": 2, "lr": 0.05},
            "prune": {
                "sparsity": 0.9,
                "allocation": "lamp",
                "schedule": {"name": "gradual", "end": 1, "every": 0.25},
            },
            "finetune": {"epochs": 2, "lr": 0.02},
            "output": {"dir": str(tmp_path / "e2e"), "latency": False},
        }
    )
    result = pipeline.run(r)
    dense, pruned = result.report.dense, result.report.pruned
    assert dense["accuracy"] > 0.80  # ten classes: chance is 0.10
    assert pruned["accuracy"] > dense["accuracy"] - 0.03
    weights = [m.weight for m in result.model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.9 * sum(w.numel() for w in weights))
    assert sum(pruned["per_class_accuracy"]) > 0 and len(pruned["per_class_accuracy"]) == 10
    assert result.report.trajectory[-1]["sparsity"] == pytest.approx(0.9)
    assert (tmp_path / "e2e" / "report.md").is_file()


IMAGE_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if "smollm2" not in p.name)


@pytest.mark.skipif(
    not data.DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)
@pytest.mark.parametrize("path", IMAGE_RECIPES, ids=lambda p: p.name)
def test_every_example_recipe_runs_on_a_slice(path: Path, tmp_path: Path) -> None:
    """Every image recipe; the language-model recipe runs in test_oneshot (slow)."""
    overrides = [
        "data.limit_train=256",
        "data.limit_test=256",
        "train.epochs=1",
        "output.latency=false",
    ]
    args = ["run", str(path), "--out", str(tmp_path)]
    for item in overrides:
        args += ["--set", item]
    assert run_cli(*args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    asked = report["config"]["plan"]["final_sparsity"]
    assert report["trajectory"][-1]["sparsity"] == pytest.approx(asked, abs=0.01)


def test_run_with_export_writes_a_compressed_file_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = run_cli("run", str(REPO / "recipes" / "quick-synthetic.yaml"), "--out", str(out),
                   "--set", "data.limit_train=256", "--set", "data.limit_test=128",
                   "--set", "output.latency=true",
                   "--set", "export={compressed: true, centroid_epochs: 1, bits: {conv: 4, fc: 3}, onnx: true}")  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    compressed = report["extra"]["export"]["compressed"]
    assert compressed["file_bytes"] == (out / "model.sct").stat().st_size
    assert compressed["ratio"] > 5
    assert 0 <= compressed["accuracy"] <= 1
    assert (out / "model.onnx").is_file() and report["extra"]["export"]["onnx"][
        "max_abs_diff"
    ] < 1e-3
    # with an ONNX export the run also times both models in onnxruntime and reports it
    timed = report["extra"]["realised"]["latency_onnxruntime"]
    assert timed["how"] == "onnxruntime" and timed["dense_ms"] > 0 and timed["pruned_ms"] > 0
    assert "onnxruntime (ms" in (out / "report.md").read_text()
    model = build_model("lenet-5")
    from secateurs import load_compressed

    load_compressed(out / "model.sct", model)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert torch.unique(m.weight).numel() <= 2**4 + 1  # 4-bit codebook plus zero
    capsys.readouterr()
    assert run_cli("inspect", str(out / "model.sct")) == 0
    table = capsys.readouterr().out
    assert "conv1" in table and "fc3" in table and "smaller" in table
    assert run_cli("inspect", str(out / "model.sct"), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == compressed["file_bytes"]
    assert {t["name"] for t in info["tensors"]} == set(model.state_dict())


def test_inspect_a_bad_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.sct"
    bad.write_bytes(b"SECATEUR" + b"\x01\x00\x00\x00\xff\xff\x00\x00" + b"x" * 40)
    assert run_cli("inspect", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and len(err.splitlines()) == 1
    assert run_cli("inspect", str(tmp_path / "none.sct")) == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("export.bits={fc: 0}", "1..16"),
        (
            "export={centroid_epochs: 1, quantization: linear}",
            "needs 'export.quantization: kmeans'",
        ),
        ("export.quantization=zip", "quantization"),
        ("export.compresed=true", "unknown recipe key 'export.compresed'"),
        ("export.centroid_epochs=-1", "export.centroid_epochs"),
        ("finetune.distill={temp: 2}", "finetune.distill"),
        ("finetune.distill={alpha: 1.5}", "finetune.distill"),
        ("finetune.regularizers=[l0]", "unknown regularizer 'l0'"),
        ("finetune.regularizers=[{name: l1, coefficient: -1}]", "finetune.regularizers[0]"),
        ("prune.schedule={name: lottery, every: 1, rewind: 2}", "rewind"),
        ("prune.schedule={name: set, fraction: 1.5}", "(0, 1)"),
    ],
)
def test_bad_export_recovery_or_schedule_options_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    code = run_cli("run", str(REPO / "recipes" / "quick-synthetic.yaml"), "--out",
                   str(tmp_path / "r"), "--set", override)  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_lottery_recipe_saves_one_ticket_per_round(tmp_path: Path) -> None:
    out = tmp_path / "lth"
    code = run_cli("run", str(REPO / "recipes" / "lenet300-lottery.yaml"), "--out", str(out),
                   "--set", "data.name=synthetic", "--set", "data.limit_train=256",
                   "--set", "data.limit_test=64", "--set", "output.latency=false")  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    tickets = report["extra"]["lottery_tickets"]
    assert len(tickets) == 5
    sparsities = []
    for path in tickets:
        masks = load_file(path)
        total = sum(m.numel() for m in masks.values())
        sparsities.append(1 - sum(int(m.sum()) for m in masks.values()) / total)
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.9, abs=0.01)
    kinds = [e["kind"] for e in report["extra"]["prune_events"]]
    assert kinds == ["snapshot"] + ["prune", "rewind"] * 5


def test_finetuning_with_regularizer_and_distillation(tmp_path: Path) -> None:
    out = tmp_path / "kd"
    code = run_cli("run", str(REPO / "recipes" / "quick-synthetic.yaml"), "--out", str(out),
                   "--set", "data.limit_train=256", "--set", "data.limit_test=64",
                   "--set", "finetune.distill={temperature: 2.0, alpha: 0.5}",
                   "--set", "finetune.regularizers=[{name: l1, coefficient: 0.0001}]")  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["recipe"]["finetune"]["distill"] == {"temperature": 2.0, "alpha": 0.5}
    assert report["pruned"]["nonzeros"] < report["dense"]["nonzeros"]
