"""The options each attention variant takes in a study file, with their defaults (no torch).

`studies.spec` validates study files against these tables without importing torch; the variant
classes under `workers/attention/` take their `DEFAULTS` from them, so the two never disagree.
"""

from __future__ import annotations

from typing import Any

SOFTMAX: dict[str, Any] = {}

OSCILLATOR: dict[str, Any] = {
    "d_osc": 2,
    "p": 1.0,  # readout exponent; 1 in the paper's headline results (and the only linear-time case)
    "anchor_norm": "init",  # init (as the reference code) | always
    "readout_padding_mask": True,  # False reproduces the reference code
    "mode": "analytic",  # analytic (closed-form fixed point) | euler | rk45 (verification)
    "init": "random",  # ODE starts: random (uniform on the sphere) | sequential
    "t_max": 30.0,  # ODE horizon
    "dt": 0.05,  # Euler step
    "rtol": 1e-4,  # RK45 tolerances
    "atol": 1e-4,
    "jitter": 0.05,  # std of the sequential starts' noise
}

KURAMOTO: dict[str, Any] = {
    "phase_dim": None,  # M phase coordinates; None: d_model
    "gate": "softplus",  # softplus | none
    "gate_per": "coordinate",  # coordinate | head
    "phase_drift": "rope",  # rope | none: rotary position as a phase drift in the score
    "rope_base": 10000.0,
    "score_scale": "sqrt",  # sqrt (1/sqrt(2P), SDPA's default) | none
    "kappa_init": 1.0,  # learned per-coordinate coupling, initial value
    "steps": 1,  # Kuramoto steps per layer
    "readout": "phase",  # phase: W_out [cos theta', sin theta'] | delta: W_out delta
}

# Options each variant accepts in a study file, with their defaults.
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {"softmax": SOFTMAX, "oscillator": OSCILLATOR, "kuramoto": KURAMOTO}

# Variants whose cells multiply by the study's d_osc list.
USES_D_OSC = frozenset({"oscillator"})
