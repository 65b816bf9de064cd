"""One-shot pruning of large models: the layer-wise criteria, the block-by-block engine, OWL,
movement pruning, depth pruning and the files a pruned language model ships as."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, LlamaConfig

import secateurs as sc
from helpers import assert_untouched, snapshot
from secateurs.allocation.owl import OWL, outlier_ratio
from secateurs.criteria.hessian import HessianAccumulator, sparsegpt_
from secateurs.criteria.layerwise import Wanda, as_matrix, from_matrix, input_rows, supports
from secateurs.export import export_huggingface, export_packed_nm, load_packed_nm
from secateurs.oneshot import (
    DepthReport,
    OneShotReport,
    block_influence,
    capture_block_inputs,
    drop_blocks,
    find_blocks,
    run_block,
)
from secateurs.targets import find_targets
from secateurs.zoo import build_model


def llama(layers: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def gpt2() -> nn.Module:
    """A tiny GPT-2: its linear layers are transformers' Conv1D (weights stored [in, out])."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def bert() -> nn.Module:
    """A tiny BERT encoder: its blocks take an attention mask, and Linear layers."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config).eval()


def windows(seed: int = 0, count: int = 6, length: int = 16) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 96, (count, length), generator=g).split(2))


def nonzero_per_block(w: Tensor, m: int) -> Tensor:
    return (as_matrix(w.detach()).reshape(w.shape[0], -1, m) != 0).sum(-1)


# --------------------------------------------------------------------------- criteria


def test_wanda_scores_equal_a_hand_computation_and_compare_within_rows() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(12, 5))
    x = torch.randn(40, 12) * torch.linspace(0.1, 3.0, 12)
    sc.prune_(layer, sparsity=0.5, criterion="wanda", data=[(x, None)])
    target = find_targets(layer)[0]
    norms = x.square().sum(0).sqrt()
    expected = layer[0].parametrizations.weight.original.detach().abs() * norms  # type: ignore[union-attr]
    assert torch.allclose(Wanda().scores(target, {"column_norms": norms}, 0), expected)
    kept = layer[0].weight != 0
    assert (kept.sum(1) == 6).all()  # exactly half of every output row
    scores = expected.masked_fill(~kept, float("inf"))
    assert (scores.min(1).values >= expected.masked_fill(kept, -1).max(1).values).all()


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "obs"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_results_hold_at_most_n_per_block(criterion: str, n: int, m: int) -> None:
    model = llama(2)
    sc.prune_(model, structure=sc.NM(n, m), criterion=criterion, data=windows())
    report = sc.report_of(model, OneShotReport)
    assert report.sequential and report.blocks == 2 and len(report.layers) == 14
    for t in find_targets(model, include=[nn.Linear], exclude=["lm_head"]):
        assert int(nonzero_per_block(t.weight, m).max()) <= n, t.name


def test_obs_prunes_the_lenets_from_their_inputs_and_beats_no_update() -> None:
    torch.manual_seed(0)
    model = build_model("lenet-5", seed=0)
    data = [(torch.randn(32, 1, 28, 28), torch.zeros(32)) for _ in range(2)]
    dense = copy.deepcopy(model)
    sc.prune_(model, sparsity=0.6, criterion="obs", data=data)
    report = sc.report_of(model, OneShotReport)
    assert not report.sequential and {r.name for r in report.layers} == {
        "conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight",
    }  # fmt: skip
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(0.6, abs=0.02) and 0 <= layer.error < 1
    wanda = copy.deepcopy(dense)
    sc.prune_(wanda, sparsity=0.6, criterion="wanda", data=data)
    errors = {r.name: r.error for r in sc.report_of(wanda, OneShotReport).layers}
    # OBS is the exact greedy optimum for each removal: on these layers its error is far lower
    assert all(r.error < errors[r.name] for r in report.layers if r.name != "conv1.weight")


# --------------------------------------------------------------------------- the engine


def manual_sequential(model: nn.Module, data: list[Tensor], criterion: Any, s: float) -> None:
    """What the engine must equal: for each block, statistics from running the *whole model*
    (earlier blocks already pruned), then that block's layers pruned."""
    path, blocks = find_blocks(model)  # type: ignore[misc]
    for i in range(len(blocks)):
        inside = [
            t for t in find_targets(model, include=[rf"{path}\.{i}\..*"]) if supports(t.module)
        ]  # fmt: skip
        accs = {t.name: HessianAccumulator(as_matrix(t.raw, t.transposed).shape[1]) for t in inside}
        hooks = [
            t.module.register_forward_pre_hook(
                lambda mod, args, acc=accs[t.name]: acc.add(input_rows(mod, args[0]))
            )
            for t in inside
        ]
        with torch.no_grad():
            for batch in data:
                model(batch)
        for h in hooks:
            h.remove()
        for t in inside:
            w = as_matrix(t.raw.detach(), t.transposed).clone().contiguous()
            mask = criterion.prune_matrix(w, accs[t.name], s, 0, 0)
            with torch.no_grad():
                if criterion.updates_weights:
                    t.raw.copy_(from_matrix(w, t.shape, t.transposed))
            sc.apply_masks_(model, {t.name: from_matrix(mask, t.shape, t.transposed)})


@pytest.mark.parametrize("criterion", [sc.Wanda(), sc.SparseGPT()], ids=["wanda", "sparsegpt"])
@pytest.mark.parametrize("make", [llama, gpt2, bert], ids=["llama", "gpt2", "bert"])
def test_the_block_engine_equals_running_the_whole_model(criterion: Any, make: Any) -> None:
    data = windows(1)
    engine, manual = make(), make()
    sc.prune_(engine, sparsity=0.5, criterion=criterion, data=data)
    manual_sequential(manual, data, criterion, 0.5)
    for (name, a), b in zip(engine.state_dict().items(), manual.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    # and the engine's block-by-block forward reproduces the model's own hidden states
    _, blocks = find_blocks(engine)  # type: ignore[misc]
    inputs = capture_block_inputs(engine, blocks[0], data[:1])
    hidden = inputs[0].args[0]
    for block in blocks:
        hidden = run_block(block, inputs[0].with_hidden(hidden))
    with torch.no_grad():
        states = engine(data[0], output_hidden_states=True).hidden_states
    if hasattr(engine, "model"):  # Llama and GPT-2 apply their final norm to the last state
        hidden = engine.model.norm(hidden)
    elif hasattr(engine, "transformer"):
        hidden = engine.transformer.ln_f(hidden)
    torch.testing.assert_close(hidden, states[-1], atol=1e-5, rtol=1e-4)


def test_sequential_sparsegpt_reconstructs_better_than_one_pass_wanda() -> None:
    data = windows(2, count=8, length=24)
    errors = {}
    for name, crit in (
        ("sparsegpt", "sparsegpt"),
        ("wanda", {"name": "wanda", "sequential": False}),
    ):
        model = llama(3)
        sc.prune_(model, sparsity=0.6, criterion=crit, data=data)
        layers = sc.report_of(model, OneShotReport).layers
        errors[name] = sum(layer.error for layer in layers) / len(layers)
    assert errors["sparsegpt"] < errors["wanda"]


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"sparsity": 0.5, "criterion": "sparsegpt"}, sc.ConfigError, "needs calibration data"),
    ({"sparsity": 0.5, "criterion": "wanda", "data": []}, sc.DataError, "empty"),
    ({"structure": sc.NM(2, 5), "criterion": "sparsegpt", "data": "w"}, sc.ModelError, "M=5"),
    (
        {"sparsity": 0.5, "criterion": "sparsegpt", "allocation": "global", "data": "w"},
        sc.ConfigError,
        "own sparsity",
    ),
    (
        {"sparsity": 0.5, "criterion": "wanda", "structure": sc.Blocks((1, 4)), "data": "w"},
        sc.ConfigError,
        "single weights or N:M",
    ),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_refused_and_the_model_untouched(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = llama(2)
    before = snapshot(model)
    if options.get("data") == "w":
        options = {**options, "data": windows()}
    with pytest.raises(error, match=match):
        sc.prune_(model, **options)
    assert_untouched(model, before)


def test_a_model_without_blocks_is_refused_by_the_sequential_engine() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(sc.ModelError, match=r"no repeated blocks.*sequential=False"):
        sc.prune_(model, sparsity=0.5, criterion={"name": "wanda", "sequential": True},
                  data=[(torch.randn(4, 8), None)])  # fmt: skip
    assert_untouched(model, before)


# --------------------------------------------------------------------------- OWL


def test_outlier_ratio_and_owl_sparsities() -> None:
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0]), torch.tensor([1.0] * 5)]
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)  # 100 > 5 x mean(10.9)
    # outlier ratios 0, 0.1 and 0.15: scaled to [0, 2 lam] = 0, 0.1067, 0.16 (mean 0.0889)
    scores = {
        "a": torch.ones(20),
        "b": torch.tensor([1.0] * 18 + [50.0] * 2),
        "c": torch.tensor([1.0] * 17 + [100.0] * 3),
    }
    owl = OWL(m=5.0, lam=0.08).fit(scores, {"a": "L0", "b": "L1", "c": "L2"})
    assert owl.ratios_ == pytest.approx({"L0": 0.0, "L1": 0.1, "L2": 0.15})
    per = owl.layer_sparsities({"L0": 100, "L1": 100, "L2": 100}, 0.7)
    assert per == pytest.approx({"L0": 0.7889, "L1": 0.6822, "L2": 0.6289}, abs=1e-4)
    assert sum(per.values()) / 3 == pytest.approx(0.7)
    assert max(per.values()) - min(per.values()) == pytest.approx(0.16)


def test_owl_with_wanda_and_sparsegpt_keeps_the_budget_and_differs_per_block() -> None:
    for criterion in ("wanda", "sparsegpt"):
        model = llama(3)
        sc.prune_(model, sparsity=0.7, criterion=criterion, allocation="owl", data=windows(3))
        per_block = [
            1
            - sum(int(m.weight.count_nonzero()) for m in b.modules() if isinstance(m, nn.Linear))
            / sum(m.weight.numel() for m in b.modules() if isinstance(m, nn.Linear))
            for b in model.model.layers
        ]
        assert sum(per_block) / 3 == pytest.approx(0.7, abs=0.01)
        assert 0.01 < max(per_block) - min(per_block) <= 0.16 + 0.01


# --------------------------------------------------------------------------- movement


def test_movement_scores_are_minus_weight_times_gradient_summed_over_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = sc.Pruner(
        model, sparsity=0.5, criterion="movement", schedule=sc.OneShot(at=5), allocation="uniform"
    )
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n.endswith("weight")}
    pruner.step()  # step 0: no gradient yet, nothing observed
    for _ in range(5):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for n, p in model.named_parameters():
            if n.endswith("weight"):
                expected[n] -= p.detach() * p.grad
        pruner.step()
    for name, score in expected.items():
        layer = model.get_submodule(name.rpartition(".")[0])
        kept = layer.weight != 0
        k = kept.numel() // 2
        assert int(kept.sum()) == kept.numel() - k
        assert score[kept].min() >= score[~kept].max()  # the highest movement scores stay
    with pytest.raises(sc.ConfigError, match="no gradient was seen"):
        sc.prune_(nn.Sequential(nn.Linear(4, 4)), sparsity=0.5, criterion="movement")


# --------------------------------------------------------------------------- depth


def test_block_influence_is_one_minus_the_cosine_of_input_and_output() -> None:
    model = llama(3)
    data = windows(4)
    path, influence = block_influence(model, data)
    assert path == "model.layers" and len(influence) == 3
    with torch.no_grad():
        states = [model(b, output_hidden_states=True).hidden_states for b in data]
    for i in range(2):  # the last hidden state has the final norm applied
        cos = torch.cat([
            nn.functional.cosine_similarity(s[i].reshape(-1, 32), s[i + 1].reshape(-1, 32))
            for s in states
        ])  # fmt: skip
        assert influence[i] == pytest.approx(1 - float(cos.mean()), abs=1e-5)
    small = drop_blocks(model, data, 1)
    report = sc.report_of(small, DepthReport)
    assert report.removed == [min(range(3), key=lambda i: influence[i])]
    assert small.config.num_hidden_layers == 2 and len(small.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert small.generate(data[0][:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    assert len(model.model.layers) == 3  # the original is untouched
    with pytest.raises(sc.ConfigError, match="at least one must stay"):
        drop_blocks(model, data, 3)


# --------------------------------------------------------------------------- files


def test_the_hf_directory_loads_without_secateurs_and_packed_nm_round_trips(tmp_path: Path) -> None:
    model = llama(2)
    sc.prune_(model, structure=sc.NM(2, 4), criterion="sparsegpt", data=windows())
    ids = windows(5)[0]
    with torch.no_grad():
        expected = model(ids).logits
    directory = export_huggingface(model, tmp_path / "hf")
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(directory)!r}, dtype=torch.float32)\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "print(json.dumps(m(ids).logits.tolist()))\n"
        "assert not [k for k in sys.modules if k.startswith('secateurs')]\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.tensor(json.loads(out.stdout)), expected, atol=1e-4, rtol=1e-4)
    size = export_packed_nm(model, tmp_path / "m.nm.safetensors")
    state = load_packed_nm(tmp_path / "m.nm.safetensors")
    sc.make_permanent_(model)
    for name, value in model.state_dict().items():
        if name in state:
            assert torch.equal(state[name], value), name
    dense_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert size < dense_bytes


def test_pruned_weights_stay_zero_and_kept_ones_are_reconstructed_by_sparsegpt() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    x = torch.randn(256, 16) @ torch.randn(16, 16)
    acc = HessianAccumulator(16)
    acc.add(x)
    work = w.clone()
    mask = sparsegpt_(work, acc.hessian(), sparsity=0.5)
    assert not bool(work[~mask].any()) or torch.equal(work * mask, work * mask)
    out_dense, out_pruned, out_masked = x @ w.T, x @ (work * mask).T, x @ (w * mask).T
    assert (out_dense - out_pruned).square().sum() < (out_dense - out_masked).square().sum()


# --------------------------------------------------------------------------- the recipe run

TEXT = Path("/usr/share/doc/python3/html/_sources/tutorial")
needs_text = pytest.mark.skipif(not TEXT.is_dir(), reason="python3-doc not installed (make data)")
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> int:
    from secateurs.cli import main

    return main(list(args))


@needs_text
def test_a_language_model_recipe_prunes_scores_and_ships(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "name: tiny\nmodel: {name: tiny-llama}\n"
        "data: {name: english-text, window: 64, calibration_windows: 8, evaluation_windows: 4}\n"
        "prune: {structure: {name: nm, n: 2, m: 4}, criterion: sparsegpt}\n"
        "finetune: {epochs: 0}\nexport: {compressed: true, quantization: none}\n"
    )
    assert run_cli("run", str(recipe), "--out", str(tmp_path / "out")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    dense, pruned, extra = report["dense"], report["pruned"], report["extra"]
    assert dense["perplexity"] > 1 and pruned["perplexity"] > 1
    assert extra["perplexity_from_hf_directory"] == pytest.approx(pruned["perplexity"], rel=1e-4)
    assert len(extra["oneshot"]["layers"]) == 14 and extra["oneshot"]["sequential"]
    assert all(layer["sparsity"] == 0.5 for layer in extra["oneshot"]["layers"])
    assert extra["export"]["packed_nm"]["file_bytes"] < dense["bytes_dense"]
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    assert (tmp_path / "out" / "model.sct").is_file()


@needs_text
@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("data.window=512", "the model has 256 positions"),
        ("finetune.epochs=1", "must be 0 for a language model"),
        ("data.name=fashion-mnist", "calibrated and scored on text"),
        ("data.calibration_windows=100000", "non-overlapping window"),
    ],
)
def test_bad_language_model_recipes_exit_2_naming_what_to_do(
    tmp_path: Path, setting: str, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "name: tiny\nmodel: {name: tiny-llama}\n"
        "data: {name: english-text, window: 64, calibration_windows: 4, evaluation_windows: 2}\n"
        "prune: {sparsity: 0.5, criterion: wanda}\nfinetune: {epochs: 0}\n"
    )
    code = run_cli("run", str(recipe), "--out", str(tmp_path / "out"), "--set", setting)
    assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out" / "hf").exists()


@pytest.mark.slow
@needs_text
def test_the_real_smollm2_recipe_runs_end_to_end_on_a_slice(tmp_path: Path) -> None:
    """The shipped recipe on SmolLM2-135M (the 98 MB model from PyPI), on a small slice."""
    pytest.importorskip("gguf")
    settings = ["data.window=128", "data.calibration_windows=4", "data.evaluation_windows=4"]
    args = ["run", str(REPO / "recipes" / "smollm2-sparsegpt-2of4.yaml"), "--out", str(tmp_path)]
    for item in settings:
        args += ["--set", item]
    assert run_cli(*args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    dense, pruned = report["dense"]["perplexity"], report["pruned"]["perplexity"]
    # 2:4 on a 135M model costs perplexity, but a broken update or mask would cost far more
    assert 5 < dense < pruned < 20 * dense
    layers = report["extra"]["oneshot"]["layers"]
    assert len(layers) == 210 and all(layer["sparsity"] == 0.5 for layer in layers)
    assert report["extra"]["perplexity_from_hf_directory"] == pytest.approx(pruned, rel=1e-3)
