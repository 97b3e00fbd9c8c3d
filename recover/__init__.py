"""Recovery and evaluation helpers for pruned models (offline, local data copies)."""

from recover.datasets import DataNotFoundError, ppl_text, resolve_data_dir, zeroshot_file
from recover.evaluate import LM_EVAL_TASKS, choice_loglikelihoods, perplexity, task_configs, zero_shot

__all__ = [
    "DataNotFoundError",
    "LM_EVAL_TASKS",
    "choice_loglikelihoods",
    "perplexity",
    "ppl_text",
    "resolve_data_dir",
    "task_configs",
    "zero_shot",
    "zeroshot_file",
]
