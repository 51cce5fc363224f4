"""Parameter-count targeting: `target_params` -> a model shape (layers, width, heads, FFN width).

Shape policy (every number a keyword argument with this default):
- head width K = 32 (paper A's language models: D 128 with 4 heads), so n_heads = D / K;
- aspect ratio D / n_layers = 64 (paper A's language models: D 128, 2 layers), n_layers =
  max(1, round(D / 64)); widths D = K, 2K, 3K, ... are the candidates;
- FFN width nominally 4 D (backbone a, GELU) or 8/3 D (backbone b, SwiGLU: the same FFN parameters);
  the FFN width is what absorbs the difference to the target, in steps of 8 (steps of 1 if 8 would
  miss the tolerance), and must stay within [1, 8] x D;
- the width D chosen is the candidate whose solved FFN width is nearest the nominal ratio (on a log
  scale) for the softmax model at that target; every variant then keeps that depth, width and
  head count and only re-solves its FFN width (oscillator anchors, Kuramoto gates and couplings
  are absorbed there), so variants at one target differ only in FFN width. A variant that refuses
  that head count (Kuramoto with a fixed `phase_dim` the heads do not divide) takes the divisor of
  D nearest it that it accepts (`shared_shape: False`), and is refused, naming its options, when it
  accepts none. A variant whose FFN
  width would leave [1, 8] x D (e.g. d_osc 64 anchors at a long max_seq_len in a small model)
  gets its own width by the same rule instead, and says so (`shared_shape: False`).
- `count`: "total" (default, as papers A and B quote sizes) or "non_embedding" (leaves out token
  and learned position tables), the count that is matched to the target.
The result records both counts, exactly as `Transformer.param_counts` gives them (models are
built on the meta device: no memory, no initialisation cost).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from workers.model import ModelConfig, Transformer

SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff")
COUNTS = ("total", "non_embedding")


_COUNTS_CACHE: dict[str, tuple[int, int]] = {}


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of the model `cfg` describes, without allocating it."""
    key = repr(cfg)
    if key not in _COUNTS_CACHE:
        with torch.device("meta"):
            _COUNTS_CACHE[key] = Transformer(cfg).param_counts()
    return _COUNTS_CACHE[key]


def _config(base: dict[str, Any], d_model: int, n_layers: int, n_heads: int, d_ff: int) -> ModelConfig:
    return ModelConfig(**base, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff)


def _solve_ffn(base: dict[str, Any], d_model: int, n_layers: int, n_heads: int, *, target: float, which: int,
               multiple: int, tolerance: float) -> tuple[int, tuple[int, int]]:
    """The FFN width whose count (`which`: 0 total, 1 non-embedding) is nearest the target. The count
    is affine in d_ff, so two builds give it exactly."""
    low = count_params(_config(base, d_model, n_layers, n_heads, 8))[which]
    high = count_params(_config(base, d_model, n_layers, n_heads, 16))[which]
    per_unit = (high - low) / 8
    exact = 8 + (target - low) / per_unit
    d_ff = max(1, int(round(exact / multiple)) * multiple)
    if abs(low + per_unit * (d_ff - 8) - target) > tolerance * target:
        d_ff = max(1, int(round(exact)))
    return d_ff, count_params(_config(base, d_model, n_layers, n_heads, d_ff))


def _candidates(head_width: int, aspect_ratio: float, max_width: int) -> list[tuple[int, int, int]]:
    return [(D, max(1, int(round(D / aspect_ratio))), D // head_width)
            for D in range(head_width, max_width + 1, head_width)]


def _valid_heads(base: dict[str, Any], D: int, L: int, H: int, d_ff: int) -> tuple[int, str]:
    """A head count for width D that the variant accepts: H when the model builds with it, else the
    divisor of D nearest H (log scale; the larger on a tie) with which it builds, e.g. Kuramoto with
    a fixed `phase_dim` needs heads dividing it. (0, the variant's refusal of H) when none does."""
    try:
        count_params(_config(base, D, L, H, d_ff))
        return H, ""
    except ValueError as error:
        refusal = str(error)
    for other in sorted((h for h in range(1, D + 1) if D % h == 0 and h != H), key=lambda h: (abs(math.log(h / H)), -h)):
        try:
            count_params(_config(base, D, L, other, d_ff))
            return other, ""
        except ValueError:
            continue
    return 0, refusal


def _best_shape(base, *, target, which, head_width, aspect_ratio, ffn_ratio, ffn_range, multiple, tolerance,
                max_width, refusals: list[str] | None = None) -> dict[str, Any] | None:
    best, best_score = None, math.inf
    for D, L, H in _candidates(head_width, aspect_ratio, max_width):
        H, refusal = _valid_heads(base, D, L, H, max(1, int(ffn_range[0] * D)))
        if not H:
            if refusals is not None:
                refusals.append(f"d_model={D}: {refusal}")
            continue
        minimal = count_params(_config(base, D, L, H, max(1, int(ffn_range[0] * D))))[which]
        if minimal > target * (1 + tolerance):
            break  # wider only grows
        d_ff, counts = _solve_ffn(base, D, L, H, target=target, which=which, multiple=multiple, tolerance=tolerance)
        if not ffn_range[0] * D <= d_ff <= ffn_range[1] * D or abs(counts[which] - target) > tolerance * target:
            continue
        score = abs(math.log(d_ff / (ffn_ratio * D)))
        if score < best_score:
            best, best_score = {"d_model": D, "n_layers": L, "n_heads": H, "d_ff": d_ff, "counts": counts}, score
    return best


def shape_for_target(
    target_params: float,
    *,
    variant: str = "softmax",
    variant_options: dict[str, Any] | None = None,
    vocab_size: int,
    seq_len: int,
    backbone: str = "a",
    head: str = "lm",
    num_classes: int = 0,
    input_dim: int | None = None,
    positions: str | None = None,
    causal: bool = True,
    count: str = "total",
    head_width: int = 32,
    aspect_ratio: float = 64.0,
    ffn_ratio: float | None = None,
    ffn_range: tuple[float, float] = (1.0, 8.0),
    ffn_multiple: int = 8,
    tolerance: float = 0.01,
    max_width: int = 4096,
) -> dict[str, Any]:
    """A model shape for `variant` whose `count` parameters are within `tolerance` of `target_params`.

    Returns the ModelConfig shape fields (d_model, n_layers, n_heads, d_ff) plus params_total,
    params_non_embedding, target_params, count, relative_error and shared_shape (True when the
    softmax model at this target has the same depth, width and heads). `seq_len` is the model's
    max_seq_len (oscillator anchors grow with it). The default tolerance, 1%, keeps any two
    variants at one target within 2% of each other."""
    if count not in COUNTS:
        raise ValueError(f"count={count!r}; allowed: {list(COUNTS)}")
    if not target_params > 0:
        raise ValueError(f"target_params={target_params} must be > 0")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in (0, 1)")
    which = COUNTS.index(count)
    if ffn_ratio is None:
        ffn_ratio = 4.0 if backbone == "a" else 8.0 / 3.0
    if positions is None:
        positions = "sinusoidal" if backbone == "a" else "none"
    common = dict(vocab_size=vocab_size, max_seq_len=seq_len, backbone=backbone, head=head, num_classes=num_classes,
                  input_dim=input_dim, positions=positions, causal=causal, dropout=0.0)
    policy = dict(target=float(target_params), which=which, head_width=head_width, aspect_ratio=aspect_ratio,
                  ffn_ratio=ffn_ratio, ffn_range=ffn_range, multiple=ffn_multiple, tolerance=tolerance,
                  max_width=max_width)
    own = {**common, "attention": variant, "attention_options": dict(variant_options or {})}
    reference = _best_shape({**common, "attention": "softmax", "attention_options": {}}, **policy)
    shape, shared, refusals = None, False, []
    if reference is not None:
        D, L, H = reference["d_model"], reference["n_layers"], reference["n_heads"]
        own_heads, _ = _valid_heads(own, D, L, H, reference["d_ff"])  # the softmax head count, or the nearest valid one
        if own_heads:
            d_ff, counts = _solve_ffn(own, D, L, own_heads, target=policy["target"], which=which,
                                      multiple=ffn_multiple, tolerance=tolerance)
            if ffn_range[0] * D <= d_ff <= ffn_range[1] * D and abs(counts[which] - target_params) <= tolerance * target_params:
                shape = {"d_model": D, "n_layers": L, "n_heads": own_heads, "d_ff": d_ff, "counts": counts}
                shared = own_heads == H
    if shape is None:
        shape = _best_shape(own, **policy, refusals=refusals)
    if shape is None and refusals:
        raise ValueError(
            f"no shape for {variant} {variant_options or {}} near {target_params:g} {count} parameters: at every "
            f"width the variant refuses every head count that divides d_model ({refusals[0]}; ...); choose "
            f"variant options that some head count satisfies (head counts are d_model / head_width, "
            f"head_width={head_width}, or a divisor of d_model), e.g. leave kuramoto's phase_dim unset (it follows d_model)")
    if shape is None:
        raise ValueError(
            f"no shape for {variant} {variant_options or {}} within {tolerance:.0%} of {target_params:g} "
            f"{count} parameters (vocab_size={vocab_size}, seq_len={seq_len}, backbone={backbone}): with "
            f"head width {head_width} and FFN width in {list(ffn_range)} x D the smallest model is larger, or "
            f"the embedding alone exceeds the target; use count='non_embedding', a larger target, or a smaller head width"
        )
    total, non_embedding = shape.pop("counts")
    matched = (total, non_embedding)[which]
    return {
        **shape,
        "params_total": int(total),
        "params_non_embedding": int(non_embedding),
        "target_params": float(target_params),
        "count": count,
        "relative_error": (matched - target_params) / target_params,
        "shared_shape": shared,
    }


def parameter_matched(target_params: float, variants: list[tuple[str, dict[str, Any]]], **kwargs: Any) -> list[dict]:
    """Shapes for several (variant, options) at one target, checked to be within 2% of each other."""
    shapes = [{"variant": name, "variant_options": dict(options), **shape_for_target(
        target_params, variant=name, variant_options=options, **kwargs)} for name, options in variants]
    key = "params_total" if kwargs.get("count", "total") == "total" else "params_non_embedding"
    counts = [s[key] for s in shapes]
    if max(counts) > 1.02 * min(counts):
        raise ValueError(f"variants at target {target_params:g} are not matched within 2%: {counts}")
    return shapes


def model_fields(shape: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of a `shape_for_target` result."""
    return {k: shape[k] for k in SHAPE_FIELDS}
