"""Which oscillator path is fastest at small d_osc: fwd+bwd of the mixing alone, the compiled kernel's
fused path against the PyTorch "dense" path (coupling Function, then the (T, T) readout Function) and
`_DenseOscillator` (the fused path without the kernel), each forced, next to fused softmax (SDPA).
One thread, interleaved rounds, median of per-round ratios to softmax (the machine is shared).

Shapes: the WikiText-2 preset (B 64, T 50, D 128, H 4) and the quickstart's model (B 64, D 64, H 2)
at T 16, 23, 32 (and any other T given).

`--steps`: whole training steps instead (forward, backward, AdamW; as tools/step_overhead.py), of the
quickstart's model (d_model 64, 2 layers, 2 heads, vocabulary 40, B 64, T 23) and, with `--preset`,
of the bench's WikiText-2 preset step (`workers.bench.training_step`, vocabulary 10,000), the
oscillator as it runs by default against the same model inside `native.pytorch_only()` (at d_osc <= 8
the two-Function dense path: what ran before small d_osc went to the kernel) and softmax.

    PYTHONPATH=. python tools/oscillator_paths.py [--rounds 30] [--d-osc 2 4 8] [--shapes 50:128:4 23:64:2 ...]
    PYTHONPATH=. python tools/oscillator_paths.py --steps [--preset] [--rounds 30] [--d-osc 2 4 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.attention import native, oscillator_attention  # noqa: E402
from workers.bench import interleaved_times  # noqa: E402
from workers.runtime import tune_allocator  # noqa: E402

DEFAULT_SHAPES = ("50:128:4", "16:64:2", "23:64:2", "32:64:2")  # T:D:H


def cases(B: int, T: int, D: int, H: int, d_osc: tuple[int, ...]) -> dict:
    K = D // H
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    q, k, v = leaf(B, H, T, K), leaf(B, H, T, K), leaf(B, H, T, K)
    upstream = torch.randn(B, H, T, K, generator=g)

    def softmax():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), upstream)

    fns = {"softmax": softmax}
    for d in d_osc:
        anchors = F.normalize(torch.randn(H, T, d, generator=g), dim=-1).requires_grad_()

        def run(path, pytorch=False, anchors=anchors):
            def fn():
                if pytorch:
                    with native.pytorch_only():
                        out, _ = oscillator_attention(q, k, v, anchors, causal=True, path=path)
                        torch.autograd.grad(out, (q, k, v, anchors), upstream)
                else:
                    out, _ = oscillator_attention(q, k, v, anchors, causal=True, path=path)
                    torch.autograd.grad(out, (q, k, v, anchors), upstream)
            return fn

        fns[f"d{d} dense"] = run("dense")
        fns[f"d{d} kernel"] = run("fused")
        fns[f"d{d} _DenseOscillator"] = run("fused", pytorch=True)
        fns[f"d{d} auto"] = run(None)
    return fns


def step_cases(d_osc: tuple[int, ...], preset: bool) -> dict:
    from workers.bench import Case, training_step
    from workers.configs import ModelConfig
    from workers.model import Transformer
    from workers.presets import paper_preset

    def quickstart(attention: str, options: dict):
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, dropout=0.0, positions="sinusoidal",
                          vocab_size=40, max_seq_len=32, attention=attention, attention_options=options)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 40, (64, 23), generator=torch.Generator().manual_seed(1))

        def step():
            loss = model(x).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def preset_step(attention: str, options: dict):
        model = paper_preset("wikitext2")["model"]
        shape = {k: model[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "positions")}
        return training_step(Case(attention, attention, options), 64, 50, shape, 10_000, "cpu")

    def pytorch(fn):
        def run():
            with native.pytorch_only():
                fn()
        return run

    groups = {"quickstart (B 64, T 23, D 64, H 2)": quickstart}
    if preset:
        groups["WikiText-2 preset (B 64, T 50, D 128, H 4)"] = preset_step
    out = {}
    for title, build in groups.items():
        fns = {"softmax": build("softmax", {})}
        for d in d_osc:
            fns[f"d{d} default"] = build("oscillator", {"d_osc": d})
            fns[f"d{d} pytorch_only"] = pytorch(build("oscillator", {"d_osc": d}))
        out[title] = fns
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-osc", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="T:D:H each")
    parser.add_argument("--steps", action="store_true", help="whole training steps instead of the attention op")
    parser.add_argument("--preset", action="store_true", help="--steps: the WikiText-2 preset step too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tune_allocator()
    if native.load() is None:
        print("the compiled kernel is not available: nothing to compare")
        return 1
    if args.steps:
        for title, fns in step_cases(tuple(args.d_osc), args.preset).items():
            times = interleaved_times(fns, repeats=args.rounds, warmup=2, device="cpu")
            print(f"training step, {title}, {args.rounds} rounds: median ms, x softmax's time")
            _print_rows(times, "default", "pytorch_only")
        return 0
    for shape in args.shapes:
        T, D, H = (int(x) for x in shape.split(":"))
        times = interleaved_times(cases(args.batch, T, D, H, tuple(args.d_osc)), repeats=args.rounds, warmup=3,
                                  device="cpu")
        print(f"B {args.batch}, T {T}, D {D}, H {H}, {args.rounds} rounds: fwd+bwd, median ms and x fused softmax")
        _print_rows(times, "kernel", "dense")
    return 0


def _print_rows(times: dict[str, list[float]], new: str, old: str) -> None:
    """One line per case: median ms, the median paired ratio to softmax, and for a `new` case the
    median paired ratio to its `old` twin."""
    for label, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["softmax"]))
        line = f"  {label:<22} {1e3 * statistics.median(ts):8.2f} ms  {ratio:5.2f}x"
        if label.endswith(new):
            twin = times[label[: -len(new)] + old]
            line += f"   {new} / {old} {statistics.median(a / b for a, b in zip(ts, twin)):.2f}"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
