"""Is kuramoto's cost against softmax forced by its width? fwd+bwd at the WikiText-2 preset shape
(B 64, T 50, D 128, H 4), one thread, interleaved rounds, median of per-round ratios to fused softmax:
the default kuramoto (phase_dim M = D: 2M/H = 64 features per head), kuramoto with M = D/2 (32
features per head, the softmax head width) and fused SDPA itself at head width 64.

    PYTHONPATH=. python tools/kuramoto_width.py [ROUNDS]
"""
import statistics
import sys

import torch
import torch.nn.functional as F

from workers.bench import Case, attention_op, interleaved_times

torch.set_num_threads(1)
B, T, D, H = 64, 50, 128, 4
fns = {c.label: attention_op(c, B, T, D, H, "cpu") for c in
       [Case("softmax", "softmax"), Case("kuramoto M=D", "kuramoto"), Case("kuramoto M=D/2", "kuramoto", {"phase_dim": D // 2})]}
q, k, v = (torch.randn(B, H, T, 2 * D // H, requires_grad=True) for _ in range(3))
upstream = torch.randn(B, H, T, 2 * D // H)


def sdpa_width_64():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.autograd.grad(out, (q, k, v), upstream)


fns["SDPA at head width 64"] = sdpa_width_64
times = interleaved_times(fns, repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 30, warmup=3, device="cpu")
for label, ts in times.items():
    ratio = statistics.median(a / b for a, b in zip(ts, times["softmax"]))
    print(f"{label:<24} {1e3 * statistics.median(ts):8.2f} ms   {ratio:.2f}x fused softmax")
