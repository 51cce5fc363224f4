"""Which oscillator path is fastest at small d_osc: fwd+bwd of the mixing alone, the compiled kernel's
fused path against the PyTorch "dense" path (coupling Function, then the (T, T) readout Function) and
`_DenseOscillator` (the fused path without the kernel), each forced, next to fused softmax (SDPA).
One thread, interleaved rounds, median of per-round ratios to softmax (the machine is shared).

Shapes: the WikiText-2 preset (B 64, T 50, D 128, H 4) and the quickstart's model (B 64, D 64, H 2)
at T 16, 23, 32 (and any other T given).

    PYTHONPATH=. python tools/oscillator_paths.py [--rounds 30] [--d-osc 2 4 8] [--shapes 50:128:4 23:64:2 ...]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-osc", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="T:D:H each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tune_allocator()
    if native.load() is None:
        print("the compiled kernel is not available: nothing to compare")
        return 1
    for shape in args.shapes:
        T, D, H = (int(x) for x in shape.split(":"))
        times = interleaved_times(cases(args.batch, T, D, H, tuple(args.d_osc)), repeats=args.rounds, warmup=3,
                                  device="cpu")
        print(f"B {args.batch}, T {T}, D {D}, H {H}, {args.rounds} rounds: fwd+bwd, median ms and x fused softmax")
        for label, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(ts, times["softmax"]))
            line = f"  {label:<22} {1e3 * statistics.median(ts):7.2f} ms  {ratio:5.2f}x"
            if label.endswith("kernel"):
                dense = times[label.replace("kernel", "dense")]
                line += f"   kernel / dense {statistics.median(a / b for a, b in zip(ts, dense)):.2f}"
            print(line)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
