"""Workers: attention variants, the model, tasks, and the train/eval loop for one trial.

Imports torch (and storage), never ray or optuna: a trial runs with no cluster at all.
"""

from workers.trial import CODE_VERSION, TRAIN_DEFAULTS, run_trial

__all__ = ["CODE_VERSION", "TRAIN_DEFAULTS", "run_trial"]
