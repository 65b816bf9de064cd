"""Sparse training on Fashion-MNIST: gradual magnitude vs lottery tickets vs SET vs RigL vs DSD.

For LeNet-300-100 and LeNet-5, at each sparsity, every method gets the same total number of
optimizer steps, ``dense_epochs + epochs`` epochs of batch 128 (SGD, Nesterov momentum 0.9,
weight decay 5e-4, lr 0.05 with cosine decay, as ``secateurs.train.TrainConfig``'s defaults;
``--lr``, ``--warmup`` and ``--clip-grad`` change each method's own training, never the dense
model's nor the lottery-ticket experiment's below):

* methods that prune a trained network start from the dense model trained ``--dense-epochs``
  (the cache ``bench_finegrained.py`` uses) and train ``--epochs`` more:

  - ``gradual``: Zhu & Gupta's cubic schedule over the first 2/3 of the epochs, LAMP;
  - ``lottery``: iterative magnitude pruning in 5 rounds (LAMP), each round rewinding the
    surviving weights to step ``--rewind-steps`` of this run and restarting the cosine learning
    rate (so the final ticket trains one sixth of the budget);
  - ``dsd``: Dense-Sparse-Dense: prune to the sparsity (LAMP) at 1/3, re-densify at 2/3. DSD
    ends *dense*: its final sparsity is reported as measured (0) and its line in the plot is
    dashed, at the sparsity of its sparse phase, for context only;

* methods that train sparse from scratch start from the same random initialisation as the
  dense model and train ``dense_epochs + epochs`` epochs without ever holding a dense model:

  - ``set`` and ``rigl``: ERK random sparse initialisation, drop/grow 30% of each layer's live
    weights every 100 steps until 3/4 of training (RigL: cosine-decayed fraction, grown where
    the dense gradient of the current batch is largest);
  - ``static`` (not run by default): the same ERK mask, never moved (the control for SET/RigL).

  With ``--from-gradual-mask`` each of them also runs from gradual's final mask at the same seed
  and sparsity, its weights re-initialised as its own start (rows ``<method>@gradual``): the
  lottery-ticket paper's random re-initialisation control, which tells whether what a method
  lacks against gradual is the mask it finds or the weights gradual inherits from the dense model.

Training FLOPs count sparsity, as in the RigL paper: per step ``3 x examples x sum over layers
of (per-example MACs x density)`` (forward, input gradient, weight gradient), densities sampled
every 20 steps and after every pruning event, plus RigL's (and ``--set-grow live``'s) dense-gradient passes
(``2 x sparse + 1 x dense`` per example on update steps) and, with distillation, the dense
teacher's forward pass. For the methods that start from the dense model the reported total
includes the dense model's training (``--dense-epochs`` at full density); ``x dense`` divides
by the cost of training the dense model for the same total steps. Wall time is the method's
own phase only (the dense model comes from a cache).

Then distillation from the dense model (temperature 4, alpha 0.9: ``Distillation``'s
defaults) is added to the best sparse method at the highest sparsity, and the lottery-ticket
shape is checked on LeNet-300-100: IMP from a random initialisation, 20% of the weights per
round for 7 rounds (down to 21% of the weights), ``--lth-epochs`` epochs per round, rewinding to
step ``--rewind-steps``; each round's mask is also trained from a fresh random initialisation
(the control). The shape holds when the final ticket is within 0.5 points of the dense network
trained the same epochs and the random re-initialisation of its mask is at least 0.5 points
below the ticket.

Budget: the defaults run in about an hour on 2 CPU cores, one thread. To fit, LeNet-5 runs at
90, 98 and 99% only (95% is skipped unless ``--sparsities`` is given, which applies to every
model). Sparsities run from the highest down, distillation right after the highest, and the
JSON and plot are rewritten after every model and after the lottery-ticket experiment, so a run
cut short keeps what matters most. Writes ``results/sparse_training.json`` and
``results/sparse_training.png``.

    python benchmarks/bench_sparse_training.py
    python benchmarks/bench_sparse_training.py --quick        # a tiny end-to-end check
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import secateurs as sc
from bench_finegrained import TRAIN_LR, dense_model, sparsity_of, write_results
from secateurs.data import DataBundle, load_fashion_mnist
from secateurs.masks import set_mask
from secateurs.metrics import evaluate, profile
from secateurs.registry import to_spec
from secateurs.schedules import (
    DECAY_RULES,
    DISTRIBUTIONS,
    DSD,
    INIT_RULES,
    REDISTRIBUTE_RULES,
    SET,
    SET_GROW_RULES,
    Gradual,
    Lottery,
    RigL,
    Schedule,
    Static,
)
from secateurs.sparse_training import rescale_for_kept_fan_in_
from secateurs.train import Distillation, TrainConfig, train
from secateurs.zoo import build_model

RESULTS = Path(__file__).parent / "results"
BATCH = 128
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
LOTTERY_ROUNDS = 5
DROP_FRACTION = 0.3
SAMPLE_EVERY = 20
ALL_SPARSITIES = [0.9, 0.95, 0.98, 0.99]
DEFAULT_SPARSITIES = {"lenet-300-100": ALL_SPARSITIES, "lenet-5": [0.9, 0.98, 0.99]}
METHODS = ["gradual", "lottery", "set", "rigl", "dsd", "static"]
DEFAULT_METHODS = ["gradual", "lottery", "set", "rigl", "dsd"]
FROM_DENSE = {"gradual", "lottery", "dsd"}
ENDS_DENSE = {"dsd"}
LTH_MODEL = "lenet-300-100"
LTH_RATE = 0.2
STYLE = {
    "gradual": ("tab:blue", "o", "-"),
    "lottery": ("tab:orange", "s", "-"),
    "set": ("tab:green", "^", "-"),
    "rigl": ("tab:red", "v", "-"),
    "dsd": ("tab:purple", "D", "--"),
    "static": ("tab:gray", "x", ":"),
}


# --------------------------------------------------------------------------- accounting


class CurrentBatch:
    """RigL's calibration data: the training batch of the current step (and, with ``keep`` > 1,
    the ``keep - 1`` batches before it), nothing else."""

    def __init__(self, keep: int = 1) -> None:
        self.recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=keep)

    def add(self, batch: tuple[Tensor, Tensor]) -> None:
        self.recent.append(batch)

    def examples(self) -> int:
        return sum(x.shape[0] for x, _ in self.recent)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from reversed(self.recent)


class FlopCounter:
    """Per-example forward MACs of the prunable layers, weighted by their current density."""

    def __init__(self, model: nn.Module, example: Tensor) -> None:
        stats = profile(model, example)
        self.macs = {layer.name: layer.macs for layer in stats.layers if layer.macs}
        self.dense = sum(self.macs.values())

    def forward(self, model: nn.Module) -> tuple[float, float]:
        """(per-example forward MACs counting zeros as free, density of those layers)."""
        modules = dict(model.named_modules())
        macs, nonzeros, params = 0.0, 0, 0
        with torch.no_grad():
            for name, m in self.macs.items():
                w = modules[name].weight
                nz = int(torch.count_nonzero(w))
                macs += m * nz / w.numel()
                nonzeros, params = nonzeros + nz, params + w.numel()
        return macs, nonzeros / params


@dataclass
class FitResult:
    flops: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    max_density: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def cosine(lr: float, position: int, length: int) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * min(position, length) / max(length, 1)))


def restarted_cosine(lr: float, steps: int, every: int, rounds: int) -> Callable[[int], float]:
    """Cosine decay restarted at every lottery round (weights and schedule both rewind)."""

    def at(t: int) -> float:
        segment = min(t // every, rounds)
        length = every if segment < rounds else steps - rounds * every
        return cosine(lr, t - segment * every, length)

    return at


def fit(
    model: nn.Module,
    loader: Any,
    steps: int,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    counter: FlopCounter,
    *,
    pruner: sc.Pruner | None = None,
    kd: Distillation | None = None,
    holder: CurrentBatch | None = None,
    before_pruner: Callable[[int], None] | None = None,
    seed: int = 0,
    clip: float | None = None,
    step_first: bool = True,
) -> FitResult:
    """``steps`` optimizer steps; ``pruner.step()`` once before the first (unless
    ``step_first`` is false: the caller has taken step 0) and after each.

    ``before_pruner(t)`` runs after optimizer step ``t`` (from 1), before the pruner acts; the
    time it takes (evaluations) is not counted. ``clip``: largest gradient norm (all
    parameters together) an optimizer step uses.
    """
    torch.manual_seed(seed)
    result = FitResult()
    excluded = 0.0
    start = time.perf_counter()
    model.train()
    if pruner is not None and step_first:
        pruner.step()
    forward, density = counter.forward(model)
    result.max_density = density
    batches = iter(loader)
    t = 0
    while t < steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        if holder is not None:
            holder.add((x, y))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        if kd is not None:
            loss = kd.loss(loss, inputs=x, outputs=out)
            result.flops += x.shape[0] * counter.dense
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        result.flops += 3 * x.shape[0] * forward
        t += 1
        if before_pruner is not None:
            t0 = time.perf_counter()
            before_pruner(t)
            excluded += time.perf_counter() - t0
        acted = False
        if pruner is not None:
            seen = len(pruner.history)
            acted = pruner.step()
            for event in pruner.history[seen:]:
                if event.kind == "drop_grow" and holder is not None:
                    result.flops += holder.examples() * (2 * forward + counter.dense)
        if acted or t % SAMPLE_EVERY == 0:
            forward, density = counter.forward(model)
            result.max_density = max(result.max_density, density)
    result.steps = t
    result.seconds = time.perf_counter() - start - excluded
    return result


# --------------------------------------------------------------------------- methods


@dataclass
class Context:
    """One model and seed: data, the dense model and the budgets."""

    name: str
    seed: int
    bundle: DataBundle
    dense: nn.Module
    dense_accuracy: float
    example: Tensor
    counter: FlopCounter
    steps_per_epoch: int
    args: argparse.Namespace

    def loaders(self) -> Any:
        return self.bundle.loaders(BATCH, seed=self.seed)

    def dense_training_flops(self, epochs: int) -> float:
        return 3 * self.counter.dense * len(self.bundle.train) * epochs


@dataclass
class Plan:
    schedule: Schedule
    epochs: int
    steps: int
    lr_at: Callable[[int], float]
    allocation: str
    from_dense: bool
    notes: dict[str, Any] = field(default_factory=dict)


def own_lr(args: argparse.Namespace) -> float:
    """The peak learning rate of a method's own training (``--lr``; the dense model is always
    trained at ``TRAIN_LR``)."""
    return TRAIN_LR if args.lr is None else float(args.lr)


def warm_cosine(
    args: argparse.Namespace, steps: int, notes: dict[str, Any]
) -> Callable[[int], float]:
    """Cosine decay from :func:`own_lr` over ``steps``, after ``--warmup`` steps of linear
    warm-up; the rate, warm-up and ``--clip-grad`` are recorded in the run's ``notes``."""
    lr, warm = own_lr(args), max(int(args.warmup), 1)
    notes.update(lr=lr, warmup_steps=args.warmup, clip_grad=args.clip_grad)
    return lambda t: cosine(lr, t, steps) * min(1.0, (t + 1) / warm)


def plan_for(method: str, ctx: Context) -> Plan:
    args, spe = ctx.args, ctx.steps_per_epoch
    if method in FROM_DENSE:
        epochs = args.epochs
        steps = epochs * spe
        if method == "gradual":
            end = max(1, round(epochs * 2 / 3)) * spe
            schedule: Schedule = Gradual(start=0, end=end, every=max(1, spe // 4))
            notes: dict[str, Any] = {"prune_until_step": end}
        elif method == "lottery":
            every = steps // (LOTTERY_ROUNDS + 1)
            rewind = min(args.rewind_steps, every // 2)
            schedule = Lottery(every=every, rewind=rewind, rounds=LOTTERY_ROUNDS)
            notes = {"rounds": LOTTERY_ROUNDS, "round_steps": every, "rewind_step": rewind}
            lr_at = restarted_cosine(own_lr(args), steps, every, LOTTERY_ROUNDS)
            return Plan(schedule, epochs, steps, lr_at, args.allocation, True, notes)
        else:
            schedule = DSD(start=steps // 3, end=2 * steps // 3)
            notes = {"sparse_from_step": steps // 3, "dense_again_at_step": 2 * steps // 3}
        return Plan(
            schedule,
            epochs,
            steps,
            warm_cosine(args, steps, notes),
            args.allocation,
            True,
            notes,
        )
    epochs = args.dense_epochs + args.epochs
    steps = epochs * spe
    every = min(args.update_every, max(1, steps // 20))
    end = max(1, int(args.update_until * steps))
    cls = {"set": SET, "rigl": RigL, "static": Static}[method]
    init: dict[str, Any] = {} if args.sparse_init is None else {"init": args.sparse_init}
    if args.min_fan_in is not None:
        init["min_fan_in"] = args.min_fan_in
    if method != "static":  # the drop-and-grow options (static keeps its mask: it takes none)
        init.update(every=every, end=end, fraction=args.drop_fraction)
        for key in ("redistribute", "decay", "grow_scale"):
            if getattr(args, key) is not None:
                init[key] = getattr(args, key)
        if method == "set":
            init["grow"] = args.set_grow
    sparse = cls(distribution=args.distribution, **init)
    notes = {
        "distribution": args.distribution,
        "init": sparse.init,
        "min_fan_in": sparse.min_fan_in,
    }
    if isinstance(sparse, SET | RigL):  # what the updates did (static makes none)
        notes.update(
            update_every=every,
            drop_fraction=args.drop_fraction,
            updates_until_step=end,
            redistribute=sparse.redistribute,
            decay=sparse.decay,
            grow_scale=sparse.grow_scale,
            grow=sparse.grow_rule,
        )
    return Plan(
        sparse, epochs, steps, warm_cosine(args, steps, notes), args.distribution, False, notes
    )


def make_optimizer(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=TRAIN_LR,
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=weight_decay,
    )


def adopt_masks_(pruner: sc.Pruner, masks: dict[str, Tensor], fresh: nn.Module, init: str) -> None:
    """Replace a sparse-from-scratch start (taken at step 0) by ``masks`` over ``fresh``'s
    weights, re-scaled for each unit's kept fan-in as the schedule's own start is (``init``):
    the random re-initialisation of another method's mask."""
    weights = dict(fresh.named_parameters())
    with torch.no_grad():
        for t in pruner.targets:
            t.raw.copy_(weights[t.name])
            set_mask(t.module, t.attr, masks[t.name])
            if init != "none":
                rescale_for_kept_fan_in_(t.raw, masks[t.name], t.transposed)


def run_method(
    ctx: Context,
    method: str,
    sparsity: float,
    distill: bool = False,
    *,
    start_masks: dict[str, Tensor] | None = None,
    masks_out: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """One method at one sparsity. ``start_masks`` (sparse-from-scratch methods): start from
    these masks instead of the schedule's random ones (row labelled ``<method>@gradual``);
    ``masks_out`` receives the final masks."""
    plan = plan_for(method, ctx)
    if start_masks is not None and plan.from_dense:
        raise ValueError(f"{method} starts from the dense model: it takes no start mask")
    model = copy.deepcopy(ctx.dense) if plan.from_dense else build_model(ctx.name, seed=ctx.seed)
    train_loader, test_loader = ctx.loaders()
    optimizer = make_optimizer(model, ctx.args.weight_decay)
    # the recent training batches, for the schedules whose updates read a dense gradient
    holder = CurrentBatch(ctx.args.grow_batches) if plan.schedule.needs_data else None
    pruner = sc.Pruner(
        model,
        sparsity=sparsity,
        schedule=plan.schedule,
        allocation=plan.allocation,
        optimizer=optimizer,
        seed=ctx.seed,
        data=holder,
        loss_fn=nn.functional.cross_entropy if holder is not None else None,
        calibration_batches=ctx.args.grow_batches,
    )
    notes = dict(plan.notes, weight_decay=ctx.args.weight_decay)
    if start_masks is not None:  # the schedule's step 0 (its random start), then the given mask
        pruner.step()
        init = getattr(plan.schedule, "init", "rescale")
        adopt_masks_(pruner, start_masks, build_model(ctx.name, seed=ctx.seed), init)
        notes["start_mask"] = (
            "gradual's final mask at this seed and sparsity, weights re-initialised"
        )
    if holder is not None:
        notes["grow_batches"] = ctx.args.grow_batches

    def before_pruner(t: int) -> None:
        if method == "dsd" and t == plan.schedule.last_step():
            notes["sparse_phase_accuracy"] = evaluate(model, test_loader).accuracy
            notes["sparse_phase_sparsity"] = pruner.measured_sparsity()

    kd = None
    if distill:
        config = Distillation(
            temperature=ctx.args.distill_temperature, alpha=ctx.args.distill_alpha
        )
        kd = config.bind(copy.deepcopy(ctx.dense), model, ctx.example)
        notes["distillation"] = {"temperature": kd.temperature, "alpha": kd.alpha}
    try:
        fitted = fit(
            model,
            train_loader,
            plan.steps,
            optimizer,
            plan.lr_at,
            ctx.counter,
            pruner=pruner,
            kd=kd,
            holder=holder,
            before_pruner=before_pruner,
            seed=ctx.seed,
            clip=ctx.args.clip_grad,
            step_first=start_masks is None,
        )
    finally:
        if kd is not None:
            kd.close()
    final_masks = sc.collect_masks(model)
    if masks_out is not None:
        masks_out.update({name: mask.clone() for name, mask in final_masks.items()})
    kept = {name: int(mask.sum()) for name, mask in final_masks.items()}
    # output units (rows, filters) that keep at least one input: how spread the budget is
    fed = {name: int(m.reshape(m.shape[0], -1).any(1).sum()) for name, m in final_masks.items()}
    sc.make_permanent_(model)
    accuracy = evaluate(model, test_loader).accuracy
    pretrain_epochs = ctx.args.dense_epochs if plan.from_dense else 0
    pretrain_flops = ctx.dense_training_flops(pretrain_epochs)
    total_flops = fitted.flops + pretrain_flops
    total_epochs = pretrain_epochs + plan.epochs
    return {
        "kind": "run",
        "model": ctx.name,
        "seed": ctx.seed,
        "method": method
        + ("@gradual" if start_masks is not None else "")
        + ("+distill" if distill else ""),
        "sparsity": sparsity,
        "measured_sparsity": sparsity_of(model),
        "accuracy": accuracy,
        "dense_accuracy": ctx.dense_accuracy,
        "start": "dense model"
        if plan.from_dense
        else ("gradual mask" if start_masks is not None else "random init"),
        "epochs": plan.epochs,
        "pretrain_epochs": pretrain_epochs,
        "total_epochs": total_epochs,
        "steps": fitted.steps,
        "total_steps": fitted.steps + pretrain_epochs * ctx.steps_per_epoch,
        "training_flops": total_flops,
        "method_flops": fitted.flops,
        "flops_vs_dense": total_flops / ctx.dense_training_flops(total_epochs),
        "max_density_during_method": fitted.max_density,
        "seconds": fitted.seconds,
        "schedule": to_spec(plan.schedule),
        "allocation": plan.allocation,
        "kept_per_layer": kept,
        "units_fed_per_layer": fed,
        "notes": notes,
    }


def distill_best(
    ctx: Context, rows: list[dict[str, Any]], sparsity: float
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Rerun the most accurate sparse method at ``sparsity`` with distillation from the dense
    model; the new row and a summary of the gain."""
    candidates = [
        r
        for r in rows
        if r["model"] == ctx.name
        and r["seed"] == ctx.seed
        and r["sparsity"] == sparsity
        and r["method"] not in ENDS_DENSE
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: r["accuracy"])
    row = run_method(ctx, best["method"], sparsity, distill=True)
    summary = {
        "model": ctx.name,
        "seed": ctx.seed,
        "sparsity": sparsity,
        "method": best["method"],
        "without": best["accuracy"],
        "with": row["accuracy"],
        "gain_pt": (row["accuracy"] - best["accuracy"]) * 100,
    }
    return row, summary


# --------------------------------------------------------------------------- lottery shape


def lottery_shape(
    bundle: DataBundle, args: argparse.Namespace, seed: int, example: Tensor
) -> dict[str, Any]:
    """IMP with late rewinding from a random initialisation, and the random-reinit control."""
    train_loader, test_loader = bundle.loaders(BATCH, seed=seed)
    every = args.lth_epochs * len(train_loader)
    rounds = args.lth_rounds
    rewind = min(args.rewind_steps, every // 2)
    final = 1 - (1 - LTH_RATE) ** rounds
    model = build_model(LTH_MODEL, seed=seed)
    counter = FlopCounter(model, example)
    optimizer = make_optimizer(model)
    schedule = Lottery(every=every, rate=LTH_RATE, rewind=rewind, rounds=rounds)
    pruner = sc.Pruner(
        model,
        sparsity=final,
        schedule=schedule,
        allocation=args.allocation,
        optimizer=optimizer,
        seed=seed,
    )
    tickets: list[dict[str, Any]] = []
    masks: list[dict[str, Tensor]] = []

    def before_pruner(t: int) -> None:
        if t % every:
            return
        tickets.append(
            {
                "round": t // every - 1,
                "remaining": 1 - pruner.measured_sparsity(),
                "ticket_accuracy": evaluate(model, test_loader).accuracy,
            }
        )
        print(
            f"  LTH round {tickets[-1]['round']}: {tickets[-1]['remaining']:.1%} of the weights, "
            f"ticket {tickets[-1]['ticket_accuracy']:.2%}",
            flush=True,
        )

    steps = (rounds + 1) * every
    lr_at = restarted_cosine(TRAIN_LR, steps, every, rounds)
    t0 = time.perf_counter()

    original_step = pruner.step  # wrapped to keep each round's masks (after pruning)

    def step_and_record() -> bool:
        acted = original_step()
        if acted and pruner.history and pruner.history[-1].kind == "rewind":
            masks.append(sc.collect_masks(model))
        return acted

    pruner.step = step_and_record  # type: ignore[method-assign]
    fit(
        model,
        train_loader,
        steps,
        optimizer,
        lr_at,
        counter,
        pruner=pruner,
        before_pruner=before_pruner,
        seed=seed,
    )
    for r, mask in enumerate(masks, start=1):
        control = build_model(LTH_MODEL, seed=seed + 1000 + r)
        sc.apply_masks_(control, mask)
        opt = make_optimizer(control)
        fit(
            control,
            bundle.loaders(BATCH, seed=seed)[0],
            every,
            opt,
            lambda t: cosine(TRAIN_LR, t, every),
            counter,
            seed=seed,
        )
        acc = evaluate(control, test_loader).accuracy
        if r < len(tickets):
            tickets[r]["random_reinit_accuracy"] = acc
        print(f"  LTH round {r}: random re-initialisation of the same mask {acc:.2%}", flush=True)
    dense_acc = tickets[0]["ticket_accuracy"]
    last = tickets[-1]
    ticket_gap = (last["ticket_accuracy"] - dense_acc) * 100
    reinit_gap = (last.get("random_reinit_accuracy", float("nan")) - last["ticket_accuracy"]) * 100
    return {
        "model": LTH_MODEL,
        "seed": seed,
        "epochs_per_round": args.lth_epochs,
        "rounds": rounds,
        "rate": LTH_RATE,
        "rewind_step": rewind,
        "allocation": args.allocation,
        "rounds_table": tickets,
        "dense_accuracy": dense_acc,
        "final_ticket_minus_dense_pt": ticket_gap,
        "final_reinit_minus_ticket_pt": reinit_gap,
        "shape_holds": ticket_gap >= -0.5 and reinit_gap <= -0.5,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- output


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def cell(rows: list[dict[str, Any]], key: str) -> float:
    return mean([r[key] for r in rows])


def print_tables(rows: list[dict[str, Any]], models: list[str], dense_epochs: int) -> None:
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        sparsities = sorted({r["sparsity"] for r in mine})
        methods = list(dict.fromkeys(r["method"] for r in mine))
        dense = mine[0]["dense_accuracy"]
        print(f"\n{name}: dense model {dense:.2%} ({dense_epochs} epochs)")
        head = f"{'method':<16}{'start':<13}{'epochs':>7}{'steps':>7}"
        for title, key, fmt in (
            ("accuracy", "accuracy", "{:>9.2%}"),
            ("training FLOPs (total, incl. dense pretraining)", "training_flops", "{:>9.3g}"),
            ("training FLOPs / dense training at the same steps", "flops_vs_dense", "{:>9.3f}"),
            ("seconds (method's own phase)", "seconds", "{:>9.0f}"),
        ):
            print(f"  {title}")
            print("  " + head + "".join(f"{s:>9.0%}" for s in sparsities))
            for m in methods:
                cells = []
                for s in sparsities:
                    sel = [r for r in mine if r["method"] == m and r["sparsity"] == s]
                    cells.append(fmt.format(cell(sel, key)) if sel else f"{'-':>9}")
                first = next(r for r in mine if r["method"] == m)
                epochs = f"{first['pretrain_epochs']}+{first['epochs']}"
                print(
                    f"  {m:<16}{first['start']:<13}{epochs:>7}{first['total_steps']:>7}"
                    + "".join(cells)
                )
        dsd = [r for r in mine if r["method"] == "dsd"]
        if dsd:
            parts = ", ".join(
                f"{r['sparsity']:.0%}: sparse phase {r['notes'].get('sparse_phase_accuracy', float('nan')):.2%}"
                f" -> dense again {r['accuracy']:.2%} (final sparsity {r['measured_sparsity']:.3f})"
                for r in dsd
            )
            print(f"  DSD ends dense: {parts}")


def plot(
    rows: list[dict[str, Any]], models: list[str], dense: dict[str, float], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in models if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(present), figsize=(6 * len(present), 4.5), squeeze=False)
    for ax, name in zip(axes[0], present, strict=True):
        mine = [r for r in rows if r["model"] == name]
        for method in dict.fromkeys(r["method"] for r in mine):
            if method.endswith("+distill"):
                continue
            xs = sorted({r["sparsity"] for r in mine if r["method"] == method})
            ys = [
                cell([r for r in mine if r["method"] == method and r["sparsity"] == s], "accuracy")
                for s in xs
            ]
            color, marker, line = STYLE.get(method, ("black", ".", "-"))
            label = method + (" (ends dense; x = sparse phase)" if method in ENDS_DENSE else "")
            ax.plot(
                [100 * x for x in xs],
                [100 * y for y in ys],
                marker=marker,
                linestyle=line,
                color=color,
                label=label,
            )
        for r in mine:
            if r["method"].endswith("+distill"):
                base = r["method"].removesuffix("+distill")
                color = STYLE.get(base, ("black",))[0]
                ax.scatter(
                    [100 * r["sparsity"]],
                    [100 * r["accuracy"]],
                    marker="*",
                    s=160,
                    color=color,
                    edgecolor="black",
                    zorder=5,
                    label=f"{base} + distillation",
                )
        ax.axhline(100 * dense[name], color="black", linewidth=1, label="dense model")
        ax.set_title(f"{name}, Fashion-MNIST")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def targets(
    rows: list[dict[str, Any]], distills: list[dict[str, Any]], lth: list[dict[str, Any]]
) -> None:
    print("\ntargets")
    sel = [r for r in rows if r["model"] == "lenet-300-100" and r["sparsity"] == 0.99]
    rigl = [r for r in sel if r["method"] == "rigl"]
    gradual = [r for r in sel if r["method"] == "gradual"]
    if rigl and gradual:
        gap = (cell(rigl, "accuracy") - cell(gradual, "accuracy")) * 100
        dense_seen = max(r["max_density_during_method"] for r in rigl)
        print(
            f"  RigL vs gradual, LeNet-300-100 at 99%: {cell(rigl, 'accuracy'):.2%} vs "
            f"{cell(gradual, 'accuracy'):.2%} ({gap:+.2f} pt; within 1 pt: {gap >= -1}, level: {gap >= 0}); "
            f"RigL's highest density during training {dense_seen:.4f} (never dense: {dense_seen < 0.5})"
        )
        controls = [
            m for m in ("static@gradual", "rigl@gradual") if any(r["method"] == m for r in sel)
        ]
        for m in controls:  # the random re-initialisation of gradual's mask: mask or weights?
            acc = cell([r for r in sel if r["method"] == m], "accuracy")
            print(
                f"  {m} (gradual's mask, weights re-initialised): {acc:.2%} "
                f"({(acc - cell(gradual, 'accuracy')) * 100:+.2f} pt vs gradual)"
            )
    for d in distills:
        print(
            f"  distillation, {d['model']} at {d['sparsity']:.0%} on {d['method']}: "
            f"{d['without']:.2%} -> {d['with']:.2%} ({d['gain_pt']:+.2f} pt; adds accuracy: {d['gain_pt'] > 0})"
        )
    for item in lth:
        print(
            f"  lottery tickets (seed {item['seed']}): final ticket minus dense "
            f"{item['final_ticket_minus_dense_pt']:+.2f} pt, random re-init minus ticket "
            f"{item['final_reinit_minus_ticket_pt']:+.2f} pt; shape holds: {item['shape_holds']}"
        )


def print_lth(item: dict[str, Any]) -> None:
    print(
        f"\nlottery tickets, {item['model']} seed {item['seed']}: IMP from a random init, "
        f"{item['rate']:.0%} per round, {item['epochs_per_round']} epochs per round, rewind to "
        f"step {item['rewind_step']}"
    )
    print(f"  {'round':>5}{'weights left':>14}{'ticket':>10}{'random reinit':>15}")
    for t in item["rounds_table"]:
        reinit = t.get("random_reinit_accuracy")
        print(
            f"  {t['round']:>5}{t['remaining']:>14.1%}{t['ticket_accuracy']:>10.2%}"
            + (f"{reinit:>15.2%}" if reinit is not None else f"{'(dense)':>15}")
        )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    parser.add_argument(
        "--sparsities",
        nargs="+",
        type=float,
        default=None,
        help="for every model (default: 0.9 0.95 0.98 0.99; LeNet-5 skips 0.95)",
    )
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--epochs", type=int, default=10, help="epochs after the dense model")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allocation", default="lamp", help="for gradual, lottery, DSD, LTH")
    parser.add_argument("--rewind-steps", type=int, default=100, help="lottery rewind point")
    parser.add_argument("--update-every", type=int, default=100, help="SET/RigL update period")
    parser.add_argument(
        "--update-until", type=float, default=0.75, help="SET/RigL: last update, a step fraction"
    )
    parser.add_argument(
        "--drop-fraction", type=float, default=DROP_FRACTION, help="SET/RigL: share moved"
    )
    parser.add_argument(
        "--grow-batches",
        type=int,
        default=1,
        help="RigL: the dense gradient it grows by is taken over the current training batch and "
        "the ones before it, this many in all (default: 1, as published)",
    )
    parser.add_argument(
        "--set-grow",
        choices=SET_GROW_RULES,
        default="random",
        help="SET: where it grows, anywhere dead (random, as published) or at random among the "
        "positions a gradient reaches (live: reads a dense gradient at updates, counted in FLOPs)",
    )
    parser.add_argument(
        "--grow-scale",
        type=float,
        default=None,
        help="SET/RigL: grown weights start at random, this times the std of the layer's live "
        "weights (default: 0, at zero)",
    )
    parser.add_argument(
        "--decay",
        choices=DECAY_RULES,
        default=None,
        help="SET/RigL: how the moved share changes (default: each method's own, SET constant, "
        "RigL cosine)",
    )
    parser.add_argument(
        "--distribution",
        choices=DISTRIBUTIONS,
        default="erk",
        help="SET/RigL/static: the initial per-layer densities (default: erk)",
    )
    parser.add_argument(
        "--sparse-init",
        choices=INIT_RULES,
        default=None,
        help="SET/RigL/static: the sparse initialisation's scaling (default: the schedule's)",
    )
    parser.add_argument(
        "--min-fan-in",
        type=float,
        default=None,
        help="SET/RigL/static: ERK's floor of kept inputs per unit (default: the schedule's)",
    )
    parser.add_argument(
        "--redistribute",
        choices=REDISTRIBUTE_RULES,
        default=None,
        help="SET/RigL: how drops are shared between layers (default: the schedule's)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate of each method's own training (default: {TRAIN_LR}, the dense "
        "model's; the dense model and the lottery-ticket experiment always train at it)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="steps of linear learning-rate warm-up before the cosine (not the lottery's "
        "restarted cosine; default: none)",
    )
    parser.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        help="each method's own training (not the lottery-ticket experiment's): clip the "
        "gradient's norm to this (default: no clip)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=WEIGHT_DECAY,
        help=f"each method's own training (the dense model and the lottery-ticket experiment "
        f"keep {WEIGHT_DECAY}; default: {WEIGHT_DECAY})",
    )
    parser.add_argument(
        "--from-gradual-mask",
        action="store_true",
        help="each sparse-from-scratch method in --methods also runs from gradual's final mask "
        "(same seed and sparsity; gradual must be in --methods), weights re-initialised as its "
        "own start: whether a gap to gradual is the mask or the weights",
    )
    parser.add_argument("--lth-epochs", type=int, default=2)
    parser.add_argument("--lth-rounds", type=int, default=7)
    parser.add_argument("--skip-lth", action="store_true")
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument(
        "--distill-temperature", type=float, default=Distillation.temperature, help="default: 4"
    )
    parser.add_argument("--distill-alpha", type=float, default=Distillation.alpha)
    parser.add_argument("--quick", action="store_true", help="a tiny run on a data subset")
    parser.add_argument("--out", default=None, help="JSON path (the plot goes beside it)")
    args = parser.parse_args()
    if args.grow_batches < 1:
        parser.error(f"--grow-batches must be at least 1, got {args.grow_batches}")
    if args.from_gradual_mask and "gradual" not in args.methods:
        parser.error("--from-gradual-mask needs gradual in --methods (its masks are the start)")
    torch.set_num_threads(args.threads)
    bundle = load_fashion_mnist()
    if args.quick:
        bundle = bundle.subset(4096, 2000)
        args.epochs, args.dense_epochs, args.lth_epochs = 1, 1, 1
        args.sparsities = args.sparsities or [0.9, 0.99]
        args.rewind_steps = 8
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.gettempdir()) / "secateurs-bench" / "sparse_training_quick.json"
    else:
        out = RESULTS / "sparse_training.json"
    print(
        f"budget: from-dense methods ({', '.join(sorted(FROM_DENSE))}) train {args.epochs} epochs "
        f"on the dense model trained {args.dense_epochs}; sparse-from-scratch methods train "
        f"{args.dense_epochs + args.epochs} epochs from the same init: equal total steps",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    distills: list[dict[str, Any]] = []
    lth: list[dict[str, Any]] = []
    dense_acc: dict[str, float] = {}
    started = time.perf_counter()

    def save() -> None:
        """Write what is done so far (after every model and the lottery-ticket experiment)."""
        payload = [*rows, *({"kind": "distillation", **d} for d in distills)]
        payload += [{"kind": "lottery_shape", **item} for item in lth]
        write_results(out, args, payload)
        plot(rows, args.models, dense_acc, out.with_suffix(".png"))

    for seed in args.seeds:
        for name in args.models:
            loaders = bundle.loaders(BATCH, seed=seed)
            if args.quick:
                dense = build_model(name, seed=seed)
                train(
                    dense, loaders[0], TrainConfig(epochs=args.dense_epochs, lr=TRAIN_LR, seed=seed)
                )
            else:
                dense = dense_model(name, seed, args.dense_epochs, loaders)
            example = bundle.train[0][0].unsqueeze(0)
            ctx = Context(
                name=name,
                seed=seed,
                bundle=bundle,
                dense=dense,
                dense_accuracy=evaluate(dense, loaders[1]).accuracy,
                example=example,
                counter=FlopCounter(dense, example),
                steps_per_epoch=len(loaders[0]),
                args=args,
            )
            dense_acc[name] = ctx.dense_accuracy
            sparsities = args.sparsities or DEFAULT_SPARSITIES.get(name, ALL_SPARSITIES)
            if args.sparsities is None and sparsities != ALL_SPARSITIES:
                print(f"{name}: sparsities cut to {sparsities} to fit the time budget")
            print(
                f"{name} seed {seed}: dense {ctx.dense_accuracy:.2%}, "
                f"{ctx.counter.dense:,} MACs per example",
                flush=True,
            )
            # highest sparsity first, then its distillation: a cut-short run keeps what matters
            for i, s in enumerate(sorted(sparsities, reverse=True)):
                gradual_masks: dict[str, Tensor] = {}
                runs: list[tuple[str, dict[str, Tensor] | None]] = [(m, None) for m in args.methods]
                if args.from_gradual_mask:  # gradual first, then each sparse method from its mask
                    runs.sort(key=lambda r: r[0] != "gradual")
                    runs += [(m, gradual_masks) for m in args.methods if m not in FROM_DENSE]
                for method, start in runs:
                    row = run_method(
                        ctx,
                        method,
                        s,
                        start_masks=start,
                        masks_out=gradual_masks if method == "gradual" else None,
                    )
                    rows.append(row)
                    print(
                        f"  {s:.2f} {row['method']:<8} {row['accuracy']:.2%} (sparsity "
                        f"{row['measured_sparsity']:.4f}, {row['flops_vs_dense']:.3f}x dense FLOPs, "
                        f"{row['seconds']:.0f} s; {time.perf_counter() - started:.0f} s so far)",
                        flush=True,
                    )
                if i == 0 and not args.skip_distill:
                    found = distill_best(ctx, rows, s)
                    if found is not None:
                        rows.append(found[0])
                        distills.append(found[1])
                        print(
                            f"  {s:.2f} {found[1]['method']}+distill {found[1]['with']:.2%} "
                            f"({found[1]['gain_pt']:+.2f} pt over {found[1]['without']:.2%}; "
                            f"{found[0]['seconds']:.0f} s)",
                            flush=True,
                        )
            save()
            if not args.skip_lth and name == LTH_MODEL:
                item = lottery_shape(bundle, args, seed, example)
                lth.append(item)
                print_lth(item)
                save()
    print_tables(rows, args.models, args.dense_epochs)
    for item in lth:
        print_lth(item)
    targets(rows, distills, lth)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
