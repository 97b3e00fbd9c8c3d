"""RecoverConfig: every setting of :func:`recover.lora.recover` in one validated dataclass (PEFT's ``LoraConfig``
and transformers' ``TrainingArguments`` are the model). The CLI fills it from its options by field name."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Sequence


@dataclass
class RecoverConfig:
    """LoRA recovery settings; defaults follow LLM-Pruner's ``post_training.py`` but for the learning rate, 1e-3
    (measured, bench/results/distill.md; see :func:`recover.lora.recover`).

    LoRA: ``rank``, ``alpha``, ``dropout``, ``target_modules`` (None: every ``nn.Linear`` but ``lm_head``).
    Schedule: ``max_steps`` (overrides ``epochs``), ``epochs``, ``lr``, ``batch_size`` examples per optimizer step
    in micro-batches of ``micro_batch_size``, ``cutoff_len`` tokens per example, ``warmup_steps`` (at most a tenth of
    the run), ``lr_scheduler_type``, ``weight_decay``, ``bf16`` (None: when the GPU supports it),
    ``gradient_checkpointing``, ``max_minutes`` (stop and checkpoint after that much training; with
    ``decay_by_time`` and the linear schedule the rate decays to 0 over those minutes).
    Validation: ``val_size`` held-out examples (int or fraction), ``eval_steps`` (default ``save_steps``),
    ``early_stopping_patience``. Checkpoints: ``save_steps``, ``save_total_limit``, ``resume_from_checkpoint``.
    Distillation: ``distill``, ``distill_alpha``, ``temperature``. Data: ``seed``, ``limit``, ``data_dir``,
    ``train_on_inputs``. Output: ``logging_steps``, ``save`` (write OUT), ``overwrite`` (replace a foreign OUT).
    Invalid values raise ``ValueError`` when the config is made.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | Sequence[str] | None = None
    max_steps: int | None = None
    epochs: float = 2.0
    lr: float = 1e-3  # LLM-Pruner's 1e-4 recovers far less per step here: bench/results/distill.md
    batch_size: int = 64
    micro_batch_size: int = 4
    cutoff_len: int = 256
    val_size: int | float = 0
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    save_steps: int = 200
    save_total_limit: int | None = 3
    warmup_steps: int = 100
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    resume_from_checkpoint: bool | str | None = None
    distill: bool = False
    distill_alpha: float = 0.5
    temperature: float = 1.0
    seed: int = 42
    limit: int | None = None
    data_dir: str | os.PathLike | None = None
    train_on_inputs: bool = False
    logging_steps: int = 10
    max_minutes: float | None = None
    decay_by_time: bool = True
    save: bool = True
    overwrite: bool = False

    def __post_init__(self):
        for name in ("rank", "micro_batch_size", "batch_size"):
            v = getattr(self, name)
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1 (got {v})")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (got {self.max_steps})")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 (got {self.epochs})")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1] (got {self.distill_alpha})")
        if self.early_stopping_patience is not None and not self.val_size:
            raise ValueError("early stopping needs a validation split: set val_size > 0")

    @classmethod
    def names(cls) -> tuple:
        """The field names, in order."""
        return tuple(f.name for f in fields(cls))

    def updated(self, **options) -> "RecoverConfig":
        """A copy with ``options`` replaced (validated again); an unknown name raises ``TypeError`` naming it."""
        unknown = sorted(set(options) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown recover setting(s) {', '.join(unknown)}; RecoverConfig has "
                            f"{', '.join(self.names())}")
        return replace(self, **options)

    @classmethod
    def from_options(cls, options) -> "RecoverConfig":
        """The config of an options object (an ``argparse.Namespace``): every attribute named like a field."""
        return cls(**{n: getattr(options, n) for n in cls.names() if hasattr(options, n)})
