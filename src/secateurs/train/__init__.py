"""Recovery: the fine-tuning loop (regularizers and distillation come with sparse training)."""

from secateurs.train.loop import TrainConfig, TrainHistory, finetune_config, make_optimizer, train

__all__ = ["TrainConfig", "TrainHistory", "finetune_config", "make_optimizer", "train"]
