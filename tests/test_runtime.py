"""workers.runtime: the allocator setting that keeps freed activations in the process."""

import ctypes.util
import os
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from workers.runtime import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
if len(sys.argv) > 2:  # the flag only: no allocation loop
    print(tuned, 0)
    raise SystemExit
def step():  # ten 2.5 MB activations (one attention fwd+bwd at the preset shape) and 64 MB logits, all freed
    xs = [torch.ones(640_000) for _ in range(10)] + [torch.ones(16_000_000)]
    del xs
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, flag_only: bool = False, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *(["flag"] if flag_only else [])], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.bench  # counts page faults: allocator behaviour, not a deterministic contract
@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_tuned_allocator_stops_refaulting_freed_memory():
    tuned, tuned_faults = faults("tuned")
    default_, default_faults = faults("default")
    assert tuned == "True" and default_ == "False"
    # by default a block past glibc's 32 MB mmap ceiling is unmapped on free and faulted in again every
    # step (the 2.5 MB ones only when nothing else sits above them at the heap top: not deterministic)
    assert default_faults > 10 * max(tuned_faults, 100), (default_faults, tuned_faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_tuned_by_default_on_glibc():
    assert faults("tuned", flag_only=True)[0] == "True"


def test_switch_off_with_environment():
    tuned, _ = faults("tuned", flag_only=True, SCALING_MALLOC_TUNING="0")
    assert tuned == "False"
