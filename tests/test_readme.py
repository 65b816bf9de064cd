"""The README's Python examples run as written (with a small synthetic loader) and do what
their comments say."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import secateurs as sc
from secateurs import data
from secateurs.targets import find_targets
from secateurs.zoo import build_model

README = Path(__file__).resolve().parents[1] / "README.md"
X = torch.zeros(1, 1, 28, 28)


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _masked_fraction(model: nn.Module) -> float:
    """Fraction of the default targets' weights that are zero."""
    targets = find_targets(model)
    return sum(int((t.weight == 0).sum()) for t in targets) / sum(t.numel for t in targets)


@pytest.fixture
def namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)  # examples may write files
    bundle = data.synthetic(n_train=256, n_test=64)
    loader = bundle.loaders(64)[0]
    return {
        "loader": loader,
        "calib_loader": loader,
        "loss_fn": torch.nn.functional.cross_entropy,
    }


def test_the_30_second_example_prunes_then_trains_sparse_and_bakes_in(
    namespace: dict[str, Any],
) -> None:
    first = _blocks()[0]
    cut = first.index("# or, from the dense model")
    exec(first[:cut], namespace)  # the one-shot part
    assert _masked_fraction(namespace["model"]) == pytest.approx(0.95, abs=1e-3)
    exec(first[cut:], namespace)  # the training loop part, on a fresh model
    model, pruner = namespace["model"], namespace["pruner"]
    assert pruner.steps_done == len(namespace["loader"]) and pruner.history
    assert all(e.measured >= e.target - 1e-3 for e in pruner.history)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == list(build_model("lenet-5").state_dict())


def test_every_alternative_plan_prunes_a_fresh_model(namespace: dict[str, Any]) -> None:
    exec(_blocks()[0].split("\n\n")[0], namespace)  # the imports
    lines = [line for line in _blocks()[1].splitlines() if line.strip()]
    assert len(lines) >= 6
    for line in lines:
        model = namespace["model"] = build_model("lenet-5")
        exec(line, namespace)
        masks = sc.collect_masks(model)
        if "Lottery" in line:  # rounds every 2000 steps: nothing is pruned at step 0
            pruner = namespace["pruner"]
            assert pruner.steps_done == 1 and not masks and not pruner.history
            assert pruner.last_step == 2000 * pruner.schedule_.round_count(0.9)
            continue
        assert masks and any(not bool(m.all()) for m in masks.values()), line
        if "NM(2, 4)" in line:
            w = model.fc1.weight.detach().reshape(-1, 4)
            assert int((w != 0).sum(1).max()) <= 2 and "conv1.weight" not in masks
        if "include=[torch.nn.Linear]" in line:
            assert not [k for k in masks if k.startswith("conv")]
        if "Params(20_000)" in line:
            assert sc.profile(model).totals["nonzeros"] <= 20_000


def test_the_shrink_program_halves_the_macs_and_the_file_reloads(
    namespace: dict[str, Any],
) -> None:
    exec(_blocks()[0].split("\n\n")[0], namespace)
    exec(_blocks()[2], namespace)
    report, small, fresh = namespace["report"], namespace["small"], namespace["fresh"]
    # widths rounded by group width (round_to="auto") land at most a step below the budget
    assert 0.45 <= report.macs_after / report.macs_before <= 0.5
    assert sc.profile(fresh, X).totals["macs"] == report.macs_after
    example = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(example), small.eval()(example))
    # with calibration data the same cut is refitted toward the dense model's outputs
    model, rebuilt = namespace["model"].eval(), namespace["rebuilt"].eval()
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in small.parameters()]
    x = torch.cat([xb for xb, _ in namespace["calib_loader"]])
    with torch.no_grad():
        dense = model(x)
        assert (rebuilt(x) - dense).norm() < 0.5 * (small(x) - dense).norm()


def test_the_search_program_meets_the_budget(namespace: dict[str, Any]) -> None:
    exec(_blocks()[0].split("\n\n")[0], namespace)
    namespace["model"] = build_model("lenet-5")
    exec(_blocks()[3], namespace)
    found, small = namespace["found"], namespace["small"]
    assert isinstance(found.ratios, sc.LayerMap) and found.value <= found.limit
    dense = sc.profile(namespace["model"], X).totals["macs"]
    assert sc.profile(small, X).totals["macs"] <= 0.5 * dense * 1.01


def test_the_ship_program_writes_a_smaller_file_that_loads_the_same_weights(
    namespace: dict[str, Any],
) -> None:
    exec(_blocks()[0].split("\n\n")[0], namespace)
    namespace["model"] = build_model("lenet-5")
    exec(_blocks()[4], namespace)
    info, model, fresh = namespace["info"], namespace["model"], namespace["fresh"]
    assert info.ratio > 10 and Path("model.onnx").is_file()
    sc.make_permanent_(model)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.slow
def test_the_llm_program_prunes_smollm2_to_2_of_4(namespace: dict[str, Any]) -> None:
    """The real model, with fewer and shorter windows than the README (the numbers of the
    README come from the benchmark)."""
    pytest.importorskip("gguf")
    block = next(b for b in _blocks() if b.startswith("# as one program: a pretrained LLM"))
    small = block.replace(", 512, 64)", ", 128, 4)").replace(", 512, 32)", ", 128, 2)")
    assert small != block
    exec(_blocks()[0].split("\n\n")[0], namespace)
    exec(small, namespace)
    model, layers = namespace["model"], namespace["layers"]
    assert len(layers) == 210 and all(layer.sparsity == 0.5 for layer in layers)
    w = model.model.layers[0].mlp.up_proj.weight.detach().reshape(-1, 4)
    assert int((w != 0).sum(1).max()) <= 2
    assert (Path("smollm2-2of4") / "config.json").is_file()
