"""The model's and the training recipe's configs: declared once, here, without torch.

`ModelConfig` is what `workers.model.Transformer` builds; `TrainConfig` is what `workers.trial`
trains with. The study schema (`studies.spec`) validates the `model:` and `train:` sections of a
study file against these same classes (pydantic over the dataclasses, through the `Annotated`
bounds below), so a value the schema accepts is a value the trainer runs.

`ModelConfig` fields come from three places: the study file (`STUDY_MODEL_FIELDS`), the task's data
(vocabulary, sequence length, head, classes, input features, causality: `Task.model_fields`) and
the variant (`attention`, `attention_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

# Upper bounds no machine can run past (a trial of such a shape needs terabytes, or the number
# overflows a ledger column); the resource check before Ray starts compares with this node's memory.
MAX_WIDTH = 65_536  # d_model
MAX_LAYERS = 1_024
MAX_FFN = 1 << 20  # d_ff
MAX_BATCH = 1 << 20  # sequences per step
MAX_STEPS = 10**9
MAX_TOKENS = 10**15
MAX_EPOCHS = 10**6

POSITIONS = ("sinusoidal", "learned", "none", "rope")
HEADS = ("lm", "classify", "token")
BACKBONES = ("a", "b")

# What a study file's `model:` section sets (the rest comes from the task and the variant).
STUDY_MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "positions", "backbone", "final_norm",
                      "padding_idx")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: Annotated[int, Field(ge=8, le=MAX_WIDTH)] = 64
    n_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)] = 2
    n_heads: Annotated[int, Field(ge=1, le=MAX_LAYERS)] = 2
    d_ff: Annotated[int, Field(ge=1, le=MAX_FFN)] = 256
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    max_seq_len: int = 128
    # sinusoidal | learned: added to the embedding; rope: rotary embeddings on q and k inside every
    # attention layer (VARIANTS.md: paper B's backbone), nothing added; none: no positions
    positions: Literal[POSITIONS] = "sinusoidal"
    causal: bool = True
    # lm: next-token logits at every position; classify: mean-pool over non-padding positions, then C
    # logits; token: C logits read at one given position per example (e.g. SVA's verb)
    head: str = "lm"
    num_classes: int = 0
    input_dim: Optional[int] = None  # None: token ids through an embedding; int: feature vectors through Linear
    attention: str = "softmax"
    attention_options: dict[str, Any] = field(default_factory=dict)
    backbone: Literal[BACKBONES] = "a"  # a: paper A (LayerNorm, GELU FFN) | b: paper B (RoPE, SwiGLU, RMSNorm)
    final_norm: bool = True  # norm before the head (paper A's KWS model has none)
    # the embedding row of this token id (the task's PAD, 0 in every tokenised task here) is zero
    # and gets no gradient, as torch's nn.Embedding(padding_idx=...) and paper A's code
    padding_idx: Annotated[Optional[int], Field(ge=0)] = None

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r}; allowed: {list(BACKBONES)} (a: paper A, b: paper B)")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}; allowed: {list(POSITIONS)}")
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}; allowed: {list(HEADS)}")
        check_heads(self.d_model, self.n_heads, self.rotary)
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"padding_idx={self.padding_idx} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def rotary(self) -> bool:
        """RoPE on q and k: backbone b always has it (paper B), backbone a with `positions: rope`."""
        return self.backbone == "b" or self.positions == "rope"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_heads(d_model: int, n_heads: int, rotary: bool) -> None:
    """The head split the attention layers need; raises naming both fields and the fix."""
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if rotary and (d_model // n_heads) % 2:
        raise ValueError(f"rotary embeddings (backbone b or positions: rope) need an even head width, but "
                         f"d_model={d_model} / n_heads={n_heads} = {d_model // n_heads}; change d_model or n_heads")


def study_model_fields() -> dict[str, tuple[Any, Any]]:
    """The (annotation, default) of every field a study file's `model:` section may set."""
    hints = _hints(ModelConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {name: (hints[name], defaults[name]) for name in STUDY_MODEL_FIELDS}


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls, include_extras=True)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of one trial. The budget is exactly one of steps, epochs or tokens; with
    none given it is `steps` (1000)."""

    steps: Annotated[Optional[int], Field(ge=1, le=MAX_STEPS)] = 1000
    epochs: Annotated[Optional[float], Field(gt=0, le=MAX_EPOCHS, allow_inf_nan=False)] = None
    tokens: Annotated[Optional[int], Field(ge=1, le=MAX_TOKENS)] = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 64
    eval_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 256
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    # steps between evaluations, or "epoch": after every pass over the train split
    eval_every: Union[int, Literal["epoch"]] = 100
    optimizer: Literal["adamw", "adam"] = "adamw"
    # epoch: every epoch is a fresh permutation of the train split, drawn without replacement (the
    # last batch of an epoch is short, as a DataLoader with shuffle=True); replacement: i.i.d. batches
    sampling: Literal["epoch", "replacement"] = "epoch"
    # best: the trial's result is its best validation evaluation (and the test split is scored with
    # that model); final: its last evaluation (paper A's SVA)
    select: Literal["best", "final"] = "best"


BUDGETS = ("steps", "epochs", "tokens")


def train_defaults() -> dict[str, Any]:
    return dataclasses.asdict(TrainConfig())


def study_train_fields() -> dict[str, tuple[Any, Any]]:
    """The (annotation, default) of every `train:` key a study file may set; the budget keys default
    to None there (the schema then checks that at most one is given)."""
    hints = _hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        out[f.name] = (hints[f.name], None if f.name in BUDGETS else f.default)
    return out
