"""Tasks: data preparation (into the shared Arrow cache) and the task's loss and metrics.

A task turns its options into cached splits of fixed-width token arrays and tells the trainer how
to build the model's input and output ends. Unknown names fail with the list of known ones.
"""

from __future__ import annotations

from storage.suggest import did_you_mean
from workers.tasks.base import LMTask, PreparedTask, Task
from workers.tasks.codeparrot import CodeParrot
from workers.tasks.enwik8 import Enwik8
from workers.tasks.kws import KWS
from workers.tasks.mqar import MQAR
from workers.tasks.sva import SVA
from workers.tasks.tinystories import TinyStories
from workers.tasks.wikitext2 import WikiText2

TASKS: dict[str, Task] = {
    task.name: task for task in (MQAR(), KWS(), SVA(), WikiText2(), TinyStories(), Enwik8(), CodeParrot())
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}{did_you_mean(name, TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "LMTask", "PreparedTask", "get_task"]
