"""Make the train / valid / test files of the wikitext2_law study from the real WikiText-2 text.

The shared copy of WikiText-2 (../shared/data/wikitext2) holds only valid.txt and test.txt
(~460k tokens after paper A's tokenisation). They are joined (valid, then test) and cut at article
titles (lines " = Title = "): the last 8 articles (~25k tokens) validate, the 10 before them
(~21k tokens) test, and the first 104 articles (~415k tokens) train. Deterministic; run from the
repository root:

    python docs/results/wikitext2_law/make_split.py
"""

from __future__ import annotations

import pathlib
import re
import sys

SOURCE = pathlib.Path("../shared/data/wikitext2")
OUT = pathlib.Path("docs/results/wikitext2_law/data")
TITLE = re.compile(r"^ = [^=].* = $")  # an article title; " = = Section = = " headings are not
VAL_ARTICLES, TEST_ARTICLES = 8, 10


def articles(lines: list[str]) -> list[list[str]]:
    starts = [i for i, line in enumerate(lines) if TITLE.match(line)]
    head = lines[: starts[0]]  # blank lines before the first title stay with it
    cut = [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]
    cut[0] = head + cut[0]
    return cut


def main() -> int:
    missing = [n for n in ("valid.txt", "test.txt") if not (SOURCE / n).exists()]
    if missing:
        print(f"{SOURCE} lacks {missing}: run from the repository root with ../shared beside it", file=sys.stderr)
        return 2
    lines: list[str] = []
    for name in ("valid.txt", "test.txt"):
        lines += (SOURCE / name).read_text(encoding="utf-8").rstrip("\n").split("\n")
    parts = articles(lines)
    train = parts[: -(VAL_ARTICLES + TEST_ARTICLES)]
    test = parts[-(VAL_ARTICLES + TEST_ARTICLES) : -VAL_ARTICLES]
    val = parts[-VAL_ARTICLES:]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.txt", train), ("valid.txt", val), ("test.txt", test)):
        (OUT / name).write_text("\n".join(line for article in split for line in article) + "\n", encoding="utf-8")
        print(f"{OUT / name}: {len(split)} articles, {sum(len(a) for a in split)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
