#!/bin/sh
# WikiText-2's train split is not in ../shared/data/wikitext2 (only valid.txt and test.txt), so the
# reduced run trains on valid.txt's first 3347 lines (articles 1-54, 998,699 bytes) and validates on
# the rest (lines 3348-3760, articles 55-60, 122,982 bytes); the cut is at an article title.
# Run from the repository root; the study's task identity hashes the file contents, so the same
# split re-creates the same cache entry.
set -e
src=../shared/data/wikitext2/valid.txt
out=docs/results/wikitext2_reduced/data
mkdir -p "$out"
head -n 3347 "$src" > "$out/train.txt"
tail -n +3348 "$src" > "$out/valid.txt"
