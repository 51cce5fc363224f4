"""Post-install fix-ups the project needs on a CPU machine; run by `make install`.

torchaudio's newest wheel on the registry is linked against CUDA. Importing it with the CPU build of
torch fails while loading its compiled extension from `torchaudio/lib/`. The pure-Python transforms
(MelSpectrogram, AmplitudeToDB) that the project uses need none of it, so on a CPU torch we remove
the compiled files, after which `import torchaudio` and its transforms work. Audio is read with
`soundfile`, never with `torchaudio.load` (which needs torchcodec and FFmpeg).

Idempotent: does nothing when torchaudio already imports.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys


def torchaudio_imports() -> tuple[bool, str]:
    probe = "import torchaudio, torchaudio.transforms as T, torch; T.MelSpectrogram()(torch.zeros(400))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return result.returncode == 0, result.stderr.strip().splitlines()[-1:] and result.stderr.strip().splitlines()[-1] or ""


def fix_torchaudio() -> None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        print("postinstall: torchaudio is not installed; nothing to fix")
        return
    ok, err = torchaudio_imports()
    if ok:
        print("postinstall: torchaudio imports; nothing to fix")
        return
    import torch

    if torch.version.cuda is not None:
        sys.exit(f"postinstall: torchaudio fails to import with a CUDA torch ({err}); reinstall matching versions")
    lib = pathlib.Path(spec.origin).parent / "lib"
    removed = [p for p in lib.glob("*.so")]
    for path in removed:
        path.unlink()
    ok, err = torchaudio_imports()
    if not ok:
        sys.exit(f"postinstall: torchaudio still fails after removing {len(removed)} compiled files: {err}")
    print(f"postinstall: removed {len(removed)} CUDA-linked files from {lib}; torchaudio transforms work on CPU")


if __name__ == "__main__":
    fix_torchaudio()
