"""Integration: the real tasks on the real samples in ../shared/data (skipped when absent), sliced to
a few hundred kB where the whole sample would take more than a second or two."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import tiny_spec
from storage.cache import DatasetCache, fingerprint
from storage.prep import sva as sva_prep
from storage.prep.text import BOS, EOS, PAD
from workers import run_trial
from workers.tasks import get_task

ENWIK6_SHA256 = "369b688978f649681136198fb96db14c1616756260c55fb4b65e9bc049552cad"  # enwik8[:1_000_000]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_DIGEST_MEMO", str(tmp_path / "digests.json"))


@pytest.fixture
def data(shared_dir):
    root = shared_dir / "data"
    if not root.exists():
        pytest.skip(f"{root} not present; the real-sample integration tests need ../shared/data")
    return root


@pytest.fixture
def cache(tmp_path):
    return DatasetCache(str(tmp_path / "cache"))


def head(src, dst, start: int, size: int):
    """Bytes [start, start + size) of a text file, cut to whole lines, written to dst."""
    data = src.read_bytes()[start : start + size]
    dst.write_bytes(data[data.index(b"\n") + 1 if start else 0 : data.rindex(b"\n") + 1])
    return dst


def decode(row, vocab):
    return [vocab[i] for i in row if i != PAD]


def test_sva_shipped_files_are_the_generators(data, cache):
    task = get_task("sva")
    for split in ("train", "val", "test"):
        digest = hashlib.sha256((data / "sva" / f"sva_{split}.jsonl").read_bytes()).hexdigest()
        assert digest == sva_prep.PAPER_SHA256[split]
    local = task.options({"data_dir": str(data / "sva")})
    assert fingerprint(task.identity(local)) == fingerprint(task.identity(task.options({})))
    prepared = task.prepare(local, cache)
    splits = prepared.meta["splits"]
    assert [splits[s]["examples"] for s in ("train", "val", "test")] == [40_000, 4_000, 4_000]
    assert [splits[s]["hard"] for s in ("train", "val", "test")] == [11_970, 1_153, 1_150]  # SOURCE.md
    assert int(prepared.arrays["train"]["label"].sum()) == 20_113 and splits["train"]["unk"] == 0
    first = json.loads((data / "sva" / "sva_train.jsonl").open().readline())
    row = prepared.arrays["train"]["tokens"][0]
    assert [sva_prep.VOCAB[i] for i in row if i != PAD] == ["<BOS>", *first["tokens"], "<EOS>"]
    assert prepared.arrays["train"]["verb_pos"][0] == first["verb_idx"] + 1


def test_wikitext2_tokenised_files(data, tmp_path, cache):
    src = data / "wikitext2"
    wt2 = tmp_path / "wt2"
    wt2.mkdir()
    head(src / "valid.txt", wt2 / "wiki.train.tokens", 0, 300_000)
    head(src / "test.txt", wt2 / "wiki.valid.tokens", 0, 100_000)
    head(src / "test.txt", wt2 / "wiki.test.tokens", 100_000, 100_000)
    task = get_task("wikitext2")
    options = {"data_dir": str(wt2)}
    prepared = task.prepare(options, cache)
    vocab = task.entry(options, cache)["vocab"].column("token").to_pylist()
    assert vocab[:4] == ["<PAD>", "<BOS>", "<EOS>", "<UNK>"] and len(vocab) == prepared.meta["vocab_size"] <= 10_000
    assert "<unk>" in vocab  # the tokenised variant's own rare-word token is an ordinary word here
    train = prepared.arrays["train"]["tokens"]
    assert train.shape[1] == 50 and (train[:, 0] == BOS).all()
    assert ((train == EOS).sum(1) == 1).all() and (train[:-1, -1] == EOS).all()
    # the first chunk is the first 48 tokens of the first article
    assert decode(train[0], vocab)[:8] == ["<BOS>", "=", "homarus", "gammarus", "=", "homarus", "gammarus", ","]
    val = prepared.arrays["val"]["tokens"]
    assert decode(val[0], vocab)[:4] == ["<BOS>", "=", "robert", "<unk>"]
    assert 0 < prepared.meta["splits"]["val"]["unk"] < prepared.meta["splits"]["val"]["tokens"]


def test_tinystories_endoftext_sample(data, cache):
    path = data / "tinystories" / "tinystories_v2_train_sample.txt"
    task = get_task("tinystories")
    prepared = task.prepare({"train_file": str(path), "val_file": str(path)}, cache)
    assert prepared.meta["splits"]["train"]["stories"] == 5  # SOURCE.md: 5 stories
    vocab = task.entry({"train_file": str(path), "val_file": str(path)}, cache)["vocab"].column("token").to_pylist()
    first = decode(prepared.arrays["train"]["tokens"][0], vocab)
    assert first[:8] == ["<bos>", "once", "upon", "a", "time", "there", "was", "a"]


def test_tinystories_blank_line_head(data, cache):
    path = data / "tinystories" / "tinystories_val_head.txt"
    task = get_task("tinystories")
    with pytest.raises(ValueError, match="set the task option `separator`"):
        task.prepare({"train_file": str(path), "val_fraction": 0.05, "max_bytes": 300_000}, cache)
    options = {"train_file": str(path), "separator": "\n\n", "val_fraction": 0.05, "max_bytes": 300_000}
    prepared = task.prepare(options, cache)
    vocab = task.entry(options, cache)["vocab"].column("token").to_pylist()
    assert decode(prepared.arrays["train"]["tokens"][0], vocab)[:7] == ["<bos>", "spot", "spot", "saw", "the", "shiny", "car"]
    n_train, n_val = prepared.meta["splits"]["train"]["stories"], prepared.meta["splits"]["val"]["stories"]
    assert 0.02 < n_val / (n_train + n_val) < 0.08
    assert task.model_fields(prepared)["max_seq_len"] == 127


def test_enwik8_head_slice(data, cache):
    task = get_task("enwik8")
    prepared = task.prepare({"data_file": str(data / "enwik8" / "enwik8_head4M")}, cache)
    assert prepared.meta["splits"] == {"train": {"bytes": 3_600_000, "start": 0}, "val": {"bytes": 200_000, "start": 3_600_000},
                                       "test": {"bytes": 200_000, "start": 3_800_000}}
    assert prepared.meta["proportional"] is True
    entry = task.entry({"data_file": str(data / "enwik8" / "enwik8_head4M")}, cache)
    train = np.asarray(entry["train"].column("bytes"))
    assert hashlib.sha256(train[:1_000_000].tobytes()).hexdigest() == ENWIK6_SHA256
    assert bytes(train[:10]) == b"<mediawiki"
    assert prepared.arrays["val"]["windows"].shape == ((200_000 - 1) // 256, 257)


def test_kws_synthetic_speech_commands(data, cache):
    task = get_task("kws")
    prepared = task.prepare({"data_dir": str(data / "kws")}, cache)
    splits = prepared.meta["splits"]
    assert [splits[s]["clips"] for s in ("train", "val", "test")] == [480, 60, 60]
    assert set(splits["val"]["per_word"].values()) == {6} and set(splits["train"]["per_word"].values()) == {48}
    assert prepared.arrays["train"]["features"].shape == (480, 49, 40)
    assert np.isfinite(prepared.arrays["test"]["features"]).all()
    listed = sorted(line.strip() for line in (data / "kws" / "validation_list.txt").open() if line.strip())
    labels = prepared.arrays["val"]["label"]
    words = prepared.meta["words"]
    assert sorted(f"{words[label]}/" for label in labels) == sorted(p.split("/")[0] + "/" for p in listed)


def test_a_short_kws_trial_on_the_shared_set(data, tmp_path):
    train = {**tiny_spec().train, "steps": 30, "eval_every": 15, "batch_size": 32, "eval_batch_size": 64, "lr": 3e-3}
    spec = tiny_spec(task="kws", task_options={"data_dir": str(data / "kws")}, train=train)
    record = run_trial(spec, storage_uri=str(tmp_path / "s"), cache_uri=str(tmp_path / "c"))
    assert record.status == "completed", record.error
    assert record.metric_name == "val_accuracy" and record.metric_value > 0.1  # above chance on 10 words
