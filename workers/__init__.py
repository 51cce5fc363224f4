"""Workers: attention variants, the model, tasks, and the train/eval loop for one trial.

Imports torch (and storage), never ray or optuna: a trial runs with no cluster at all. The trial's
names load on first use (PEP 562), so that validating a study file -- which reads the task and
variant registries -- does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CODE_VERSION", "TRAIN_DEFAULTS", "run_trial"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from workers import trial

        return getattr(trial, name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
