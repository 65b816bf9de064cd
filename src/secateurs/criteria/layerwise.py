"""Criteria that prune one layer at a time from what its inputs look like on calibration data.

The large-model methods of the source notes do not rank weights across a model: each layer
is pruned on its own to the sparsity its allocation gives it, from statistics of the inputs it
sees (``X``, rows of the layer's input over calibration tokens or pixels):

* ``wanda`` (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, compared within each output row; no
  weight changes. Needs only the column norms of ``X``.
* ``sparsegpt`` (Frantar & Alistarh 2023): OBS with weight update through the Cholesky factor
  of the inverse Hessian ``H = 2 X^T X / n``, in blocks of columns, the mask chosen inside each
  block. It *updates the kept weights* to reconstruct the layer's output.
* ``obs``: exact Optimal Brain Surgeon per row (OBC), for layers small enough; also updates
  weights.

A layer-wise criterion sees a layer as a matrix ``[out, in]``: a Linear's weight, or a
convolution's weight with its kernel positions outermost (``[out, kh * kw * in]``), so that N:M
blocks run along input channels at one kernel position, as :class:`~secateurs.NM` defines
them; :func:`input_rows` turns the layer's input into rows in the same column order. The
numerical work is in :mod:`secateurs.criteria.hessian`; the block-by-block engine that feeds
it is :mod:`secateurs.oneshot`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from secateurs.criteria.base import CRITERIA, Criterion, Stats
from secateurs.criteria.hessian import (
    OBS_MAX_IN_FEATURES,
    HessianAccumulator,
    obs_,
    sparsegpt_,
    unfold_conv_inputs,
    wanda_scores,
)
from secateurs.errors import ConfigError, ModelError
from secateurs.targets import Target, is_hf_conv1d

#: Key of a layer's input column norms in the statistics a criterion is given.
COLUMN_NORMS = "column_norms"


# --------------------------------------------------------------------------- the matrix view


def supports(module: nn.Module) -> bool:
    """Layers a layer-wise criterion can prune: Linear (and GPT-2's ``Conv1D``), and Conv2d
    with ``groups == 1``."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def check_layer(target: Target) -> None:
    """Refuse a target a layer-wise criterion cannot see as a matrix, saying what to do."""
    if target.attr != "weight" or not supports(target.module):
        raise ModelError(
            f"{target.name} ({type(target.module).__name__}) cannot be pruned layer by layer "
            "from its inputs: wanda, sparsegpt and obs handle the weights of Linear and Conv2d "
            f"(groups=1) layers. Exclude it (exclude=[{target.module_name!r}])."
        )


def as_matrix(weight: Tensor, transposed: bool = False) -> Tensor:
    """``weight`` as ``[out, in]``: a Conv2d's ``[out, in, kh, kw]`` as ``[out, kh*kw*in]``, a
    ``transposed`` 2-D weight (GPT-2's ``Conv1D``, ``[in, out]``) as its transpose."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.T if transposed else weight


def from_matrix(
    matrix: Tensor, shape: torch.Size | tuple[int, ...], transposed: bool = False
) -> Tensor:
    """The inverse of :func:`as_matrix`."""
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return matrix.T.contiguous() if transposed else matrix.reshape(shape)


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows of ``module``'s input in the column order of :func:`as_matrix`."""
    if isinstance(module, nn.Conv2d):
        rows = unfold_conv_inputs(module, x)  # [N, in * kh * kw], kernel positions innermost
        kernel = module.kernel_size[0] * module.kernel_size[1]
        return rows.reshape(-1, module.in_channels, kernel).transpose(1, 2).reshape(len(rows), -1)
    return x.reshape(-1, x.shape[-1])


def matrix_columns(target: Target) -> int:
    """How many columns the layer's matrix has (the size of its input statistics)."""
    return int(as_matrix(target.raw, target.transposed).shape[1])


# --------------------------------------------------------------------------- the interface


class LayerwiseCriterion(Criterion):
    """Base: prunes one layer's matrix from its input statistics (see the module docstring).

    :meth:`prune_matrix` returns the keep-mask and, when :attr:`updates_weights`, changes the
    weight in place. ``needs_hessian`` says whether it needs ``H`` (SparseGPT, OBS) or only the
    column norms (Wanda). Every one takes ``sequential``: ``None`` (the default) prunes block
    by block when the model has repeated blocks (each block sees the inputs the pruned blocks
    before it produce), ``False`` gathers every layer's statistics from the dense model in one
    pass (the plain one-shot form), ``True`` insists on blocks.
    """

    needs_data: ClassVar[bool] = True
    sequential: bool | None
    needs_hessian: ClassVar[bool] = True
    updates_weights: ClassVar[bool] = False

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        raise ConfigError(
            f"criterion {self.registry_name!r} prunes layer by layer from the layers' inputs; "
            "use it through sc.prune_ / sc.Pruner with data= (it picks its own masks)"
        )

    @abstractmethod
    def prune_matrix(
        self, weight: Tensor, inputs: HessianAccumulator, sparsity: float | None, n: int, m: int
    ) -> Tensor:
        """Keep-mask of ``weight`` ``[out, in]`` at ``sparsity`` (unstructured) or at ``n:m``
        (``sparsity`` None); may update ``weight`` in place."""


@CRITERIA.register("wanda")
@dataclass
class Wanda(LayerwiseCriterion):
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, the smallest of each output row pruned.

    Pruning by weights *and activations* keeps the weights that carry large inputs (LLMs have
    a few input features with huge magnitudes), without any weight update or second-order
    information; the comparison within each row keeps every output's share. N:M keeps the
    ``n`` largest scores of every ``m`` consecutive inputs.
    """

    needs_hessian: ClassVar[bool] = False

    sequential: bool | None = None

    def __post_init__(self) -> None:
        _check_sequential(self.sequential, "wanda")

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        if stats is None or COLUMN_NORMS not in stats:
            raise ConfigError("criterion 'wanda' needs the input column norms: pass data=")
        check_layer(target)
        matrix = wanda_scores(
            as_matrix(target.weight.detach(), target.transposed), stats[COLUMN_NORMS]
        )
        return from_matrix(matrix, target.shape, target.transposed)

    def prune_matrix(
        self, weight: Tensor, inputs: HessianAccumulator, sparsity: float | None, n: int, m: int
    ) -> Tensor:
        scores = wanda_scores(weight, inputs.column_norms())
        return keep_largest(scores, sparsity, n, m)


def keep_largest(scores: Tensor, sparsity: float | None, n: int, m: int) -> Tensor:
    """Keep-mask of the largest scores: in each row (unstructured, ``round(sparsity * in)``
    pruned per row) or in each group of ``m`` consecutive columns (``n`` kept)."""
    out_f, in_f = scores.shape
    if sparsity is None:
        groups = scores.reshape(out_f, in_f // m, m)
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(out_f, in_f)
    k = round(sparsity * in_f)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        low = scores.topk(k, dim=1, largest=False).indices
        keep.scatter_(1, low, False)
    return keep


@CRITERIA.register("sparsegpt")
@dataclass
class SparseGPT(LayerwiseCriterion):
    """SparseGPT (Frantar & Alistarh 2023): OBS with weight update, one layer at a time.

    The layer Hessian ``H = 2 X^T X / n`` (with ``dampening`` of its mean diagonal added) is
    inverted through a Cholesky factor; columns are processed in blocks of ``blocksize`` with
    lazy batch updates, the mask of each block chosen by ``w^2 / [H^-1]_ii`` on the weights as
    the previous blocks left them, and each pruned weight's error is spread over the columns
    still to come. Unstructured and N:M.
    """

    updates_weights: ClassVar[bool] = True

    blocksize: int = 128
    dampening: float = 0.01
    sequential: bool | None = None

    def __post_init__(self) -> None:
        _check_sequential(self.sequential, "sparsegpt")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int):
            raise ConfigError(f"sparsegpt blocksize must be an int >= 1; got {self.blocksize!r}")
        if self.blocksize < 1:
            raise ConfigError(f"sparsegpt blocksize must be an int >= 1; got {self.blocksize!r}")
        check_dampening(self.dampening, "sparsegpt")

    def prune_matrix(
        self, weight: Tensor, inputs: HessianAccumulator, sparsity: float | None, n: int, m: int
    ) -> Tensor:
        return sparsegpt_(
            weight,
            inputs.hessian(),
            sparsity=sparsity,
            n=n,
            m=m,
            blocksize=self.blocksize,
            dampening=self.dampening,
        )


@CRITERIA.register("obs")
@dataclass
class OBS(LayerwiseCriterion):
    """Optimal Brain Surgeon (Hassibi & Stork 1993), exact and per row (OBC, Frantar et al.
    2022): each row removes, one at a time, the weight whose removal raises the layer's output
    error least (``w_q^2 / [H^-1]_qq``), and moves its other weights to compensate.

    Every row carries its own inverse Hessian, so it is for layers of at most
    :data:`~secateurs.criteria.hessian.OBS_MAX_IN_FEATURES` inputs (the LeNets, small heads);
    use ``sparsegpt`` beyond.
    """

    updates_weights: ClassVar[bool] = True

    dampening: float = 0.01
    sequential: bool | None = None

    def __post_init__(self) -> None:
        _check_sequential(self.sequential, "obs")
        check_dampening(self.dampening, "obs")

    def prune_matrix(
        self, weight: Tensor, inputs: HessianAccumulator, sparsity: float | None, n: int, m: int
    ) -> Tensor:
        if weight.shape[1] > OBS_MAX_IN_FEATURES:
            raise ModelError(
                f"obs keeps an inverse Hessian per row; a layer of {weight.shape[1]} inputs is "
                f"beyond its {OBS_MAX_IN_FEATURES}: use criterion 'sparsegpt'"
            )
        return obs_(weight, inputs.hessian(), sparsity=sparsity, n=n, m=m, dampening=self.dampening)


def _check_sequential(value: object, who: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{who} sequential must be true, false or null; got {value!r}")


def check_dampening(value: object, who: str) -> None:
    """Refuse a dampening outside [0, 1), naming the criterion ``who``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"{who} dampening (a fraction of the Hessian's mean diagonal) must be in [0, 1); "
            f"got {value!r}"
        )
