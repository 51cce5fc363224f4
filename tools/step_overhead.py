"""How much of a training step is fixed per-step overhead, and so what stacking seeds can gain.

Times a training step (forward, backward, AdamW) of the quickstart's model (d_model 64, 2 layers,
2 heads, 23 tokens) at one thread for growing batch sizes. The time of a batch of 4 is almost all
fixed cost (dispatch, optimizer, small-kernel overhead); what a batch adds above it is the work
that grows with data. A pack of S seeds at batch B does S times that work once and pays the fixed
cost once, so its best possible speed-up over S solo steps is S * t(B) / (t(4) + S * (t(B) - t(4))),
and less when S times larger activations leave the caches (compare t(S*B) with S * t(B)).

    python tools/step_overhead.py [--seeds 3] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.configs import ModelConfig  # noqa: E402
from workers.model import Transformer  # noqa: E402


def step_ms(attention: str, options: dict, batch: int, reps: int = 20) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, dropout=0.0, positions="sinusoidal",
                      vocab_size=40, max_seq_len=32, attention=attention, attention_options=options)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 40, (batch, 23))

    def step():
        loss = model(x).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    S, B = args.seeds, args.batch
    for attention, options in (("softmax", {}), ("oscillator", {"d_osc": 4})):
        fixed, one, many = step_ms(attention, options, 4), step_ms(attention, options, B), step_ms(attention, options, S * B)
        ceiling = S * one / (fixed + S * (one - fixed))
        print(f"{attention:<10} step at batch 4 {fixed:6.1f} ms, at {B} {one:6.1f} ms, at {S * B} {many:6.1f} ms; "
              f"fixed share at {B}: {fixed / one:.0%}; pack of {S} at best {ceiling:.2f}x, "
              f"as one batch of {S * B}: {S * one / many:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
