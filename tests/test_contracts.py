"""Contract tests, run once per registered attention variant (Optuna's StorageTestCase is the model).

Every variant -- at its defaults and at each of its registry `examples` -- must be causal through
gradients, ignore padding keys, be bit-for-bit deterministic, be sized within 2% of a target by
`workers.sizing` (the count being that of the built model), count its FLOPs as torch's flop counter
does, and learn a tiny task. A toy variant (tests/toy_variant.py, one file) is registered from a
fixture with one line and runs the whole suite: the proof that a variant is one file plus one
registry line.

Legend: B batch, T sequence, D model width, H heads, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from workers.variants import VARIANTS, Variant, get_variant, register, unregister

B, T, D, H = 2, 7, 16, 2
TOY = "toy"


def _cases() -> list[tuple[str, dict]]:
    out = []
    for name, variant in VARIANTS.items():
        base = {"d_osc": 4} if variant.uses_d_osc else {}
        out += [(name, base)] + [(name, dict(example)) for example in variant.examples]
    return out + [(TOY, {})]


CASES = _cases()
IDS = [f"{name}" + "".join(f"-{k}{v}" for k, v in options.items()) for name, options in CASES]


@pytest.fixture
def variant(request):
    """The case's variant name and options; the toy is registered for the test (one line) and removed after."""
    name, options = request.param
    if name == TOY:
        register(Variant(TOY, "toy_variant:ToyConfig", "toy_variant:ToyAttention", bench="toy_variant:bench_op"))
    try:
        yield name, options
    finally:
        if name == TOY:
            unregister(TOY)


def cases(**kwargs):
    return pytest.mark.parametrize("variant", CASES, ids=IDS, indirect=True, **kwargs)


def make(variant, causal: bool = True, rotary: bool = False):
    name, options = variant
    torch.manual_seed(0)
    return get_variant(name).build(d_model=D, n_heads=H, max_seq_len=T, causal=causal, rotary=rotary, **options).double()


def model_config(variant, backbone: str = "a", **fields):
    from workers.model import ModelConfig

    name, options = variant
    base = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, max_seq_len=16,
                positions="sinusoidal" if backbone == "a" else "none")
    return ModelConfig(**{**base, **fields}, attention=name, attention_options=options, backbone=backbone)


# ---- the contract -----------------------------------------------------------------------------


@cases()
@pytest.mark.parametrize("rotary", [False, True])
def test_causal_through_gradients(variant, rotary):
    module = make(variant, rotary=rotary)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    out = module(x)
    for t in range(T):
        (grad,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1:] == 0), f"output {t} depends on a later input"
        assert grad[:, : t + 1].abs().sum() > 0


@cases()
@pytest.mark.parametrize("causal", [True, False])
def test_padding_keys_change_nothing(variant, causal):
    module = make(variant, causal=causal)
    x = torch.randn(B, T, D, dtype=torch.float64)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[:, 5:] = True
    pad[0, 2] = True  # a padding key in the middle too
    out = module(x, pad)
    x_other = x.clone()
    x_other[pad] = torch.randn(int(pad.sum()), D, dtype=torch.float64) * 10
    keep = ~pad
    torch.testing.assert_close(out[keep], module(x_other, pad)[keep], rtol=0, atol=1e-12)


@cases()
def test_same_seed_bit_identical_outputs_and_gradients(variant):
    def run():
        module = make(variant).float()
        torch.manual_seed(1)
        x = torch.randn(B, T, D, requires_grad=True)
        out = module(x)
        out.square().sum().backward()
        return out.detach(), x.grad, [p.grad for p in module.parameters()]

    out1, gx1, gp1 = run()
    out2, gx2, gp2 = run()
    assert torch.equal(out1, out2) and torch.equal(gx1, gx2)
    assert all(torch.equal(a, b) for a, b in zip(gp1, gp2))


@cases()
def test_sized_within_two_percent_with_the_built_models_count(variant):
    from workers.model import ModelConfig, Transformer
    from workers.sizing import model_fields, shape_for_target

    name, options = variant
    target = 2e5
    shape = shape_for_target(target, variant=name, variant_options=options, vocab_size=64, seq_len=64, backbone="a")
    assert abs(shape["params_total"] - target) <= 0.02 * target, shape
    cfg = ModelConfig(vocab_size=64, max_seq_len=64, attention=name, attention_options=options, dropout=0.0,
                      **model_fields(shape))
    with torch.device("meta"):
        built = Transformer(cfg)
    assert built.param_counts() == (shape["params_total"], shape["params_non_embedding"])


def measured_flops_per_token(model, seq_len: int) -> float:
    tokens = torch.randint(0, model.cfg.vocab_size, (2, seq_len))
    # the math SDPA backend decomposes into matmuls the counter sees (it has no formula for CPU flash);
    # the compiled attention kernels are invisible to it: their PyTorch paths compute the same function
    from workers.attention import native

    with sdpa_kernel(SDPBackend.MATH), native.pytorch_only(), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(tokens)
    return counter.get_total_flops() / (2 * seq_len)


@cases()
@pytest.mark.parametrize("backbone,seq_len,causal", [("a", 16, True), ("a", 64, True), ("a", 200, False), ("b", 64, True)])
def test_flops_per_token_match_torch_flop_counter(variant, backbone, seq_len, causal):
    """Within 10% (exact for these shapes); T = 200 bidirectional runs the oscillator's linear readout.
    Not compared: causal T > 128, where the oscillator skips key blocks above the diagonal but the
    formula counts the full context, as for softmax (see `Transformer.flops_per_token`)."""
    from workers.model import Transformer

    model = Transformer(model_config(variant, backbone, max_seq_len=seq_len, causal=causal))
    formula, measured = model.flops_per_token(seq_len), measured_flops_per_token(model, seq_len)
    assert abs(formula - measured) <= 0.10 * measured, (formula, measured)


@cases()
def test_learns_a_tiny_task(variant, one_thread):
    """Predict the previous token: needs attention to one (relative) position; chance = ln 8."""
    from workers.model import Transformer

    torch.manual_seed(0)
    V, T_ = 8, 8
    model = Transformer(model_config(variant, vocab_size=V, max_seq_len=T_))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        tokens = torch.randint(0, V, (32, T_))
        logits = model(tokens)[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, :-1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.25 * math.log(V), loss.item()


@cases()
def test_benchmark_case_runs_forward_and_backward(variant):
    from workers.bench import Case, attention_op

    name, options = variant
    attention_op(Case(name, name, options), 2, 8, 16, 2, "cpu")()


# ---- the registry, seen from outside ------------------------------------------------------------


def test_a_registered_variant_is_known_to_the_schema_the_planner_and_the_bench(tmp_path):
    """One registry line makes a variant valid in a study file (its options checked by its config),
    planned with its option defaults, and benchmarked."""
    from conftest import tiny_study_dict
    from studies.plan import expand
    from studies.spec import StudyError, parse_study
    from workers.bench import default_cases

    register(Variant(TOY, "toy_variant:ToyConfig", "toy_variant:ToyAttention", bench="toy_variant:bench_op"))
    try:
        study = parse_study(tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": TOY}]))
        toy = [t for t in expand(study, build=False) if t.variant == TOY]
        assert toy and toy[0].variant_options == {"sharpness": 2.0}
        assert TOY in [c.label for c in default_cases()]
        with pytest.raises(StudyError, match=r"variants\[1\]: variant toy: sharpness=-1.0 must be > 0"):
            parse_study(tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": TOY, "options": {"sharpness": -1}}]))
        with pytest.raises(StudyError, match=r"unknown option\(s\) \['sharp'\]; allowed: \['sharpness'\]; did you mean 'sharpness'"):
            parse_study(tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": TOY, "options": {"sharp": 1}}]))
    finally:
        unregister(TOY)
    assert TOY not in VARIANTS


def test_law_choices_everywhere_come_from_the_law_registry():
    """The study schema, the CLI and the HTTP API list exactly the registered laws and methods."""
    import typing

    from scaling import cli, server
    from scaling.laws import LAW_NAMES, LAWS, METHODS
    from studies import spec

    assert typing.get_args(spec.LawName) == LAW_NAMES == typing.get_args(server.Law)
    assert typing.get_args(server.Method) == METHODS
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("fits", "predict", "compare"):
        law = next(a for a in sub.choices[command]._actions if a.dest == "law")
        method = next(a for a in sub.choices[command]._actions if a.dest == "method")
        assert tuple(law.choices) == LAW_NAMES and tuple(method.choices) == METHODS
    assert all(law.default_method is None or law.default_method in law.methods for law in LAWS.values())


def test_a_law_is_fitted_from_its_registry_entry_alone(tmp_path, monkeypatch):
    """scaling.api runs every registered law's `jobs` for every (task, variant), and nothing else:
    a law registered with one `Law(...)` entry is fitted with no edit to the API."""
    from conftest import write_synthetic_study
    from scaling import api
    from scaling.laws import LAWS, Law

    study = api.open_study(str(write_synthetic_study(tmp_path / "s", ds=(2, 4, 8), seeds=(0, 1, 2))))
    scopes = []

    def toy_jobs(scope):
        scopes.append(scope)
        if scope.variant != scope.baseline:
            yield lambda: f"{scope.common['task']}/{scope.variant}/d{max(d for d in scope.d_values if d)}"

    monkeypatch.setitem(LAWS, "toy_law", Law("toy_law", "d_osc", "d_osc", "gap", ("loglog-means",), None, "-",
                                             "a test law", toy_jobs))
    found = api._all_fits(study, n_boot=10, ci_level=0.9, params_field="params_non_embedding", seed=0)
    assert [(s.common["task"], s.variant, s.has_baseline) for s in scopes] == [("lm", "oscillator", True),
                                                                             ("lm", "softmax", True)]
    assert "lm/oscillator/d8" in found
    assert {f.law for f in found if not isinstance(f, str)} == {"gap_vs_dosc"}  # one size: no law in N applies
    monkeypatch.delitem(LAWS, "gap_vs_dosc")
    assert api._all_fits(study, n_boot=10, ci_level=0.9, params_field="params_non_embedding", seed=0) == [
        "lm/oscillator/d8"]
