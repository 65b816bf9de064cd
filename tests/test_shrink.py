"""``sc.shrink``: budgets met by search, allocation, round_to, ignored layers, iterative steps,
the replayable plan, the pipeline's ``shrink`` section, and bad input refused untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import secateurs as sc
from helpers import shrunk
from secateurs import cli
from secateurs.calibration import recalibrate_batchnorm_
from secateurs.graph import mask_plan_
from secateurs.metrics import profile
from secateurs.pipeline import load_model_from_checkpoint
from secateurs.shrink import round_step
from secateurs.zoo import build_model

REPO = Path(__file__).resolve().parents[1]


def vgg(seed: int = 0) -> nn.Module:
    model = build_model("vgg-bn", num_classes=10, in_channels=1, seed=seed)
    with torch.no_grad():  # distinct BN statistics so that every channel matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def resnet() -> nn.Module:
    return build_model("resnet-20", num_classes=10, in_channels=1, seed=0).eval()


X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("round_to", [None, 8])
@pytest.mark.parametrize("make", [vgg, resnet], ids=["vgg-bn", "resnet-20"])
def test_macs_budget_is_met_within_one_percent_and_counted_like_profile(
    make: Any, allocation: str, round_to: int | None
) -> None:
    model = make()
    small, report = shrunk(
        model, X[:1], budget=sc.MACs(0.5), allocation=allocation, round_to=round_to
    )
    dense_macs = profile(model, X[:1]).totals["macs"]
    small_macs = profile(small, X[:1]).totals["macs"]
    assert report.macs_before == dense_macs and report.macs_after == small_macs
    assert 0.49 <= small_macs / dense_macs <= 0.5
    assert report.channels_removed > 0
    if round_to:
        for before, after in zip(conv_widths(model), conv_widths(small), strict=True):
            assert after == before or after % round_to == 0


@pytest.mark.parametrize("make", [vgg, resnet], ids=["vgg-bn", "resnet-20"])
def test_default_rounds_kept_widths_by_group_width_and_stays_within_the_budget(make: Any) -> None:
    """``round_to="auto"``, the default: multiples of 16 in groups of 64 channels or more,
    of 8 in groups of 32-63, exact below; the budget holds, a step at most below it."""
    model = make()
    small, report = shrunk(model, X[:1], budget=sc.MACs(0.5))
    assert report.macs_after <= 0.5 * report.macs_before
    assert report.macs_after >= 0.45 * report.macs_before
    cut = 0
    for before, after in zip(conv_widths(model), conv_widths(small), strict=True):
        step = {True: 16, False: 8 if before >= 32 else 1}[before >= 64]
        assert after == before or after % step == 0, (before, after)
        cut += after < before
    assert cut > 0
    assert [round_step(n, "auto") for n in (8, 31, 32, 63, 64, 512)] == [1, 1, 8, 8, 16, 16]
    assert round_step(48, None) == 1 and round_step(48, 12) == 12


def test_shrunk_model_equals_the_masked_model_and_the_original_is_untouched() -> None:
    model = resnet()
    before = state_copy(model)
    small, report = shrunk(model, X[:1], budget=sc.MACs(0.6))
    assert same_state(model, before)
    masked = mask_plan_(copy.deepcopy(model), report.plan)
    with torch.no_grad():
        torch.testing.assert_close(small(X), masked(X), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(masked(X), model(X), atol=1e-4)  # channels really mattered
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(
        type(m).__module__.startswith(("torch.nn", "secateurs.zoo")) for m in small.modules()
    )


@pytest.mark.parametrize("train", [False, True])
def test_the_shrunk_copy_shares_no_tensor_with_the_original(train: bool) -> None:
    # eval mode takes the sharing copy (tensors shared until surgery), train mode a full copy
    model = resnet().train(train)
    small, _ = shrunk(model, X[:1], budget=sc.MACs(0.6))
    ours = {t.data_ptr() for t in [*small.parameters(), *small.buffers()] if t.numel()}
    theirs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    assert not ours & theirs
    before = state_copy(model)
    with torch.no_grad():
        for t in [*small.parameters(), *small.buffers()]:
            t.add_(1)
    assert same_state(model, before)


def test_params_and_channel_budgets() -> None:
    model = vgg()
    total = sum(p.numel() for p in model.parameters())
    small = sc.shrink(model, X[:1], budget=sc.Params(0.5))
    assert sum(p.numel() for p in small.parameters()) <= 0.5 * total
    small, report = shrunk(model, X[:1], budget=sc.Sparsity(0.25))
    assert report.channels_removed >= 0.25 * report.channels_prunable
    assert report.channels_removed <= 0.25 * report.channels_prunable + report.groups
    by_name = sc.shrink(model, X[:1], budget={"name": "macs", "keep": 0.5})
    assert conv_widths(by_name) == conv_widths(sc.shrink(model, X[:1], budget=sc.MACs(0.5)))


def test_max_ratio_caps_every_group_and_an_unreachable_budget_says_what_is_reachable() -> None:
    model = vgg()
    small = sc.shrink(model, X[:1], budget=sc.Sparsity(0.4), max_ratio=0.5)
    for before, after in zip(conv_widths(model), conv_widths(small), strict=True):
        assert after >= before * 0.5
    before = state_copy(model)
    with pytest.raises(sc.BudgetError, match="leaves"):
        sc.shrink(model, X[:1], budget=sc.MACs(0.05), max_ratio=0.5)
    with pytest.raises(sc.BudgetError):
        sc.shrink(model, X[:1], budget=sc.MACs(1))
    assert same_state(model, before)


def test_excluded_layers_keep_their_output_channels_and_included_ones_alone_lose_some() -> None:
    model = vgg()
    first = model.features[0][0]
    small = sc.shrink(
        model, X[:1], budget=sc.MACs(0.6), exclude=["features.0.0", r"features\.1\.0"]
    )
    assert conv_widths(small)[:2] == [32, 32]
    assert conv_widths(small)[2:] != conv_widths(model)[2:]
    small = sc.shrink(model, X[:1], budget=sc.MACs(0.6), exclude=[first])
    assert conv_widths(small)[0] == 32
    # include: only the layers it names may lose output channels, by type or by name
    small = sc.shrink(model, X[:1], budget=sc.Params(0.9), include=[r"features\.[34]\.0"])
    widths, dense = conv_widths(small), conv_widths(model)
    assert widths[:2] == dense[:2] and widths[4:] == dense[4:] and widths[2:4] != dense[2:4]
    with pytest.raises(sc.ConfigError, match=r"'features\.9'"):
        sc.shrink(model, X[:1], budget=sc.MACs(0.6), exclude=["features.9"])
    with pytest.raises(sc.ConfigError, match="not a module"):
        sc.shrink(model, X[:1], budget=sc.MACs(0.6), exclude=[nn.Linear(2, 2)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.5}, "budget must be"),
        ({"budget": sc.MACs(0.5), "allocation": "lamp"}, "allocation"),
        ({"budget": sc.MACs(0.5), "round_to": 0}, "round_to"),
        ({"budget": sc.MACs(0.5), "steps": 0}, "steps"),
        ({"budget": sc.MACs(0.5), "max_ratio": 1.5}, "max_ratio"),
        ({"budget": sc.MACs(0.5), "criterion": "no_such"}, "no_such"),
        ({"budget": sc.MACs(0.5), "criterion": "taylor"}, "calibration data"),
    ],
)
def test_bad_arguments_are_config_errors_and_nothing_changes(
    kwargs: dict[str, Any], match: str
) -> None:
    model = vgg()
    before = state_copy(model)
    with pytest.raises(sc.ConfigError, match=match):
        sc.shrink(model, X[:1], **kwargs)
    assert same_state(model, before)


def test_macs_budget_values_are_checked() -> None:
    for bad in (0.0, 1.5, -3, True, "half"):
        with pytest.raises(sc.ConfigError, match="MACs keep"):
            sc.MACs(bad)  # type: ignore[arg-type]
    with pytest.raises(sc.ConfigError, match=r"sc\.shrink"):
        sc.prune_(vgg(), budget=sc.MACs(0.5))


def test_a_parametrized_model_is_refused() -> None:
    model = vgg()
    sc.prune_(model, sparsity=0.5)
    with pytest.raises(sc.ModelError, match="make_permanent_"):
        sc.shrink(model, X[:1], budget=sc.MACs(0.5))


def test_iterative_steps_finetune_between_cuts_and_the_plan_replays() -> None:
    model = resnet()
    calls: list[int] = []

    def finetune(m: nn.Module, step: int) -> None:
        calls.append(step)
        with torch.no_grad():  # a stand-in for training: weights move between the cuts
            for p in m.parameters():
                p.mul_(1.01)

    small, report = shrunk(model, X[:1], budget=sc.MACs(0.5), steps=3, finetune=finetune)
    assert calls == [1, 2]
    assert 0.49 <= report.macs_ratio <= 0.5
    fresh = resnet()
    sc.apply_plan_(fresh, report.plan)
    fresh.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), small(X))


def test_plan_round_trips_through_safetensors_into_a_fresh_model(tmp_path: Path) -> None:
    model = resnet()
    small, report = shrunk(model, X[:1], budget=sc.MACs(0.5), allocation="global")
    path = sc.export_safetensors(small, tmp_path / "small.safetensors", channel_plan=report.plan)
    plan = sc.ChannelPlan.from_json(report.plan.to_json())
    assert plan == report.plan
    fresh = sc.load_safetensors(path, resnet())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), small(X))
    with pytest.raises(sc.ConfigError, match="version"):
        sc.ChannelPlan.from_json(json.dumps({"version": 99, "removed": {}}))
    with pytest.raises(sc.ConfigError, match="not a secateurs channel plan"):
        sc.ChannelPlan.from_json("[1, 2]")
    with pytest.raises(sc.ConfigError, match="no_such"):
        sc.apply_plan_(resnet(), sc.ChannelPlan({"no_such.weight": {0: [1]}}))


def test_same_seed_same_plan_and_random_criterion_depends_on_the_seed() -> None:
    model = vgg()
    plans = [
        shrunk(model, X[:1], budget=sc.MACs(0.5), criterion="random", seed=s)[1].plan
        for s in (1, 1, 2)
    ]
    assert plans[0] == plans[1] and plans[0] != plans[2]


def test_gradient_criterion_with_calibration_data_and_no_grad_eval_callers() -> None:
    model = vgg().train()
    data = DataLoader(
        TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))), batch_size=8
    )
    with torch.no_grad():
        small = sc.shrink(
            model, X[:1], budget=sc.MACs(0.5), criterion="taylor", data=data,
            loss_fn=nn.functional.cross_entropy,
        )  # fmt: skip
    assert model.training and all(m.training for m in model.modules())
    assert conv_widths(small) != conv_widths(model)


def test_recipe_shrink_section_runs_and_the_checkpoint_reloads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli.main([
        "run", str(REPO / "recipes" / "quick-synthetic.yaml"), "--out", str(out),
        "--set", "model.name=vgg-bn", "--set", "data.limit_train=128",
        "--set", "data.limit_test=64", "--set", "prune.sparsity=0.2",
        "--set", "shrink={budget: {name: macs, keep: 0.5}, steps: 2, epochs_between: 1}",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    # kept widths rounded by width (round_to="auto") land at most a step below the budget
    assert (
        0.45
        <= report["extra"]["shrink"]["macs_after"] / report["extra"]["shrink"]["macs_before"]
        <= 0.5
    )
    assert report["pruned"]["macs"] < 0.5 * report["dense"]["macs"]
    model, meta = load_model_from_checkpoint(out / "model.safetensors")
    assert "channel_plan" in meta and conv_widths(model) != [32, 32, 64, 64, 128]
    assert cli.main(["summary", str(out / "model.safetensors")]) == 0


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ("{budget: {name: macs, keep: 0.5}, allocation: lamp}", "shrink.allocation"),
        ("{budget: {name: macs, keep: 2.5}}", "shrink.budget"),
        ("{budget: {name: macs, keep: 0.5}, bogus: 1}", "bogus"),
        ("{budget: {name: macs, keep: 0.5}, steps: 0}", "shrink.steps"),
    ],
)
def test_bad_shrink_sections_are_refused_before_any_work(
    section: str, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "run",
            str(REPO / "recipes" / "quick-synthetic.yaml"),
            "--out",
            str(tmp_path),
            "--set",
            f"shrink={section}",
        ]
    )
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "dense.safetensors").exists()


class Unknown(nn.Module):
    """A conv whose output goes through an op without a channel rule (an FFT)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.fft.fft(self.b(x), dim=-1).real  # unknown to secateurs
        x = torch.relu(self.c(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_unknown_ops_keep_their_channels_and_are_reported_or_refused_when_strict() -> None:
    model = Unknown().eval()
    small, report = shrunk(model, X[:1], budget=sc.Sparsity(0.2))
    assert small.b.out_channels == 8 and small.a.out_channels < 8
    assert report.unhandled == ["fft_fft in <model>"]  # op name, and where: the model's forward
    with pytest.raises(sc.ModelError, match="fft"):
        sc.shrink(model, X[:1], budget=sc.Sparsity(0.2), strict=True)


@pytest.mark.parametrize(
    "name", ["bn_scale", "apoz", "mean_activation", "fpgm", "regression", "channel_obs"]
)
def test_channel_criteria_are_refused_for_masks_with_a_pointer_to_shrink(name: str) -> None:
    model = vgg()
    before = state_copy(model)
    with pytest.raises(sc.ConfigError, match=r"sc\.shrink"):
        sc.prune_(model, sparsity=0.5, criterion=name)
    assert same_state(model, before)


# ------------------------------------------------------------------------- reconstruction


def _batches(n: int, seed: int, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(32, 1, 28, 28, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x).argmax(1)) for x in xs]


def _relative_error(small: nn.Module, dense: nn.Module, batches: list[Any]) -> float:
    with torch.no_grad():
        num = sum(float((small(x) - dense(x)).square().sum()) for x, _ in batches)
        den = sum(float(dense(x).square().sum()) for x, _ in batches)
    return num / den


@pytest.mark.parametrize("make", [vgg, resnet], ids=["vgg-bn", "resnet-20"])
def test_reconstruction_brings_the_outputs_back_toward_the_dense_model(make: Any) -> None:
    model = make()
    calib, held_out = _batches(4, 0, model), _batches(2, 1, model)
    recalibrate_batchnorm_(model, calib + held_out)  # statistics of its data, as when trained
    before = state_copy(model)
    # exact widths: the comparison with re-estimated statistics alone is pinned on this cut
    l2 = {"criterion": {"name": "magnitude", "p": 2}, "round_to": None}
    plain = sc.shrink(model, X[:1], sc.MACs(0.5), data=calib, reconstruct=False, **l2)
    rebuilt = sc.shrink(model, X[:1], sc.MACs(0.5), data=calib, **l2)  # on with data
    assert same_state(model, before)
    plans = [sc.report_of(m, sc.ShrinkReport).plan.removed for m in (plain, rebuilt)]
    assert plans[0] == plans[1]  # the same channels are cut
    # re-estimating BatchNorm alone is not the reconstruction: it does less
    stats_only = copy.deepcopy(plain)
    recalibrate_batchnorm_(stats_only, calib)
    err_plain = _relative_error(plain, model, held_out)
    err_stats = _relative_error(stats_only, model, held_out)
    err_rebuilt = _relative_error(rebuilt, model, held_out)
    assert err_rebuilt < 0.5 * err_plain, (err_plain, err_stats, err_rebuilt)
    assert err_rebuilt < err_stats, (err_plain, err_stats, err_rebuilt)


def test_the_default_criterion_is_channel_obs_when_the_cut_is_reconstructed() -> None:
    model = vgg()
    calib = _batches(2, 0, model)

    def removed(**kw: Any) -> Any:
        small = sc.shrink(model, X[:1], sc.MACs(0.5), **kw)
        return sc.report_of(small, sc.ShrinkReport).plan.removed

    assert removed(data=calib) == removed(data=calib, criterion="channel_obs")
    assert removed() == removed(criterion={"name": "magnitude", "p": 2})
    not_rebuilt = removed(data=calib, reconstruct=False)
    assert not_rebuilt == removed(criterion={"name": "magnitude", "p": 2})
    assert removed(data=calib) != not_rebuilt  # the two rankings differ here


def test_reconstruction_reestimates_batchnorm_only_after_a_layer_it_could_not_refit() -> None:
    # a Conv3d that loses input channels is not refitted (im2col here is 1-D and 2-D): the
    # BatchNorm after it gets statistics of the calibration batches; the one after the first
    # convolution (no input cut, its kept outputs unchanged) keeps the original statistics.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 4),
    ).eval()  # fmt: skip
    data = [(torch.randn(8, 1, 6, 6, 6), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    recalibrate_batchnorm_(model, data)
    small = sc.shrink(model, data[0][0][:1], sc.Sparsity(0.5), data=data)
    removed = sc.report_of(small, sc.ShrinkReport).plan.removed
    kept = [i for i in range(8) if i not in removed["0.weight"][0]]
    assert torch.equal(small[1].running_mean, model[1].running_mean[kept])
    assert torch.equal(small[1].running_var, model[1].running_var[kept])
    fresh = copy.deepcopy(small)
    recalibrate_batchnorm_(fresh, data, only=[fresh[4]])
    assert torch.allclose(small[4].running_mean, fresh[4].running_mean, atol=1e-6)
    assert torch.allclose(small[4].running_var, fresh[4].running_var, atol=1e-6)
    kept4 = [i for i in range(6) if i not in removed["3.weight"][0]]
    assert not torch.allclose(small[4].running_mean, model[4].running_mean[kept4], atol=1e-3)


@pytest.mark.parametrize("criterion", [None, {"name": "regression", "samples": 64}])
def test_a_batchnorm_after_a_refitted_layer_keeps_its_statistics(criterion: Any) -> None:
    # whichever refits it (the reconstruction, or a criterion that refits by itself), a
    # refitted layer reproduces its original outputs, so the BatchNorm it feeds keeps the
    # original statistics of its kept channels
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).eval()  # fmt: skip
    data = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    recalibrate_batchnorm_(model, data)
    small = sc.shrink(model, data[0][0][:1], sc.Sparsity(0.5), data=data, criterion=criterion)
    removed = sc.report_of(small, sc.ShrinkReport).plan.removed
    assert removed["3.weight"][1]  # the second convolution lost inputs: it was refitted
    kept = [i for i in range(6) if i not in removed["3.weight"].get(0, [])]
    assert torch.equal(small[4].running_mean, model[4].running_mean[kept])
    assert torch.equal(small[4].running_var, model[4].running_var[kept])


def test_reconstruction_is_the_least_squares_refit_of_the_layer_that_reads_the_cut() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(64, 8)
    data = [
        (x[:32], torch.zeros(32, dtype=torch.long)),
        (x[32:], torch.zeros(32, dtype=torch.long)),
    ]
    small = sc.shrink(model, x[:1], sc.Sparsity(0.5), data=data, reconstruct_samples=64)
    removed = sc.report_of(small, sc.ShrinkReport).plan.removed["0.weight"][0]
    kept = [i for i in range(6) if i not in removed]
    with torch.no_grad():
        hidden = model[1](model[0](x))[:, kept].double()
        target = (model[2](model[1](model[0](x))) - model[2].bias).double()
        expected = torch.linalg.lstsq(hidden, target).solution.T
    assert torch.allclose(small[2].weight.double(), expected, atol=1e-4)
    assert torch.equal(small[2].bias, model[2].bias)  # biases stay
    assert torch.equal(small[0].weight, model[0].weight[kept])  # no cut input: not refitted


def test_reconstruction_options_are_checked_and_nothing_changes() -> None:
    model = vgg()
    before = state_copy(model)
    with pytest.raises(sc.ConfigError, match=r"reconstruct=True refits layers on calibration"):
        sc.shrink(model, X[:1], sc.MACs(0.5), reconstruct=True)
    with pytest.raises(sc.ConfigError, match="reconstruct must be true, false or null"):
        sc.shrink(model, X[:1], sc.MACs(0.5), reconstruct="yes")
    with pytest.raises(sc.ConfigError, match="reconstruct_samples"):
        sc.shrink(model, X[:1], sc.MACs(0.5), data=_batches(1, 0, model), reconstruct_samples=0)
    assert same_state(model, before)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("keep", [0.3, 0.55, 0.8])
def test_budget_search_skipping_groups_that_broke_a_count_budget_finds_the_same_cut(
    allocation: str, keep: float
) -> None:
    """The give-back step skips a group whose step back broke a MACs budget (it can only cost
    more later); on a count budget that must change nothing, only the number of measurements."""
    from secateurs.shrink import ShrinkConfig, _search, channel_candidates, channel_measure

    torch.manual_seed(0)
    model = build_model("resnet-20").eval()
    x = torch.randn(1, 1, 28, 28)
    config = ShrinkConfig(allocation=allocation)
    graph, cands, _ = channel_candidates(model, x, config)
    value, limit, unit = channel_measure(sc.MACs(keep), graph, model, x)
    calls = [0, 0]

    def counted(slot: int) -> Any:
        def measure(removed: dict[int, torch.Tensor]) -> float:
            calls[slot] += 1
            return value(removed)

        return measure

    assert config.allocation_ is not None
    fast = _search(cands, (counted(0), limit, unit), config.allocation_, None, monotone=True)
    slow = _search(cands, (counted(1), limit, unit), config.allocation_, None, monotone=False)
    assert fast.keys() == slow.keys()
    assert all(torch.equal(fast[g], slow[g]) for g in fast)
    assert value(fast) <= limit
    assert calls[0] <= calls[1]  # and it measured no more removals
