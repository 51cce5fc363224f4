"""Subject-verb agreement (paper A): the generator, the JSONL format, and the fixed vocabulary.

Templates: "the N V ." (40%) and "the N P the N2 V ." (60%); label 1 = the verb agrees with the
subject (50%); in PP sentences the distractor N2 has the subject's number half the time. Kinds:
simple (no PP), easy (PP, distractor agrees), hard (PP, distractor disagrees: ~30% of the data).

`generate(n, seed)` draws from `random.Random(seed)` in the paper's order, so with the paper's
sizes and seeds (train 40k / val 4k / test 4k; seeds 0 / 1 / 2) it reproduces the shipped JSONL
files byte for byte (`to_jsonl`). Records are encoded as BOS tokens EOS, padded to 9 with PAD;
the classifier reads the verb at `verb_idx + 1`.
"""

from __future__ import annotations

import json
import random
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

NOUNS_SG = ("key book cat dog child box plant lamp table chair map cup bag ball coin door bird fish tree car "
            "star ring shoe hat pen rock leaf wall flag seed duck fox frog mouse horse goat wolf bear deer owl "
            "ant bee fly crab boat ship tank van bus jet").split()
NOUNS_PL = ("keys books cats dogs children boxes plants lamps tables chairs maps cups bags balls coins doors "
            "birds fish trees cars stars rings shoes hats pens rocks leaves walls flags seeds ducks foxes frogs "
            "mice horses goats wolves bears deer owls ants bees flies crabs boats ships tanks vans buses jets").split()
VERBS_SG = ("is has was sits runs falls works stands flies swims waits plays stays eats sleeps moves looks grows "
            "lives walks rests talks stops drops rolls spins hops digs pulls bites").split()
VERBS_PL = ("are have were sit run fall work stand fly swim wait play stay eat sleep move look grow live walk "
            "rest talk stop drop roll spin hop dig pull bite").split()
PREPS = "on under near beside above with by".split()

SPECIALS = ["<PAD>", "<BOS>", "<EOS>", "<UNK>"]
PAD, BOS, EOS, UNK = 0, 1, 2, 3
VOCAB = SPECIALS + sorted(set(["the", *NOUNS_SG, *NOUNS_PL, *VERBS_SG, *VERBS_PL, *PREPS, "."]))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
WIDTH = 9  # BOS + the longest template (7 tokens) + EOS

SIMPLE, EASY, HARD = 0, 1, 2
KINDS = {SIMPLE: "simple", EASY: "easy", HARD: "hard"}
PAPER_SIZES = {"train": 40_000, "val": 4_000, "test": 4_000}
PAPER_SEEDS = {"train": 0, "val": 1, "test": 2}
# sha256 of the paper's shipped sva_{train,val,test}.jsonl, which `generate` reproduces with the paper
# sizes and seeds (checked by the tests): the generator's source identity equals a local copy's.
PAPER_SHA256 = {
    "train": "7e4737780ebd790d4599f81cf47094301e29e7f9af66fc52f2ca69664ae0048a",
    "val": "9dbf27b0a562b316775544bad07a2fc92d27fcc07ad2b1fe86946ae601dcd2b8",
    "test": "4b15bdf4650faa25569b4d324617defb6f7f9887c80f1daa8cb0cfa0745c1883",
}


def _sentence(rng: random.Random) -> dict[str, Any]:
    with_pp = rng.random() < 0.60
    singular = rng.random() < 0.50
    subject = rng.choice(NOUNS_SG if singular else NOUNS_PL)
    agrees = rng.random() < 0.50
    verbs = VERBS_SG if singular == agrees else VERBS_PL
    verb = rng.choice(verbs)
    if not with_pp:
        return {"tokens": ["the", subject, verb, "."], "label": int(agrees), "subject_idx": 1, "verb_idx": 2,
                "distractor_idx": None, "has_distractor": False, "distractor_agrees": None}
    prep = rng.choice(PREPS)
    distractor_agrees = rng.random() < 0.50
    same_number = NOUNS_SG if singular else NOUNS_PL
    other_number = NOUNS_PL if singular else NOUNS_SG
    distractor = rng.choice(same_number if distractor_agrees else other_number)
    return {"tokens": ["the", subject, prep, "the", distractor, verb, "."], "label": int(agrees), "subject_idx": 1,
            "verb_idx": 5, "distractor_idx": 4, "has_distractor": True, "distractor_agrees": distractor_agrees}


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]


def to_jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                _ = record["tokens"], record["label"], record["verb_idx"], record["has_distractor"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not an SVA record ({error}); expected keys tokens, label, "
                                 f"verb_idx, has_distractor, distractor_agrees (paper A JSONL)") from error
            records.append(record)
    return records


def kind_of(record: dict[str, Any]) -> int:
    if not record["has_distractor"]:
        return SIMPLE
    return EASY if record["distractor_agrees"] else HARD


def encode(records: list[dict[str, Any]]) -> tuple[pa.Table, int]:
    """(table with tokens (N, 9) uint8, label, verb_pos, kind; number of UNK tokens)."""
    n = len(records)
    tokens = np.full((n, WIDTH), PAD, dtype=np.uint8)
    label = np.zeros(n, dtype=np.int8)
    verb_pos = np.zeros(n, dtype=np.int8)
    kind = np.zeros(n, dtype=np.int8)
    unknown = 0
    for i, record in enumerate(records):
        ids = [BOS, *(WORD_ID.get(w, UNK) for w in record["tokens"]), EOS]
        if len(ids) > WIDTH:
            raise ValueError(f"SVA record {i} has {len(record['tokens'])} tokens; the templates have at most 7")
        unknown += sum(1 for w in record["tokens"] if w not in WORD_ID)
        tokens[i, : len(ids)] = ids
        label[i] = int(record["label"])
        verb_pos[i] = int(record["verb_idx"]) + 1  # +1: BOS
        kind[i] = kind_of(record)
    flat = pa.array(tokens.reshape(-1))
    table = pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(flat, WIDTH),
        "label": pa.array(label),
        "verb_pos": pa.array(verb_pos),
        "kind": pa.array(kind),
    })
    return table, unknown
