"""Entry point of a study submitted as a Ray Job: the study's text arrives in SCALING_STUDY_YAML."""

from __future__ import annotations

import os
import sys
import tempfile

from studies.remote import STUDY_ENV


def main(argv: list[str] | None = None) -> int:
    text = os.environ.get(STUDY_ENV)
    if not text:
        print(f"{STUDY_ENV} is not set: this module runs studies submitted with `scaling submit`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "study.yaml")
        with open(path, "w") as out:
            out.write(text)
        from scaling.cli import main as cli

        # progress on: not a terminal, so plain lines (per finished trial, per running trial) that
        # `scaling logs JOB --follow` shows
        return cli(["run", path, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
