"""The attention-variant registry: one `Variant` line per variant, and nothing else to edit (no torch).

A variant is one file under `workers/attention/` -- its frozen config dataclass (options, defaults,
`uses_d_osc`), its `nn.Module` (built as `Module(cfg, d_model=, n_heads=, max_seq_len=, causal=,
rotary=)`) and its benchmark case (`bench_op`) -- plus one `register(Variant(...))` line. Everything
else is generated from the registry: the study schema's variant names and option validation
(`studies.spec`), the planner's option defaults (part of every trial key), `build_attention`, the
benchmark's cases (`workers.bench`), and the contract tests (tests/test_contracts.py).

The registry stays importable without torch, so that a study file is validated in well under a
second: `module` and `bench` may be given as "package.module:attribute" strings, loaded on first
use. The built-in variants also keep their config classes here (torch-free); a new variant may
instead keep its config in its own file and name it as a string (validating a study that uses it
then imports torch, about 3 s).

Configs are validated by pydantic over the dataclass (types, unknown options), then by the
dataclass's own `__post_init__` (allowed values, ranges), with one message format: the option,
the bad value, the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from storage.suggest import did_you_mean


def _one_of(variant: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{variant} {name}={value!r}; allowed: {list(allowed)}")


def _positive(name: str, value: float) -> None:
    if not float(value) > 0:
        raise ValueError(f"{name}={value} must be > 0")


# ---- the built-in variants' configs ----------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxConfig:
    """Softmax attention (VARIANTS.md section 1) has no options."""

    uses_d_osc: ClassVar[bool] = False


@dataclass(frozen=True)
class OscillatorConfig:
    """Fixed-query oscillator attention (paper A, VARIANTS.md section 2)."""

    uses_d_osc: ClassVar[bool] = True
    MODES: ClassVar[tuple] = ("analytic", "euler", "rk45")
    INITS: ClassVar[tuple] = ("random", "sequential")
    ANCHOR_NORMS: ClassVar[tuple] = ("init", "always")

    d_osc: int = 2
    p: float = 1.0  # readout exponent; 1 in the paper's headline results (and the only linear-time case)
    anchor_norm: str = "init"  # init (as the reference code) | always
    readout_padding_mask: bool = True  # False reproduces the reference code
    mode: str = "analytic"  # analytic (closed-form fixed point) | euler | rk45 (verification)
    init: str = "random"  # ODE starts: random (uniform on the sphere) | sequential
    t_max: float = 30.0  # ODE horizon
    dt: float = 0.05  # Euler step
    rtol: float = 1e-4  # RK45 tolerances
    atol: float = 1e-4
    jitter: float = 0.05  # std of the sequential starts' noise

    def __post_init__(self) -> None:
        if int(self.d_osc) != self.d_osc or int(self.d_osc) < 2:
            raise ValueError(f"d_osc={self.d_osc} must be an integer >= 2 (the oscillator lives on the sphere S^(d_osc-1))")
        if self.anchor_norm not in self.ANCHOR_NORMS:
            raise ValueError(f"anchor_norm={self.anchor_norm!r}; allowed: {list(self.ANCHOR_NORMS)}")
        if not float(self.p) > 0:
            raise ValueError(f"p={self.p}: the readout exponent must be > 0 (1 in the paper)")
        if self.mode not in self.MODES:
            raise ValueError(f"mode={self.mode!r}; allowed: {list(self.MODES)}")
        if self.init not in self.INITS:
            raise ValueError(f"init={self.init!r}; allowed: {list(self.INITS)}")
        for name in ("t_max", "dt", "rtol", "atol"):
            _positive(name, getattr(self, name))
        if float(self.jitter) < 0:
            raise ValueError(f"jitter={self.jitter} must be >= 0")


@dataclass(frozen=True)
class KuramotoConfig:
    """Kuramoto attention on the torus (paper B, reconstructed: VARIANTS.md section 3)."""

    uses_d_osc: ClassVar[bool] = False
    GATES: ClassVar[tuple] = ("softplus", "none")
    GATE_PER: ClassVar[tuple] = ("coordinate", "head")
    PHASE_DRIFTS: ClassVar[tuple] = ("rope", "none")
    SCORE_SCALES: ClassVar[tuple] = ("sqrt", "none")
    READOUTS: ClassVar[tuple] = ("phase", "delta")

    phase_dim: int | None = None  # M phase coordinates; None: d_model (a positive multiple of n_heads)
    gate: str = "softplus"  # softplus | none
    gate_per: str = "coordinate"  # coordinate | head
    phase_drift: str = "rope"  # rope | none: rotary position as a phase drift in the score
    rope_base: float = 10000.0
    score_scale: str = "sqrt"  # sqrt (1/sqrt(2P), SDPA's default) | none
    kappa_init: float = 1.0  # learned per-coordinate coupling, initial value
    steps: int = 1  # Kuramoto steps per layer
    readout: str = "phase"  # phase: W_out [cos theta', sin theta'] | delta: W_out delta

    def __post_init__(self) -> None:
        for name, allowed in (("gate", self.GATES), ("gate_per", self.GATE_PER), ("phase_drift", self.PHASE_DRIFTS),
                              ("score_scale", self.SCORE_SCALES), ("readout", self.READOUTS)):
            _one_of("kuramoto", name, getattr(self, name), allowed)
        if self.phase_dim is not None and self.phase_dim < 1:
            raise ValueError(f"kuramoto phase_dim={self.phase_dim} must be a positive multiple of n_heads")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"kuramoto steps={self.steps} must be an integer >= 1")
        if not float(self.rope_base) > 1:
            raise ValueError(f"kuramoto rope_base={self.rope_base} must be > 1")


# ---- the registry ----------------------------------------------------------------------------------


def load(target: Any) -> Any:
    """An object, or the object a "package.module:attribute" string names (imported on first use)."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Variant:
    """Everything the service needs to know about one attention variant."""

    name: str
    config: Any  # frozen dataclass (or "module:Class"): the options, their defaults, `uses_d_osc`
    module: Any  # nn.Module class (or "module:Class"): Module(cfg, d_model=, n_heads=, max_seq_len=, causal=, rotary=)
    bench: Any = None  # bench_op(case, B, T, D, H, device, leaf) -> (inputs, fn) (or "module:function"); None: not benchmarked
    has_reference: bool = False  # the benchmark also times its dense reference formula (case.naive)
    description: str = ""
    # option sets the contract tests (tests/test_contracts.py) run besides the defaults: the
    # configurations that take different code paths
    examples: tuple[dict[str, Any], ...] = ()

    @property
    def config_class(self) -> type:
        return load(self.config)

    @property
    def uses_d_osc(self) -> bool:
        """Cells multiply by the study's d_osc list (the config has a `d_osc` field)."""
        return bool(self.config_class.uses_d_osc)

    def defaults(self) -> dict[str, Any]:
        """Every option with its default (these enter every trial key: keep them stable)."""
        return dataclasses.asdict(self.config_class())

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_class)]

    def make_config(self, options: dict[str, Any]) -> Any:
        """The validated config: unknown options, wrong types and bad values raise ValueError naming
        the option, the value and the allowed values."""
        allowed = self.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"variant {self.name}: unknown option(s) {unknown}; allowed: {sorted(allowed) or 'none'}"
                             f"{''.join(did_you_mean(u, allowed) for u in unknown)}")
        return validate_dataclass(self.config_class, options, f"variant {self.name}")

    def build(self, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool, rotary: bool = False,
              **options: Any):
        cfg = self.make_config(options)
        return load(self.module)(cfg, d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal,
                                 rotary=rotary)


_ADAPTERS: dict[type, Any] = {}


def validate_dataclass(cls: type, values: dict[str, Any], what: str) -> Any:
    """`cls(**values)` validated by pydantic (types coerced as a study file needs: 1 -> 1.0, "x" -> error)
    and by the dataclass's own checks; a ValueError with one line per problem."""
    from pydantic import TypeAdapter, ValidationError

    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    try:
        return adapter.validate_python(dict(values))
    except ValidationError as error:
        # one line per field, named in full (`train.sampling='shuffle': ...`); the branches of a
        # union (eval_every: int | "epoch") are one field's alternatives, not several fields
        by_field: dict[str, list[str]] = {}
        whole: list[str] = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if item["loc"]:
                field = f"{what}.{item['loc'][0]}={item.get('input')!r}"
                by_field.setdefault(field, []).append(message)
            else:
                whole.append(message)
        problems = [f"{field}: {' or '.join(dict.fromkeys(messages))}" for field, messages in by_field.items()]
        if whole:
            problems.append(f"{what}: {'; '.join(whole)}")
        raise ValueError("; ".join(problems)) from None


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add a variant (a test may register one and remove it again with `unregister`)."""
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    VARIANTS.pop(name, None)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown attention variant {name!r}; known variants: {sorted(VARIANTS)}"
                         f"{did_you_mean(name, VARIANTS)}")
    return VARIANTS[name]


register(Variant("softmax", SoftmaxConfig, "workers.attention.softmax:SoftmaxAttention",
                 bench="workers.attention.softmax:bench_op", description="fused scaled dot-product attention"))
register(Variant("oscillator", OscillatorConfig, "workers.attention.oscillator:OscillatorAttention",
                 bench="workers.attention.oscillator:bench_op", has_reference=True,
                 description="paper A: fixed-query oscillator attention",
                 examples=({"d_osc": 16}, {"d_osc": 4, "p": 2.0})))
register(Variant("kuramoto", KuramotoConfig, "workers.attention.kuramoto:KuramotoAttention",
                 bench="workers.attention.kuramoto:bench_op", description="paper B: Kuramoto attention on the torus",
                 examples=({"gate_per": "head", "readout": "delta", "steps": 2},)))  # phase_dim fixed: tests/test_sizing.py (heads that divide it)


def variant_options() -> dict[str, dict[str, Any]]:
    """name -> {option: default}, for every registered variant."""
    return {name: variant.defaults() for name, variant in VARIANTS.items()}


def uses_d_osc() -> frozenset[str]:
    return frozenset(name for name, variant in VARIANTS.items() if variant.uses_d_osc)
