"""LoRA recovery of a pruned model with PEFT and transformers' ``Trainer`` (optionally distilling a dense teacher).

Everything distributed comes from ``Trainer``: run a script that calls :func:`recover` under ``accelerate launch``
(or ``torchrun``) and it trains data-parallel, with FSDP or DeepSpeed as the accelerate config says, with no code
of ours.  LoRA adapters are per-module, so pruned models with non-uniform per-layer widths need nothing special.

After training the adapters are merged (``merge_and_unload``) and the model is written with
:func:`depgraph.save_pruned` to ``output_dir/model`` (loads with :func:`depgraph.load_pruned`).  The adapter alone
is kept in ``output_dir/adapter``, Trainer checkpoints in ``output_dir/checkpoints`` and the run summary in
``output_dir/summary.json``.  ``output_dir`` is marked as a depgraph run folder whose model is ``model/``, so every
MODEL argument (``load_model``, the CLI) accepts ``output_dir`` itself.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from recover.config import RecoverConfig
from recover.data import IGNORE_INDEX, DataCollator, TokenizedDataset, build_datasets

__all__ = ["DistillTrainer", "default_target_modules", "distill_kl", "recover", "resolve_target_modules"]


# ============================================================================ target modules


def _output_module_names(model) -> set[str]:
    out = set()
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            out.add(name)
        elif name.rsplit(".", 1)[-1] == "lm_head":
            out.add(name)
    return out


def default_target_modules(model) -> list[str]:
    """The leaf names of every ``nn.Linear`` of ``model`` except the output head (``lm_head``)."""
    heads = _output_module_names(model)
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name not in heads:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer (besides the output head) to put LoRA on")
    return names


def resolve_target_modules(model, target_modules: str | Sequence[str] | None) -> list[str]:
    """``target_modules`` checked against the model: each name must match (exactly, or as a dotted suffix) at least
    one ``nn.Linear``; ``None`` gives :func:`default_target_modules`.  A comma-separated string is accepted."""
    if target_modules is None:
        return default_target_modules(model)
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty; give module names such as q_proj,v_proj or None for all linears")
    modules = dict(model.named_modules())
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
    for t in targets:
        hits = [n for n in modules if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"LoRA target module {t!r} matches no module of {type(model).__name__}; "
                             f"its linear layers are named: {', '.join(linear_leaves)}")
        if not any(isinstance(modules[n], torch.nn.Linear) for n in hits):
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise ValueError(f"LoRA target module {t!r} matches only {', '.join(kinds)} modules, not nn.Linear; "
                             f"linear layers: {', '.join(linear_leaves)}")
    return targets


# ============================================================================ distillation


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at every position that predicts a labelled token
    (``labels[:, 1:] != -100``), times ``temperature**2``.  ``reduction``: ``"mean"`` over those positions or
    ``"sum"``."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher vocabulary ({teacher_logits.shape[-1]}) differs from the student's "
                         f"({student_logits.shape[-1]}); distillation needs the same tokenizer")
    keep = labels[:, 1:] != IGNORE_INDEX
    s = student_logits[:, :-1][keep].float() / temperature
    t = teacher_logits[:, :-1][keep].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    kl = kl * temperature**2
    return kl.sum() if reduction == "sum" else kl.mean()


def _trainer_cls():
    from transformers import Trainer

    class RecoveryTrainer(Trainer):
        """``Trainer`` whose loss is ``(1 - distill_alpha) * LM loss + distill_alpha * KL(teacher || student)`` when a
        teacher is given (plain ``Trainer`` loss otherwise).  The KL is normalised exactly like the LM loss: by the
        number of labelled tokens of the whole accumulated batch when the Trainer passes ``num_items_in_batch``."""

        def __init__(self, *args, teacher=None, distill_alpha: float = 0.5, temperature: float = 1.0,
                     time_budget_s: float | None = None, **kw):
            super().__init__(*args, **kw)
            self.time_budget_s = time_budget_s
            self.teacher = teacher
            self.distill_alpha = float(distill_alpha)
            self.temperature = float(temperature)
            self.last_losses: dict[str, float] = {}

        def create_scheduler(self, num_training_steps, optimizer=None):
            """With ``time_budget_s``: linear warm-up over the warm-up steps, then a linear decay that reaches 0 when
            the time budget is spent (so a run cut by ``max_minutes`` still anneals); else Trainer's scheduler."""
            if self.time_budget_s is None or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            warm, start, budget = self.args.get_warmup_steps(num_training_steps), time.time(), self.time_budget_s
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda step: min(1.0, step / warm if warm else 1.0) * max(0.0, 1.0 - (time.time() - start) / budget))
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            lm_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if next(self.teacher.parameters()).device != labels.device:
                self.teacher.to(labels.device)
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs["input_ids"],
                                        attention_mask=inputs.get("attention_mask")).logits
            s_logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                kl = distill_kl(s_logits, t_logits, labels, self.temperature, "sum") / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    kl = kl * self.accelerator.num_processes
            else:
                kl = distill_kl(s_logits, t_logits, labels, self.temperature, "mean")
            a = self.distill_alpha
            loss = (1 - a) * lm_loss + a * kl
            if model.training:
                self.last_losses = {"lm": float(lm_loss.detach()), "kl": float(kl.detach())}
            return (loss, outputs) if return_outputs else loss

    return RecoveryTrainer


def DistillTrainer(*args, **kwargs):  # noqa: N802 - a factory that reads like the class
    """Build the ``Trainer`` subclass used by :func:`recover` (``teacher=``, ``distill_alpha=``, ``temperature=``)."""
    return _trainer_cls()(*args, **kwargs)


# ============================================================================ helpers


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _time_budget_callback(minutes: float):
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self):
            self.start = None
            self.stopped_early = False

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kw):
            if self.start is not None and time.time() - self.start > minutes * 60:
                self.stopped_early = True
                control.should_training_stop = True
                control.should_save = True
            return control

    return TimeBudget()


def _progress_callback(print_fn):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in logs.items()
                         if k in ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch")}
                if shown:
                    print_fn(f"step {state.global_step}/{state.max_steps}: "
                             + ", ".join(f"{k}={v}" for k, v in shown.items()))

    return Progress()


def _load_teacher(teacher):
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        from depgraph.models import load_model

        teacher, _ = load_model(teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _as_datasets(data, tokenizer, cutoff_len, val_size, seed, limit, data_dir, train_on_inputs, generator=None):
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.utils.data.Dataset):
        return data
    if isinstance(data, torch.utils.data.Dataset):
        return data, None
    return build_datasets(data, tokenizer, cutoff_len=cutoff_len, val_size=val_size, seed=seed, limit=limit,
                          train_on_inputs=train_on_inputs, data_dir=data_dir, model=generator)


# ============================================================================ recover


def recover(
    model,
    tokenizer,
    data,
    output_dir: str | os.PathLike,
    config: RecoverConfig | None = None,
    *,
    teacher=None,
    progress: bool | Any = True,
    training_args: dict | None = None,
    callbacks: list | None = None,
    **options,
):
    """LoRA-fine-tune ``model`` (a pruned causal LM, modified in place) on ``data``, merge and save it.

    Settings: ``config`` (a :class:`recover.config.RecoverConfig`, default its defaults) with ``options`` (any of
    its fields by name, e.g. ``rank=16``) replacing fields; the paragraphs below name the fields.

    ``data``: a source for :func:`recover.data.load_examples` (a JSON/JSONL path, ``"alpaca"``, ``"wikitext2"`` --
    WikiText-2's validation split in ``cutoff_len``-token windows --, a plain-text file,
    ``"self"`` -- ``limit`` texts sampled from the teacher when distilling, else from ``model`` --, a hub dataset
    name, a list of dicts), a tokenised ``Dataset``, or a ``(train, val)`` pair of them.  Defaults follow
    LLM-Pruner's ``post_training.py`` (rank 8, alpha 16, dropout 0.05, 2 epochs, batch 64 of micro-batches of 4,
    cutoff 256, 100 warm-up steps -- capped at a tenth of the run) but for the learning rate: lr 1e-3, not 1e-4
    (measured on SmolLM2 pruned by 20%: at equal steps 1e-3 recovers far more than 2e-4, bench/results/distill.md).  ``target_modules=None`` puts LoRA on
    every ``nn.Linear`` except ``lm_head``; a name that matches nothing raises ``ValueError``.

    ``val_size`` holds out examples (int or fraction) evaluated every ``eval_steps`` (default ``save_steps``);
    ``early_stopping_patience`` stops after that many evaluations without improvement and loads the best
    checkpoint.  ``bf16=None`` uses bf16 when the GPU supports it (never fp16: it gave NaN losses in LLM-Pruner).
    ``resume_from_checkpoint=True`` resumes from the last checkpoint in ``output_dir/checkpoints`` (or give a
    path); resuming reproduces an uninterrupted run exactly (same seeds, data order, optimizer and scheduler).
    ``max_steps`` overrides ``epochs``; ``max_minutes`` stops (and checkpoints) after that much training time, and
    (``decay_by_time=True``, the default, with the linear schedule and no ``max_steps``) the learning rate then
    decays linearly to 0 over those minutes instead of over the planned epochs the budget would cut short.

    ``distill=True`` mixes the LM loss with KL to ``teacher``'s logits (a model or a path for
    :func:`depgraph.models.load_model`; the dense model the pruned one came from):
    ``(1 - distill_alpha) * LM + distill_alpha * T^2 * KL(teacher || student)``.

    Returns ``(merged_model, summary)``; ``summary`` holds losses, steps, runtime, ``tokens_per_second``
    (non-padding tokens of the training batches per second of ``Trainer`` training time) and the output paths.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import EarlyStoppingCallback, TrainingArguments, set_seed

    from depgraph.io import save_pruned
    from depgraph.outdir import check_output, mark

    c = (config or RecoverConfig()).updated(**options)
    if tokenizer is None:
        raise ValueError("recover needs the model's tokenizer")
    if c.distill and teacher is None:
        raise ValueError("distill=True needs a teacher: the dense model (or its path) the pruned model came from")
    print_fn = progress if callable(progress) else (print if progress else (lambda *a, **k: None))

    targets = resolve_target_modules(model, c.target_modules)  # a bad name is refused before OUT is touched
    output_dir = Path(output_dir)
    if c.save:  # refused before any work: a file, a foreign non-empty folder (unless overwrite), an unwritable parent
        check_output(output_dir, overwrite=c.overwrite or c.resume_from_checkpoint is not None)
        output_dir.mkdir(parents=True, exist_ok=True)
        mark(output_dir, "recover", model="model")  # any MODEL argument accepts OUT (it loads OUT/model)
    ckpt_dir = output_dir / "checkpoints"
    set_seed(c.seed)
    teacher_model = _load_teacher(teacher) if c.distill else None
    # data "self": text sampled from the teacher when distilling (its own distribution), else from the model
    train_ds, val_ds = _as_datasets(data, tokenizer, c.cutoff_len, c.val_size, c.seed, c.limit, c.data_dir,
                                    c.train_on_inputs, generator=teacher_model if teacher_model is not None else model)
    if len(train_ds) == 0:
        raise ValueError("the training set is empty")

    # ---- steps and schedule
    world = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum = max(1, c.batch_size // (c.micro_batch_size * world))
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (c.micro_batch_size * world)) // grad_accum)
    total_steps = c.max_steps if c.max_steps is not None else math.ceil(steps_per_epoch * c.epochs)
    warmup = min(int(c.warmup_steps), total_steps // 10)
    use_bf16 = _bf16_supported() if c.bf16 is None else bool(c.bf16)
    do_eval = val_ds is not None and len(val_ds) > 0
    eval_every = int(c.eval_steps or c.save_steps)
    if c.early_stopping_patience is not None and c.save_steps % eval_every:
        raise ValueError(f"with early stopping, save_steps ({c.save_steps}) must be a multiple of eval_steps "
                         f"({eval_every})")

    # ---- model
    model.config.use_cache = False
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    lora_config = LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora_config)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in peft_model.parameters())

    args = dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=c.micro_batch_size,
        per_device_eval_batch_size=c.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=float(c.epochs),
        max_steps=int(c.max_steps) if c.max_steps is not None else -1,
        learning_rate=c.lr,
        weight_decay=c.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=c.lr_scheduler_type,
        optim="adamw_torch",
        bf16=use_bf16,
        fp16=False,
        logging_steps=c.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=c.save_steps,
        save_total_limit=c.save_total_limit,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=eval_every if do_eval else None,
        load_best_model_at_end=c.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if c.early_stopping_patience is not None else None,
        greater_is_better=False if c.early_stopping_patience is not None else None,
        seed=c.seed,
        data_seed=c.seed,
        report_to="none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False if world > 1 else None,
    )
    args.update(training_args or {})
    cbs = list(callbacks or [])
    if c.early_stopping_patience is not None:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=c.early_stopping_patience))
    budget = _time_budget_callback(c.max_minutes) if c.max_minutes else None
    # a run cut by the time budget decays its rate over that time, not over steps it will never reach
    time_decay = bool(c.max_minutes and c.max_steps is None and c.decay_by_time and c.lr_scheduler_type == "linear")
    if budget is not None:
        cbs.append(budget)
    if progress:
        cbs.append(_progress_callback(print_fn))

    trainer = DistillTrainer(
        model=peft_model,
        args=TrainingArguments(**args),
        train_dataset=train_ds,
        eval_dataset=val_ds if do_eval else None,
        data_collator=DataCollator.for_tokenizer(tokenizer),
        processing_class=tokenizer,
        callbacks=cbs,
        teacher=teacher_model,
        distill_alpha=c.distill_alpha,
        temperature=c.temperature,
        time_budget_s=c.max_minutes * 60 if time_decay else None,
    )
    if not progress:  # Trainer prints every log dict when tqdm is off; progress=False means quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = c.resume_from_checkpoint
    if resume is True and not any(ckpt_dir.glob("checkpoint-*")):
        print_fn(f"no checkpoint in {ckpt_dir}; starting from scratch")
        resume = None
    print_fn(f"LoRA r={c.rank} alpha={c.alpha} dropout={c.dropout} on {', '.join(targets)}: {n_trainable:,} "
             f"trainable of "
             f"{n_total:,} parameters; {len(train_ds)} train / {len(val_ds) if do_eval else 0} val examples, "
             f"{total_steps} steps of {c.micro_batch_size}x{grad_accum}x{world}, bf16={use_bf16}"
             f"{', distilling' if teacher_model is not None else ''}")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    runtime = float(metrics.get("train_runtime", 0.0)) or 1e-9
    session_tokens = int(trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0))

    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    final_eval = None
    if do_eval:  # reuse the evaluation of the final (or, with early stopping, the loaded best) weights if there is one
        last = [h for h in trainer.state.log_history if "eval_loss" in h]
        if c.early_stopping_patience is not None and trainer.state.best_metric is not None:
            final_eval = float(trainer.state.best_metric)
        elif last and last[-1].get("step") == trainer.state.global_step:
            final_eval = float(last[-1]["eval_loss"])
        else:
            final_eval = float(trainer.evaluate()["eval_loss"])

    summary: dict[str, Any] = {
        "rank": c.rank, "alpha": c.alpha, "dropout": c.dropout, "target_modules": targets,
        "trainable_params": n_trainable, "total_params": n_total,
        "train_examples": len(train_ds), "val_examples": len(val_ds) if do_eval else 0,
        "steps": int(trainer.state.global_step), "planned_steps": int(trainer.state.max_steps),
        "epochs": float(trainer.state.epoch or 0.0),
        "micro_batch_size": c.micro_batch_size, "grad_accum": grad_accum, "world_size": world,
        "lr": c.lr, "lr_decay": "time" if time_decay else c.lr_scheduler_type, "bf16": use_bf16, "gradient_checkpointing": c.gradient_checkpointing,
        "distill": teacher_model is not None, "distill_alpha": c.distill_alpha if teacher_model is not None else None,
        "first_loss": train_losses[0] if train_losses else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "train_loss": metrics.get("train_loss"),
        "eval_losses": eval_losses, "final_eval_loss": final_eval,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "stopped_by_time_budget": bool(budget and budget.stopped_early),
        "train_runtime_s": runtime,
        "train_tokens": session_tokens,
        "tokens_per_second": session_tokens / runtime,  # train_runtime includes in-training evals/saves
        "samples_per_second": metrics.get("train_samples_per_second"),
        "resumed_from": str(resume) if resume else None,
    }

    # ---- adapter, merge, save
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    is_main = trainer.is_world_process_zero()
    if c.save and is_main:
        unwrapped.save_pretrained(str(output_dir / "adapter"))
    merged = unwrapped.merge_and_unload()
    merged.config.use_cache = True
    if c.gradient_checkpointing and hasattr(merged, "gradient_checkpointing_disable"):
        merged.gradient_checkpointing_disable()
    merged.eval()
    if c.save and is_main:
        save_pruned(merged, output_dir / "model", tokenizer=tokenizer)
        summary["model_dir"] = str(output_dir / "model")
        summary["adapter_dir"] = str(output_dir / "adapter")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return merged, summary
