"""AMC: a reinforcement-learning agent that picks each layer's ratio (He et al. 2018).

"AMC: AutoML for Model Compression and Acceleration on Mobile Devices" (He, Lin, Liu, Wang,
Li and Han, ECCV 2018) replaces hand-tuned per-layer ratios by a DDPG agent (Lillicrap et al.
2016) that walks the prunable layers one at a time. For layer ``t`` it sees a *layer
embedding* (index, type, input/output channels, stride, kernel size, parameters, MACs, the
budget's quantity already removed and still removable, the previous action), normalised, and
answers a continuous ratio. Once every layer has a ratio, the pruned model is evaluated
*without fine-tuning* on a held-out split, and that one reward is given to every transition of
the episode (AMC's discount is 1).

Two protocols, as in the paper:

* ``resource`` (resource-constrained, for a hard budget): the reward is ``-error``; the budget
  is not in the reward but enforced by the action space: each action is raised to the
  smallest ratio for which the layers still to come, pruned as far as they may, can meet the
  budget (AMC's clamp), so every episode's map meets it.
* ``accuracy`` (accuracy-guaranteed): the reward ``-error * log(MACs)`` trades accuracy for
  size (with another budget, its quantity stands for MACs), so the agent goes below the budget
  where that costs little accuracy. The named budget is still a ceiling, met by the same clamp;
  ``clamp=False`` gives the paper's unconstrained search, where the budget's quantity of each
  map is only reported.

Here ``error = 1 - score``, the score being what the evaluation returns (an accuracy, higher
is better). As in AMC's code, the first ``warmup`` episodes take uniform random actions to fill
the replay buffer, exploration afterwards is a normal around the actor's output truncated to
``[0, max_ratio]`` whose width decays per episode, and the critic is trained on rewards minus a
moving average of their batch means. Everything random comes from one ``torch.Generator``
seeded by the search's ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.budgets import Budget, Sparsity
from secateurs.errors import BudgetError, ConfigError
from secateurs.search.base import SEARCHES, AllocationSearch, SearchContext, SearchResult
from secateurs.search.space import ElementSpace, Layer, LayerSpace, RatioMap

PROTOCOLS = ("resource", "accuracy")
#: Features of the layer embedding (AMC's state), in order.
FEATURES = (
    "index",
    "type",
    "in_channels",
    "out_channels",
    "stride",
    "kernel",
    "params",
    "macs",
    "reduced",
    "remaining",
    "previous",
)
_STATIC = 8  # the first 8 features are fixed per layer; the last 3 change within an episode
_KINDS = {"Conv1d": 0.0, "Conv2d": 0.0, "Conv3d": 0.0, "Linear": 1.0}


@SEARCHES.register("amc")
@dataclass
class AMC(AllocationSearch):
    """DDPG agent that sets one layer's ratio at a time (He et al. 2018, AMC).

    ``episodes``: episodes in all, the first ``warmup`` of them with random actions (AMC: 100
    warm-up). ``protocol``: ``"resource"`` (reward ``-error``; the budget is met by clamping
    each action) or ``"accuracy"`` (reward ``-error * log(MACs)``). ``clamp``: enforce the
    budget by clamping actions (always, for ``resource``; ``False`` lets the accuracy protocol
    search without a ceiling, as in the paper). ``hidden``: the
    widths of the hidden layers of the actor and of the critic (AMC: 300, 300). ``actor_lr``,
    ``critic_lr``: Adam learning rates (AMC: 1e-4, 1e-3). ``gamma``: discount (AMC: 1, the
    reward arrives at the episode's end for every step). ``tau``: soft update of the target
    networks. ``buffer``: replay-buffer size in transitions; ``batch_size``: transitions per
    update (one update per transition observed after warm-up). ``sigma``: width of the
    truncated-normal exploration noise after warm-up, multiplied by ``sigma_decay`` each
    episode. ``baseline_alpha``: step of the moving average of rewards subtracted before an
    update (AMC's ``moving_alpha``). ``max_ratio``: the largest ratio the agent may choose (each
    layer's own ``max_ratio`` in the space also applies; the budget clamp may go above it).
    """

    episodes: int = 400
    warmup: int = 100
    protocol: str = "resource"
    clamp: bool = True
    hidden: Sequence[int] = (300, 300)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    gamma: float = 1.0
    tau: float = 0.01
    buffer: int = 2000
    batch_size: int = 64
    sigma: float = 0.5
    sigma_decay: float = 0.95
    baseline_alpha: float = 0.5
    max_ratio: float = 1.0

    def __post_init__(self) -> None:
        _int("episodes", self.episodes, 1)
        _int("warmup", self.warmup, 0)
        _int("buffer", self.buffer, 1)
        _int("batch_size", self.batch_size, 1)
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"amc protocol must be one of {', '.join(map(repr, PROTOCOLS))} (resource-"
                f"constrained or accuracy-guaranteed); got {self.protocol!r}"
            )
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Sequence):
            raise ConfigError(f"amc hidden must be a list of layer widths; got {self.hidden!r}")
        hidden = list(self.hidden)
        if not hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
        ):
            raise ConfigError(
                f"amc hidden must be a non-empty list of ints >= 1 (AMC: [300, 300]); got "
                f"{self.hidden!r}"
            )
        self.hidden = tuple(hidden)
        if not isinstance(self.clamp, bool):
            raise ConfigError(f"amc clamp must be true or false; got {self.clamp!r}")
        if not self.clamp and self.protocol == "resource":
            raise ConfigError(
                "amc clamp=false needs protocol 'accuracy': the resource-constrained protocol "
                "meets its budget only through the clamp (its reward ignores size)"
            )
        _real("actor_lr", self.actor_lr, 0.0, math.inf, low_open=True)
        _real("critic_lr", self.critic_lr, 0.0, math.inf, low_open=True)
        _real("gamma", self.gamma, 0.0, 1.0)
        _real("tau", self.tau, 0.0, 1.0, low_open=True)
        _real("sigma", self.sigma, 0.0, math.inf)
        _real("sigma_decay", self.sigma_decay, 0.0, 1.0, low_open=True)
        _real("baseline_alpha", self.baseline_alpha, 0.0, 1.0, low_open=True)
        _real("max_ratio", self.max_ratio, 0.0, 1.0, low_open=True)

    # -- the search ---------------------------------------------------------------------
    def search(self, space: LayerSpace, budget: Budget, ctx: SearchContext) -> SearchResult:
        gen = torch.Generator().manual_seed(ctx.seed)
        layers = space.layers
        limit = space.limit(budget)
        unit = space.unit(budget)
        static = _static_features(layers)
        agent = _Agent(static.shape[1] + 3, self, gen)
        dense = space.measure(budget, {})
        episodes: list[dict[str, Any]] = []
        best: tuple[float, RatioMap, float, int] | None = None
        for episode in range(self.episodes):
            ratios: RatioMap = {}
            states: list[Tensor] = []
            actions: list[float] = []
            previous = 0.0
            for t, layer in enumerate(layers):
                state = self._state(space, budget, static[t], ratios, layers[t:], dense, previous)
                action = self._act(agent, state, episode, gen)
                ratio = min(action * self.max_ratio, layer.max_ratio)
                if self.clamp:
                    ratio = _clamp(space, budget, limit, ratios, layer, layers[t + 1 :], ratio)
                ratios[layer.name] = ratio
                states.append(state)
                actions.append(action)
                previous = ratio
            value = space.measure(budget, ratios)
            if self.clamp and value > limit * (1 + 1e-9):
                raise BudgetError(  # the clamp makes this unreachable for a monotone measure
                    f"amc episode {episode} left {value:,.4g} {unit} (allowed {limit:,.4g}): the "
                    f"budget's measure is not monotone in the ratios of this space"
                )
            with space.applied(ratios) as model:
                score = ctx.score(model)  # no fine-tuning: the held-out split as it is
            reward = self.reward(score, value, budget, space)
            self._learn(agent, states, actions, reward, episode)
            episodes.append(
                {
                    "episode": episode,
                    "reward": reward,
                    "score": score,
                    "value": value,
                    "ratios": dict(ratios),
                }
            )
            ctx.say(
                f"episode {episode}: reward {reward:.4f}, score {score:.4f}, "
                f"{value:,.4g} {unit} (allowed {limit:,.4g})"
                + (" [warm-up]" if episode < self.warmup else "")
            )
            if best is None or reward > best[0]:
                best = (reward, dict(ratios), score, episode)
        assert best is not None
        _, ratios, score, best_episode = best
        return SearchResult(
            method="amc",
            ratios=space.layer_map(ratios),
            value=space.measure(budget, ratios),
            limit=limit,
            unit=unit,
            score=score,
            history={
                "protocol": self.protocol,
                "features": list(FEATURES),
                "best_episode": best_episode,
                "episodes": episodes,
            },
        )

    def reward(self, score: float, value: float, budget: Budget, space: LayerSpace) -> float:
        """AMC's reward for an episode whose pruned model scored ``score`` and measures
        ``value``: ``-error`` (resource) or ``-error * log(value)`` (accuracy), error being
        ``1 - score``. On element masks a :class:`~secateurs.Sparsity` budget measures a kept
        fraction; its log factor counts the kept weights instead (the fraction times the
        weights of all layers), so that it stays a size. The log factor is floored at 1 so the
        reward keeps the sign of ``-error`` for quantities below e."""
        error = 1.0 - score
        if self.protocol == "resource":
            return -error
        size = value
        if isinstance(budget, Sparsity) and isinstance(space, ElementSpace):
            size = value * sum(layer.size for layer in space.layers)
        return -error * math.log(max(size, math.e))

    # -- one step -----------------------------------------------------------------------
    def _state(
        self,
        space: LayerSpace,
        budget: Budget,
        static: Tensor,
        done: RatioMap,
        rest: Sequence[Layer],
        dense: float,
        previous: float,
    ) -> Tensor:
        """The layer embedding: the static features, then the budget's quantity removed so far
        and still removable by this and the later layers (fractions of the dense model's),
        then the previous ratio (AMC's ``reduced``, ``rest`` and ``a_{t-1}``)."""
        now = space.measure(budget, done)
        floor = space.measure(budget, {**done, **{layer.name: layer.max_ratio for layer in rest}})
        scale = dense if dense > 0 else 1.0
        dynamic = torch.tensor([(dense - now) / scale, (now - floor) / scale, previous])
        return torch.cat([static, dynamic.to(static.dtype)])

    def _act(self, agent: _Agent, state: Tensor, episode: int, gen: torch.Generator) -> float:
        """An action in [0, 1] (times ``max_ratio`` it is the ratio): uniform during warm-up,
        then the actor's output with truncated-normal noise of decaying width."""
        if episode < self.warmup:
            return float(torch.rand((), generator=gen, dtype=torch.float64))
        with torch.no_grad():
            mu = float(agent.actor(state.unsqueeze(0)).squeeze())
        sigma = self.sigma * self.sigma_decay ** (episode - self.warmup)
        return _truncated_normal(mu, sigma, gen)

    def _learn(
        self,
        agent: _Agent,
        states: list[Tensor],
        actions: list[float],
        reward: float,
        episode: int,
    ) -> None:
        """Store the episode's transitions, each with the episode's reward (AMC's code), and
        after warm-up update the networks once per stored transition."""
        n = len(states)
        for t in range(n):
            last = t == n - 1
            following = torch.zeros_like(states[t]) if last else states[t + 1]
            agent.store(states[t], actions[t], reward, following, last)
            if episode >= self.warmup:
                agent.update()


# --------------------------------------------------------------------------- the agent


class _Agent:
    """DDPG (Lillicrap et al. 2016) as AMC uses it: actor ``s -> a in [0, 1]`` (sigmoid),
    critic ``(s, a) -> Q``, target copies soft-updated by ``tau``, a ring replay buffer."""

    def __init__(self, states: int, cfg: AMC, gen: torch.Generator) -> None:
        self.cfg = cfg
        self.gen = gen
        self.actor = _mlp(states, cfg.hidden, gen, sigmoid=True)
        self.critic = _mlp(states + 1, cfg.hidden, gen, sigmoid=False)
        self.actor_target = _mlp(states, cfg.hidden, gen, sigmoid=True)
        self.critic_target = _mlp(states + 1, cfg.hidden, gen, sigmoid=False)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        size = cfg.buffer
        self.s = torch.zeros(size, states)
        self.a = torch.zeros(size, 1)
        self.r = torch.zeros(size, 1)
        self.s1 = torch.zeros(size, states)
        self.done = torch.zeros(size, 1)
        self.count = 0
        self.baseline: float | None = None

    def store(self, s: Tensor, a: float, r: float, s1: Tensor, done: bool) -> None:
        i = self.count % self.cfg.buffer
        self.s[i], self.a[i], self.r[i], self.s1[i] = s, a, r, s1
        self.done[i] = float(done)
        self.count += 1

    def update(self) -> None:
        """One DDPG step on a batch drawn (with replacement) from the buffer."""
        held = min(self.count, self.cfg.buffer)
        idx = torch.randint(held, (self.cfg.batch_size,), generator=self.gen)
        s, a, r, s1, done = self.s[idx], self.a[idx], self.r[idx], self.s1[idx], self.done[idx]
        # AMC's code: rewards minus a moving average of the batch means
        mean = float(r.mean())
        if self.baseline is None:
            self.baseline = mean
        else:
            self.baseline += self.cfg.baseline_alpha * (mean - self.baseline)
        r = r - self.baseline
        with torch.no_grad():
            q1 = self.critic_target(torch.cat([s1, self.actor_target(s1)], 1))
            target = r + self.cfg.gamma * (1.0 - done) * q1
        critic_loss = nn.functional.mse_loss(self.critic(torch.cat([s, a], 1)), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target_net in (
                (self.actor, self.actor_target),
                (self.critic, self.critic_target),
            ):
                for p, q in zip(net.parameters(), target_net.parameters(), strict=True):
                    q.mul_(1.0 - self.cfg.tau).add_(p, alpha=self.cfg.tau)


def _mlp(inputs: int, hidden: Sequence[int], gen: torch.Generator, *, sigmoid: bool) -> nn.Module:
    """Linear+ReLU layers then one output; AMC's init: uniform in +-1/sqrt(fan-in), the last
    layer in +-3e-3 (so the first actions sit near the middle of the range)."""
    modules: list[nn.Module] = []
    width = inputs
    for h in hidden:
        modules += [nn.Linear(width, h), nn.ReLU()]
        width = h
    modules.append(nn.Linear(width, 1))
    if sigmoid:
        modules.append(nn.Sigmoid())
    net = nn.Sequential(*modules)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            bound = 3e-3 if i == len(linears) - 1 else 1.0 / math.sqrt(lin.in_features)
            for p in (lin.weight, lin.bias):
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return net


# --------------------------------------------------------------------------- helpers


def _static_features(layers: Sequence[Layer]) -> Tensor:
    """The fixed part of every layer's embedding, each feature min-max normalised over the
    layers (a feature equal for all layers is 0), as AMC normalises its state."""
    rows = [
        [
            float(i),
            _KINDS.get(layer.kind, 2.0),
            float(layer.in_channels),
            float(layer.out_channels),
            float(layer.stride),
            float(layer.kernel),
            float(layer.params),
            float(layer.macs),
        ]
        for i, layer in enumerate(layers)
    ]
    x = torch.tensor(rows, dtype=torch.float32).reshape(len(layers), _STATIC)
    low = x.min(0).values if len(layers) else torch.zeros(_STATIC)
    span = x.max(0).values - low if len(layers) else torch.zeros(_STATIC)
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), 0.0)


def _clamp(
    space: LayerSpace,
    budget: Budget,
    limit: float,
    done: RatioMap,
    layer: Layer,
    later: Sequence[Layer],
    ratio: float,
) -> float:
    """``ratio`` raised to the smallest ratio of ``layer`` for which the budget can still be
    met with ``done`` as chosen and the ``later`` layers pruned as far as they may (AMC's
    action clamp). Candidates are whole units (``k / size``) and the layer's ``max_ratio``;
    the search is a bisection on :meth:`LayerSpace.measure`, which runs no model."""
    rest = {other.name: other.max_ratio for other in later}

    def fits(r: float) -> bool:
        return space.measure(budget, {**done, layer.name: r, **rest}) <= limit

    if fits(ratio):
        return ratio
    size = max(layer.size, 1)
    # candidates: k / size for every k with k / size < max_ratio, then max_ratio itself
    steps = min(math.ceil(layer.max_ratio * size), size + 1)
    while steps > 0 and (steps - 1) / size >= layer.max_ratio:
        steps -= 1
    while steps <= size and steps / size < layer.max_ratio:
        steps += 1

    def candidate(i: int) -> float:
        return i / size if i < steps else layer.max_ratio

    # the last candidate fits: the previous clamp (or the space's check) made sure of it. The
    # action does not fit, so (the measure falling with the ratio) the answer lies above it
    lo, hi = -1, steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidate(mid)):
            hi = mid
        else:
            lo = mid
    return candidate(hi)


def _truncated_normal(mu: float, sigma: float, gen: torch.Generator) -> float:
    """A draw from N(mu, sigma) truncated to [0, 1], by inverting the CDF."""
    mu = min(max(mu, 0.0), 1.0)
    if sigma <= 1e-12:
        return mu
    lo = torch.special.ndtr(torch.tensor((0.0 - mu) / sigma, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor((1.0 - mu) / sigma, dtype=torch.float64))
    u = lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64)
    u = u.clamp(1e-300, 1.0 - 1e-16)
    x = mu + sigma * float(torch.special.ndtri(u))
    return min(max(x, 0.0), 1.0)


def _int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"amc {name} must be an int >= {least}; got {value!r}")


def _real(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    ok = False
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    if not ok:
        bound = "(" if low_open else "["
        top = "inf)" if math.isinf(high) else f"{high:g}]"
        raise ConfigError(f"amc {name} must be a number in {bound}{low:g}, {top}; got {value!r}")
