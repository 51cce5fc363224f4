"""Subject-verb agreement (paper A): does the verb agree with the subject?

Source: the project's generator (paper A templates; train 40k / val 4k / test 4k from seeds 0 / 1 / 2,
byte-identical to the paper's shipped files), or local JSONL files in the paper's format
(`data_dir` with sva_{train,val,test}.jsonl, or explicit `*_file` options).

Model: bidirectional, one logit read at the verb (`token` head, BOS shifts it by one); loss: binary
cross-entropy. Metrics: accuracy on all / simple (no PP) / easy (PP, distractor agrees) / hard (PP,
distractor disagrees); a model whose hard accuracy is below 85% has failed (paper A's criterion),
reported as `<split>_failed` = 1.0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.prep import sva
from storage.prep.sources import content_digest, local_split_files
from workers._lazy import F, no_grad, torch  # torch on first use: validating a study file imports this module
from workers.tasks.base import PreparedTask, Task

FILE_NAMES = {
    "train": ["sva_train.jsonl", "train.jsonl"],
    "val": ["sva_val.jsonl", "val.jsonl", "valid.jsonl"],
    "test": ["sva_test.jsonl", "test.jsonl"],
}
HARD_FAILURE_THRESHOLD = 0.85
GENERATOR = "paper_a_sva_v1"


def grouped_accuracy(correct: np.ndarray, kind: np.ndarray) -> dict[str, float]:
    """Accuracy on all examples and per kind (simple / easy / hard); NaN for an empty group."""
    out = {"all": float(correct.mean()) if len(correct) else float("nan")}
    for code, name in sva.KINDS.items():
        chosen = kind == code
        out[name] = float(correct[chosen].mean()) if chosen.any() else float("nan")
    return out


class SVA(Task):
    name = "sva"
    PREP_VERSION = 1
    metric = "val_accuracy"
    lower_is_better = False
    DEFAULTS: dict[str, Any] = {
        "data_dir": None,  # local JSONL files (names above); None: the generator
        "train_file": None,
        "val_file": None,
        "test_file": None,
        "train_examples": None,  # None: 40k / 4k / 4k from the generator, or every record of a file
        "val_examples": None,
        "test_examples": None,
        "generator_seeds": [0, 1, 2],  # train, val, test
    }

    def options(self, given):
        options = super().options(given)
        seeds = options["generator_seeds"]
        if not isinstance(seeds, (list, tuple)) or len(seeds) != 3 or not all(isinstance(x, int) for x in seeds):
            raise ValueError(f"sva: generator_seeds={seeds!r} must be three integers (train, val, test), e.g. [0, 1, 2]")
        for split in ("train", "val", "test"):
            n = options[f"{split}_examples"]
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ValueError(f"sva: {split}_examples={n!r} must be a positive integer or null (all / the paper's size)")
        return options

    def _local(self, options) -> dict[str, str] | None:
        explicit = {s: options[f"{s}_file"] for s in FILE_NAMES}
        return local_split_files(self.name, options["data_dir"], explicit, FILE_NAMES, required=("train", "val", "test"))

    def _sizes(self, options, local: bool) -> dict[str, int | None]:
        """Examples per split: as given; else every record of a file, or the paper's sizes."""
        return {s: options[f"{s}_examples"] if options[f"{s}_examples"] is not None or local else sva.PAPER_SIZES[s]
                for s in ("train", "val", "test")}

    def identity(self, options):
        files = self._local(options)
        paper_generator = list(options["generator_seeds"]) == [sva.PAPER_SEEDS[s] for s in ("train", "val", "test")]
        if files is not None:
            source: dict[str, Any] = {split: content_digest(path)["sha256"] for split, path in files.items()}
        elif paper_generator:  # the generator reproduces the paper's files: same identity as a local copy
            source = dict(sva.PAPER_SHA256)
        else:
            source = {"generator": GENERATOR, "seeds": list(options["generator_seeds"])}
        examples = {s: options[f"{s}_examples"] for s in ("train", "val", "test")}
        if files is None and not paper_generator:
            examples = self._sizes(options, local=False)
        return {"task": self.name, "prep": self.PREP_VERSION, "source": source, "params": {"examples": examples}}

    def build(self, options):
        files = self._local(options)
        sizes = self._sizes(options, files is not None)
        if files is None:
            seeds = dict(zip(("train", "val", "test"), options["generator_seeds"]))
            records = {s: sva.generate(sizes[s], seeds[s]) for s in sizes}
            where: dict[str, Any] = {"generator": GENERATOR, "seeds": seeds}
        else:
            records = {s: sva.read_jsonl(files[s], sizes[s]) for s in sizes}
            where = {"files": files}
        tables, stats = {}, {}
        for split, recs in records.items():
            table, unknown = sva.encode(recs)
            kinds = np.asarray(table.column("kind"))
            tables[split] = table
            stats[split] = {"examples": len(recs), "unk": unknown,
                            **{name: int((kinds == code).sum()) for code, name in sva.KINDS.items()}}
        meta = {"vocab_size": len(sva.VOCAB), "seq_len": sva.WIDTH, "splits": stats, "source": where,
                "source_bytes": sum(len(sva.to_jsonl(r)) for r in records.values())}
        return tables, meta

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        return {"vocab_size": int(prepared.meta["vocab_size"]), "max_seq_len": int(prepared.meta["seq_len"]),
                "head": "token", "num_classes": 1, "causal": False}

    def tokens_per_example(self, prepared: PreparedTask) -> int:
        return int(prepared.meta["seq_len"])

    def batch(self, split, index):
        tokens_BT = torch.from_numpy(split["tokens"][index].astype(np.int64))
        return self.placed({
            "tokens": tokens_BT,
            "key_padding": tokens_BT == sva.PAD,
            "verb_pos": torch.from_numpy(split["verb_pos"][index].astype(np.int64)),
            "labels": torch.from_numpy(split["label"][index].astype(np.float32)),
            "kind": torch.from_numpy(split["kind"][index].astype(np.int64)),
        })

    def model_inputs(self, batch):
        return (batch["tokens"],), {"key_padding_BT": batch["key_padding"], "positions_B": batch["verb_pos"]}

    def logits(self, model, batch) -> torch.Tensor:
        args, kwargs = self.model_inputs(batch)
        return model(*args, **kwargs).squeeze(-1)

    def loss_from_output(self, logits_B1, batch):
        return F.binary_cross_entropy_with_logits(logits_B1.squeeze(-1), batch["labels"])

    @no_grad
    def evaluate(self, model, split, batch_size, prefix):
        n = len(split["label"])
        correct, kinds, loss_sum = [], [], 0.0
        for start in range(0, n, batch_size):
            batch = self.batch(split, np.arange(start, min(start + batch_size, n)))
            logits_B = self.logits(model, batch)
            loss_sum += F.binary_cross_entropy_with_logits(logits_B, batch["labels"], reduction="sum").item()
            correct.append(((logits_B > 0).float() == batch["labels"]).cpu().numpy())
            kinds.append(batch["kind"].cpu().numpy())
        accuracy = grouped_accuracy(np.concatenate(correct), np.concatenate(kinds))
        metrics = {
            f"{prefix}_loss": loss_sum / max(n, 1),
            f"{prefix}_accuracy": accuracy["all"],
            **{f"{prefix}_accuracy_{name}": accuracy[name] for name in sva.KINDS.values()},
        }
        metrics[f"{prefix}_failed"] = float(self.failed(metrics, prefix))
        return metrics

    failure_rule = f"hard-example accuracy below {HARD_FAILURE_THRESHOLD:.0%} (paper A)"

    def failed(self, metrics, prefix="val"):
        hard = metrics.get(f"{prefix}_accuracy_hard", float("nan"))
        return not hard >= HARD_FAILURE_THRESHOLD  # NaN (no hard examples) cannot pass
