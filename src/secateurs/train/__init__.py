"""Recovery: the fine-tuning loop, regularizers toward prunability and distillation."""

from secateurs.train.distill import Distillation, kd_loss
from secateurs.train.loop import (
    LossTerm,
    TrainConfig,
    TrainHistory,
    finetune_config,
    make_optimizer,
    train,
)
from secateurs.train.regularizers import (
    BNL1,
    L1,
    L2,
    REGULARIZERS,
    GroupLasso,
    Regularizer,
    group_ids,
)

__all__ = [
    "BNL1",
    "L1",
    "L2",
    "REGULARIZERS",
    "Distillation",
    "GroupLasso",
    "LossTerm",
    "Regularizer",
    "TrainConfig",
    "TrainHistory",
    "finetune_config",
    "group_ids",
    "kd_loss",
    "make_optimizer",
    "train",
]
