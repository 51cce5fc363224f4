"""The six real tasks on tiny data written in each source's real format (no network, no ../shared):
paper A tokenisation and chunking checked by hand, byte splits, SVA generator and encoding, log-mel
features, metrics on hand-computed examples, offline errors, source fingerprints, the cache CLI,
and one short trial per task through run_trial."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import time
import urllib.request
import zipfile

import numpy as np
import pytest
import torch

from conftest import tiny_spec
from storage.cache import DatasetCache, fingerprint
from storage.prep import bytestream, sva as sva_prep, text
from storage.prep.sources import SourceUnavailable, iter_documents
from workers import run_trial
from workers.trial import BatchOrder, resolve_train
from workers.tasks import TASKS, get_task
from workers.tasks.base import IGNORE, bits_per_unit, perplexity
from workers.tasks.lm import eval_windows
from workers.tasks.sva import grouped_accuracy

REAL_TASKS = ("kws", "sva", "wikitext2", "tinystories", "enwik8", "codeparrot")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_DIGEST_MEMO", str(tmp_path / "digests.json"))
    monkeypatch.setenv("SCALING_DOWNLOADS", str(tmp_path / "downloads"))


@pytest.fixture
def cache(tmp_path):
    return DatasetCache(str(tmp_path / "cache"))


class Uniform(torch.nn.Module):
    """A model that predicts the uniform distribution: perplexity = V, bits per byte = log2 V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens_BT, key_padding_BT=None, positions_B=None):
        return torch.zeros(*tokens_BT.shape[:2], self.vocab)


# ---- source files in the real formats ---------------------------------------------------------------


def write_wikitext(root):
    """The tokenised v1 layout: leading spaces, ' ' separator lines, headings, ' @-@ ', '<unk>'."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wiki.train.tokens").write_text(" \n = Valkyria = \n \n The game 's art , by Hino , began in 2010 . \n")
    (root / "wiki.valid.tokens").write_text(" \n = Valkyria = \n")
    (root / "wiki.test.tokens").write_text(" the end \n")
    return root


def write_tinystories(path, stories):
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def write_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_speech_commands(root, rate=16_000):
    """Two words as pure tones in the Speech Commands v0.02 layout: 4 train speakers, 1 val, 1 test;
    plus a clip at 8 kHz, a 0.5 s clip and a stereo clip (resampled / padded / averaged)."""
    import soundfile

    tones = {"yes": 440.0, "no": 1500.0}
    t = np.arange(rate) / rate
    speakers = ["aaaa0001", "aaaa0002", "aaaa0003", "aaaa0004", "bbbb0001", "cccc0001"]
    for word, freq in tones.items():
        (root / word).mkdir(parents=True, exist_ok=True)
        for k, speaker in enumerate(speakers):
            wave = 0.3 * np.sin(2 * np.pi * freq * t + k)
            soundfile.write(root / word / f"{speaker}_nohash_0.wav", wave, rate, subtype="PCM_16")
        t8 = np.arange(8000) / 8000
        soundfile.write(root / word / "dddd0001_nohash_0.wav", 0.3 * np.sin(2 * np.pi * freq * t8), 8000, subtype="PCM_16")
        soundfile.write(root / word / "dddd0002_nohash_0.wav", 0.3 * np.sin(2 * np.pi * freq * t[:8000]), rate, subtype="PCM_16")
        stereo = np.stack([0.3 * np.sin(2 * np.pi * freq * t), 0.1 * np.sin(2 * np.pi * freq * t)], axis=1)
        soundfile.write(root / word / "dddd0003_nohash_0.wav", stereo, rate, subtype="PCM_16")
    (root / "_background_noise_").mkdir(exist_ok=True)
    soundfile.write(root / "_background_noise_" / "white_noise.wav", np.zeros(rate), rate, subtype="PCM_16")
    (root / "validation_list.txt").write_text("no/bbbb0001_nohash_0.wav\nyes/bbbb0001_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/cccc0001_nohash_0.wav\nyes/cccc0001_nohash_0.wav\n")
    return root


# ---- registry and options ----------------------------------------------------------------------------


def test_all_tasks_are_registered_with_complete_defaults():
    assert set(REAL_TASKS) | {"mqar"} == set(TASKS)
    for name in REAL_TASKS:
        task = get_task(name)
        assert task.name == name and task.DEFAULTS
        assert task.metric.startswith("val_")
        with pytest.raises(ValueError, match="allowed"):
            task.options({"no_such_option": 1})
    assert get_task("enwik8").metric == "val_bpc" and get_task("codeparrot").metric == "val_bpb"
    assert get_task("wikitext2").metric == get_task("tinystories").metric == "val_ppl"
    assert not get_task("kws").lower_is_better and not get_task("sva").lower_is_better


# ---- paper A tokenisation, by hand -------------------------------------------------------------------


def test_wikitext_tokens_split_punctuation_and_lowercase():
    assert text.wikitext_tokens(" = Homarus gammarus = \n") == ["=", "homarus", "gammarus", "="]
    assert text.wikitext_tokens('It\'s (big), "ok"! 3 @,@ 000') == [
        "it", "'", "s", "(", "big", ")", ",", '"', "ok", '"', "!", "3", "@", ",", "@", "000"]


def test_tinystories_tokens_turn_punctuation_into_spaces():
    assert text.tinystories_tokens("Tom's cat, \u201cWow!\u201d said-he.") == ["tom", "s", "cat", "\u201cwow", "\u201d", "said", "he"]


def test_vocab_keeps_the_most_frequent_then_first_seen():
    vocab = text.build_vocab(["b a", "c a", "b d"], str.split, 6, text.WT2_SPECIALS)
    assert vocab == ["<PAD>", "<BOS>", "<EOS>", "<UNK>", "b", "a"]  # b and a twice; b seen first
    with pytest.raises(ValueError, match="special"):
        text.build_vocab(["a"], str.split, 4, text.WT2_SPECIALS)


def test_bookend_chunks_match_paper_a():
    ids = np.arange(10, 20, dtype=np.uint16)  # 10 tokens, pieces of 4
    chunks = text.bookend_chunks(ids, seq_len=6)
    assert chunks.tolist() == [[1, 10, 11, 12, 13, 2], [1, 14, 15, 16, 17, 2], [1, 18, 19, 2, 0, 0]]
    assert text.bookend_chunks(ids[:9], seq_len=6).shape[0] == 2  # a one-token tail is dropped


def test_wikitext2_builds_the_hand_computed_chunks(tmp_path, cache):
    task = get_task("wikitext2")
    prepared = task.prepare({"data_dir": str(write_wikitext(tmp_path / "wt2")), "vocab_size": 8, "seq_len": 6}, cache)
    entry = task.entry({"data_dir": str(tmp_path / "wt2"), "vocab_size": 8, "seq_len": 6}, cache)
    assert entry["vocab"].column("token").to_pylist() == ["<PAD>", "<BOS>", "<EOS>", "<UNK>", "=", ",", "valkyria", "the"]
    # train: = valkyria = the game ' s art , by hino , began in 2010 .
    assert prepared.arrays["train"]["tokens"].tolist() == [
        [1, 4, 6, 4, 7, 2], [1, 3, 3, 3, 3, 2], [1, 5, 3, 3, 5, 2], [1, 3, 3, 3, 3, 2]]
    assert prepared.arrays["val"]["tokens"].tolist() == [[1, 4, 6, 4, 2, 0]]
    assert prepared.arrays["test"]["tokens"].tolist() == [[1, 7, 3, 2, 0, 0]]
    assert prepared.arrays["train"]["tokens"].dtype == np.uint16
    assert task.model_fields(prepared) == {"vocab_size": 8, "max_seq_len": 5, "head": "lm", "causal": True}
    assert task.tokens_per_example(prepared) == 5
    batch = task.batch(prepared.arrays["val"], np.array([0]))
    assert batch["input_ids"].tolist() == [[1, 4, 6, 4, 2]]
    assert batch["labels"].tolist() == [[4, 6, 4, 2, IGNORE]]  # PAD target not scored; EOS is


def test_tinystories_stories_and_chunks(tmp_path, cache):
    train = write_tinystories(tmp_path / "train.txt", ["Once upon a time, Tom's cat sat.", "The dog ran!"])
    val = write_tinystories(tmp_path / "valid.txt", ["Once the cat ran.\nThe end."])
    options = {"train_file": str(train), "val_file": str(val), "vocab_size": 10, "seq_len": 6, "min_chunk_tokens": 5}
    task = get_task("tinystories")
    prepared = task.prepare(options, cache)
    vocab = task.entry(options, cache)["vocab"].column("token").to_pylist()
    assert vocab == ["<pad>", "<bos>", "<eos>", "<unk>", "once", "upon", "a", "time", "tom", "s"]
    # story 1: BOS once upon a time tom s cat sat EOS -> [1 4 5 6 7 8] + [9 3 3 2] (4 tokens: dropped)
    # story 2: BOS the dog ran EOS -> [1 3 3 3 2] (5 tokens: kept)
    assert prepared.arrays["train"]["tokens"].tolist() == [[1, 4, 5, 6, 7, 8], [1, 3, 3, 3, 2, 0]]
    # val: BOS once the cat ran the end EOS -> [1 4 3 3 3 3] + [3 2] (dropped)
    assert prepared.arrays["val"]["tokens"].tolist() == [[1, 4, 3, 3, 3, 3]]
    assert "test" not in prepared.arrays  # TinyStories has no test split
    assert task.model_fields(prepared)["vocab_size"] == 10


def write_authors_eval(root, vocab_words, chunks):
    """Paper A's data/tinystories_eval/ in its real format: torch.save of {"vocab", "idx2word"},
    and a protocol-4 pickle of lists of token ids."""
    import pickle

    import torch

    root.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(vocab_words)}
    torch.save({"vocab": vocab, "idx2word": {i: w for w, i in vocab.items()}}, root / "vocab.pt")
    with open(root / "val_chunks.pkl", "wb") as handle:
        pickle.dump(chunks, handle, protocol=4)
    return root


def test_tinystories_authors_eval_dir_supplies_vocabulary_and_validation(tmp_path, cache):
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "the", "cat", "dog", "ran"]
    shipped = [[1, 4, 5, 7, 2], [1, 4, 6, 7, 4, 5, 2]]
    authors = write_authors_eval(tmp_path / "tinystories_eval", words, shipped)
    train = write_tinystories(tmp_path / "train.txt", ["The cat ran to the dog.", "Once upon a time."])
    task = get_task("tinystories")
    options = {"train_file": str(train), "authors_eval_dir": str(authors), "seq_len": 8}
    prepared = task.prepare(options, cache)
    assert task.entry(options, cache)["vocab"].column("token").to_pylist() == words  # theirs, in id order
    assert prepared.arrays["val"]["tokens"].tolist() == [c + [0] * (8 - len(c)) for c in shipped]
    # the train split is tokenised with their vocabulary: the cat ran to the dog -> ids, "to" unknown
    assert prepared.arrays["train"]["tokens"].tolist()[0] == [1, 4, 5, 7, 3, 4, 6, 2]
    assert task.model_fields(prepared)["vocab_size"] == len(words)
    with pytest.raises(ValueError, match="seq_len >= 7"):
        task.prepare({**options, "seq_len": 6}, cache)
    with pytest.raises(ValueError, match="lacks \\['val_chunks.pkl'\\]"):
        (authors / "val_chunks.pkl").unlink()
        task.options(options)


def test_tinystories_authors_eval_refuses_a_pickle_that_runs_code(tmp_path, cache):
    import os
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    authors = write_authors_eval(tmp_path / "ev", ["<pad>", "<bos>", "<eos>", "<unk>", "a"], [[1, 4, 2]])
    (authors / "val_chunks.pkl").write_bytes(pickle.dumps([Boom()]))
    train = write_tinystories(tmp_path / "train.txt", ["a a a a a a."])
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        get_task("tinystories").prepare({"train_file": str(train), "authors_eval_dir": str(authors)}, cache)


def test_iter_documents_streams_across_chunk_boundaries(tmp_path):
    stories = [f"story {i} " + "x" * (i * 7 % 23) for i in range(200)]
    path = write_tinystories(tmp_path / "s.txt", stories)
    got = [d.strip() for d in iter_documents(str(path), "<|endoftext|>", chunk_chars=17)]  # separators cut in two
    assert got == [s.strip() for s in stories]


def test_tinystories_without_its_separator_says_which_option_to_set(tmp_path, cache):
    path = tmp_path / "blank_lines.txt"
    path.write_text("\n\n".join(f"Once upon a time there was story number {i}." for i in range(4000)))
    with pytest.raises(ValueError, match="separator"):
        get_task("tinystories").prepare({"train_file": str(path), "val_fraction": 0.1}, cache)
    prepared = get_task("tinystories").prepare({"train_file": str(path), "val_fraction": 0.1, "separator": "\n\n"}, cache)
    n_train, n_val = (len(prepared.arrays[s]["tokens"]) for s in ("train", "val"))
    assert n_train + n_val == 4000 and 250 < n_val < 550  # ~10% held out, by a hash of each story


# ---- byte streams ------------------------------------------------------------------------------------


def test_enwik8_split_is_standard_or_proportional():
    assert bytestream.proportional_split(100_000_000, bytestream.ENWIK8_SPLIT) == [
        (0, 90_000_000), (90_000_000, 95_000_000), (95_000_000, 100_000_000)]
    assert bytestream.proportional_split(4_000_000, bytestream.ENWIK8_SPLIT) == [
        (0, 3_600_000), (3_600_000, 3_800_000), (3_800_000, 4_000_000)]
    assert bytestream.proportional_split(1001, [9000, 500, 500]) == [(0, 901), (901, 951), (951, 1001)]
    assert bytestream.proportional_split(1001, [90, 5, 5]) == [(0, 90), (90, 95), (95, 100)]  # sizes that fit: as given


def test_enwik8_from_raw_or_zip(tmp_path, cache):
    data = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.write(tmp_path / "enwik8", "enwik8")
    task = get_task("enwik8")
    raw = task.prepare({"data_file": str(tmp_path / "enwik8"), "seq_len": 16}, cache)
    zipped = task.prepare({"data_file": str(tmp_path / "enwik8.zip"), "seq_len": 16}, cache)
    stream = lambda p, s: bytes(np.concatenate([p.arrays[s]["windows"][0], p.arrays[s]["windows"][1:, 1:].ravel()]))
    for prepared in (raw, zipped):
        assert stream(prepared, "val") == data[18_000 : 18_000 + 1 + len(prepared.arrays["val"]["windows"]) * 16]
        assert bytes(prepared.arrays["train"]["windows"][5]) == data[5:22]  # a window at every offset
        assert prepared.arrays["train"]["windows"].shape == (18_000 - 16, 17)
    assert task.model_fields(raw) == {"vocab_size": 256, "max_seq_len": 16, "head": "lm", "causal": True}
    head = task.prepare({"data_file": str(tmp_path / "enwik8"), "max_bytes": 2000, "seq_len": 16}, cache)
    assert head.meta["splits"]["train"]["bytes"] == 1800 and head.fingerprint != raw.fingerprint
    # seq_len is a read-time view: the same cache entry serves every context length
    assert task.prepare({"data_file": str(tmp_path / "enwik8"), "seq_len": 64}, cache).fingerprint == raw.fingerprint


def test_eval_windows_score_each_byte_once():
    stream = np.arange(103, dtype=np.uint8)
    windows = eval_windows(stream, 10)
    assert windows.shape == (10, 11)
    targets = np.concatenate([w[1:] for w in windows])
    np.testing.assert_array_equal(targets, stream[1:101])
    assert eval_windows(stream, 10, max_tokens=30).shape == (3, 11)


def test_codeparrot_assigns_whole_documents_by_content(tmp_path, cache):
    files = {f"pkg/mod_{i:03d}.py": f"def f{i}():\n    return {i * i}\n".encode() * (1 + i % 5) for i in range(300)}
    files["pkg/blob.py"] = b"\x00\x01binary"
    files["pkg/notes.txt"] = b"not python"
    files["pkg/latin1.py"] = "caf\xe9".encode("latin-1")
    write_tree(tmp_path / "a", files)
    task = get_task("codeparrot")
    options = {"data_dir": str(tmp_path / "a"), "split_bytes": [800, 100, 100], "seq_len": 8}
    prepared = task.prepare(options, cache)
    entry = task.entry(options, cache)
    docs = {s: [bytes(d) for d in bytes(np.asarray(entry[s].column("bytes"))).split(b"\0") if d] for s in ("train", "val", "test")}
    python = {v for k, v in files.items() if k.endswith(".py") and k not in ("pkg/blob.py", "pkg/latin1.py")}
    assert entry.meta["skipped_binary"] == 2  # NUL bytes, not UTF-8; notes.txt is not a .py
    for split, budget in zip(("train", "val", "test"), (800, 100, 100)):
        assert len(np.asarray(entry[split].column("bytes"))) <= budget
        assert all(d in python for d in docs[split][:-1])  # only the last document may be cut at the budget
    assert not set(docs["train"][:-1]) & set(docs["val"][:-1])
    assert prepared.arrays["train"]["windows"].shape[1] == 9
    # the assignment follows the content, not the file names or order
    renamed = {f"other/{999 - i:03d}_x.py": v for i, (k, v) in enumerate(sorted(files.items())) if k.endswith(".py")}
    write_tree(tmp_path / "b", renamed)  # other names, reversed order
    again = task.entry({**options, "data_dir": str(tmp_path / "b"), "split_bytes": [10**6, 10**6, 10**6]}, cache)
    full = task.entry({**options, "split_bytes": [10**6, 10**6, 10**6]}, cache)
    for split in ("train", "val", "test"):
        a = set(bytes(np.asarray(full[split].column("bytes"))).split(b"\0")) - {b""}
        b = set(bytes(np.asarray(again[split].column("bytes"))).split(b"\0")) - {b""}
        assert a == b
    assert sum(len(set(bytes(np.asarray(full[s].column("bytes"))).split(b"\0")) - {b""}) for s in ("train", "val", "test")) == len(python)


def test_codeparrot_on_a_standard_library_package(cache):
    root = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    options = {"data_dir": root, "split_bytes": [200_000, 20_000, 20_000], "seq_len": 64}
    prepared = get_task("codeparrot").prepare(options, cache)
    splits = prepared.meta["splits"]
    assert splits["train"]["bytes"] == 200_000  # 29 files, 378 kB: train fills its budget
    assert all(0 < splits[s]["bytes"] <= 20_000 and splits[s]["documents"] > 0 for s in ("val", "test"))
    assert prepared.arrays["val"]["windows"].shape[1] == 65


# ---- SVA ---------------------------------------------------------------------------------------------


def test_sva_generator_reproduces_paper_a_files():
    for split in ("val", "test", "train"):
        records = sva_prep.generate(sva_prep.PAPER_SIZES[split], sva_prep.PAPER_SEEDS[split])
        assert hashlib.sha256(sva_prep.to_jsonl(records).encode()).hexdigest() == sva_prep.PAPER_SHA256[split]
    val = sva_prep.generate(4000, 1)
    assert sum(r["label"] for r in val) == 2049 and sum(r["has_distractor"] for r in val) == 2334
    assert sum(sva_prep.kind_of(r) == sva_prep.HARD for r in val) == 1153  # the paper's val file
    assert len(sva_prep.VOCAB) == 169


def test_sva_encoding_and_local_files(tmp_path, cache):
    records = [
        {"tokens": ["the", "cat", "sits", "."], "label": 1, "subject_idx": 1, "verb_idx": 2, "distractor_idx": None,
         "has_distractor": False, "distractor_agrees": None},
        {"tokens": ["the", "cats", "near", "the", "dog", "sits", "."], "label": 0, "subject_idx": 1, "verb_idx": 5,
         "distractor_idx": 4, "has_distractor": True, "distractor_agrees": False},
        {"tokens": ["the", "zebra", "sits", "."], "label": 1, "subject_idx": 1, "verb_idx": 2, "distractor_idx": None,
         "has_distractor": False, "distractor_agrees": None},
    ]
    table, unknown = sva_prep.encode(records)
    w = sva_prep.WORD_ID
    assert table.column("tokens").to_pylist()[1] == [1, w["the"], w["cats"], w["near"], w["the"], w["dog"], w["sits"], w["."], 2]
    assert table.column("tokens").to_pylist()[0] == [1, w["the"], w["cat"], w["sits"], w["."], 2, 0, 0, 0]
    assert table.column("verb_pos").to_pylist() == [3, 6, 3] and table.column("kind").to_pylist() == [0, 2, 0]
    assert unknown == 1  # "zebra" -> UNK
    for split in ("train", "val", "test"):
        (tmp_path / f"sva_{split}.jsonl").write_text(sva_prep.to_jsonl(records))
    prepared = get_task("sva").prepare({"data_dir": str(tmp_path)}, cache)
    assert prepared.arrays["val"]["tokens"].shape == (3, 9)
    batch = get_task("sva").batch(prepared.arrays["val"], np.array([0, 1]))
    assert batch["key_padding"][0].tolist() == [False] * 6 + [True] * 3
    assert batch["verb_pos"].tolist() == [3, 6] and batch["labels"].dtype == torch.float32
    assert get_task("sva").model_fields(prepared) == {"vocab_size": 169, "max_seq_len": 9, "head": "token",
                                                      "num_classes": 1, "causal": False}


def test_sva_generator_and_a_copy_of_its_files_share_a_fingerprint(tmp_path):
    task = get_task("sva")
    for split in ("train", "val", "test"):
        records = sva_prep.generate(sva_prep.PAPER_SIZES[split], sva_prep.PAPER_SEEDS[split])
        (tmp_path / f"sva_{split}.jsonl").write_text(sva_prep.to_jsonl(records))
    generated = fingerprint(task.identity(task.options({})))
    assert fingerprint(task.identity(task.options({"data_dir": str(tmp_path)}))) == generated
    assert fingerprint(task.identity(task.options({"generator_seeds": [0, 1, 3]}))) != generated
    assert fingerprint(task.identity(task.options({"train_examples": 1000}))) != generated


# ---- KWS ---------------------------------------------------------------------------------------------


def test_kws_features_from_a_speech_commands_layout(tmp_path, cache):
    import soundfile
    import torchaudio.transforms as T

    root = write_speech_commands(tmp_path / "sc")
    task = get_task("kws")
    options = {"data_dir": str(root), "words": ["yes", "no"]}
    prepared = task.prepare(options, cache)
    meta = prepared.meta
    assert {s: meta["splits"][s]["clips"] for s in ("train", "val", "test")} == {"train": 14, "val": 2, "test": 2}
    train = prepared.arrays["train"]["features"]
    assert train.shape == (14, 49, 40) and train.dtype == np.float32
    flat = train.reshape(-1, 40).astype(np.float64)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0, ddof=1)[np.array(meta["std"]) > 1e-5], 1, atol=1e-3)
    # one clip against torchaudio applied directly (paper A's per-clip recipe)
    wave, rate = soundfile.read(root / "no" / "bbbb0001_nohash_0.wav", dtype="float32")
    reference = T.AmplitudeToDB()(T.MelSpectrogram(16000, n_fft=512, win_length=400, hop_length=320, n_mels=40)(
        torch.from_numpy(wave)[None])).squeeze(0).T[:49].numpy()
    expected = (reference - np.array(meta["mean"])) / np.array(meta["std"])
    assert prepared.arrays["val"]["label"].tolist() == [0, 1]  # yes, no: the validation list's clips
    np.testing.assert_allclose(prepared.arrays["val"]["features"][1], expected, rtol=1e-4, atol=1e-3)
    assert task.model_fields(prepared) == {"vocab_size": 0, "input_dim": 40, "max_seq_len": 49, "head": "classify",
                                           "num_classes": 2, "causal": False}
    batch = task.batch(prepared.arrays["train"], np.array([0, 3]))
    assert batch["features"].shape == (2, 49, 40) and batch["labels"].dtype == torch.int64
    few = task.prepare({**options, "max_clips_per_word": 2}, cache)
    assert few.meta["splits"]["train"]["per_word"] == {"yes": 2, "no": 2} and few.fingerprint != prepared.fingerprint


# ---- metrics, by hand ----------------------------------------------------------------------------------


def test_metric_formulas():
    assert perplexity(3 * math.log(5), 3) == pytest.approx(5.0)
    assert bits_per_unit(10 * 8 * math.log(2), 10) == pytest.approx(8.0)
    accuracy = grouped_accuracy(np.array([1, 0, 1, 1, 0, 1.0]), np.array([0, 0, 1, 2, 2, 2]))
    assert accuracy == pytest.approx({"all": 4 / 6, "simple": 0.5, "easy": 1.0, "hard": 2 / 3})


def test_perplexity_ignores_pad(tmp_path, cache):
    task = get_task("wikitext2")
    prepared = task.prepare({"data_dir": str(write_wikitext(tmp_path / "wt2")), "vocab_size": 8, "seq_len": 6}, cache)
    metrics = task.evaluate(Uniform(8), prepared.arrays["val"], 4, "val")
    assert metrics["val_ppl"] == pytest.approx(8.0) and metrics["val_tokens"] == 4  # 4 of 5 targets: 1 PAD

    class Knows(torch.nn.Module):  # p(target) = 1/2 at every scored position, uniform elsewhere
        def forward(self, tokens_BT, key_padding_BT=None, positions_B=None):
            logits = torch.zeros(*tokens_BT.shape, 8)
            targets = torch.tensor([[4, 6, 4, 2, 0]])
            logits.scatter_(2, targets[..., None], math.log(7.0))  # 7 / (7 + 7) = 1/2
            return logits

    assert task.evaluate(Knows(), prepared.arrays["val"], 4, "val")["val_ppl"] == pytest.approx(2.0)


def test_bits_per_character_of_a_uniform_model(tmp_path, cache):
    (tmp_path / "enwik8").write_bytes(bytes(range(256)) * 40)
    task = get_task("enwik8")
    prepared = task.prepare({"data_file": str(tmp_path / "enwik8"), "seq_len": 16}, cache)
    metrics = task.evaluate(Uniform(256), prepared.arrays["val"], 7, "val")
    assert metrics["val_bpc"] == pytest.approx(8.0) and metrics["val_ppl"] == pytest.approx(256.0)
    assert metrics["val_tokens"] == len(prepared.arrays["val"]["windows"]) * 16


def test_sva_accuracy_splits_and_failure(tmp_path, cache):
    task = get_task("sva")
    prepared = task.prepare({"train_examples": 50, "val_examples": 400, "test_examples": 50}, cache)
    val = prepared.arrays["val"]

    class Oracle(torch.nn.Module):  # right on every example except the first `wrong` hard ones
        def __init__(self, wrong):
            super().__init__()
            hard = np.flatnonzero(val["kind"] == 2)[:wrong]
            self.sign = torch.ones(len(val["label"]))
            self.sign[torch.from_numpy(hard)] = -1
            self.seen = 0

        def forward(self, tokens_BT, key_padding_BT=None, positions_B=None):
            B = tokens_BT.shape[0]
            labels = torch.from_numpy(val["label"][self.seen : self.seen + B].astype(np.float32))
            sign = self.sign[self.seen : self.seen + B]
            self.seen += B
            return ((labels * 2 - 1) * sign)[:, None]

    n_hard = int((val["kind"] == 2).sum())
    wrong = math.ceil(0.2 * n_hard)
    metrics = task.evaluate(Oracle(wrong), val, 64, "val")
    assert metrics["val_accuracy_simple"] == 1.0 and metrics["val_accuracy_easy"] == 1.0
    assert metrics["val_accuracy_hard"] == pytest.approx(1 - wrong / n_hard)
    assert metrics["val_accuracy"] == pytest.approx(1 - wrong / 400)
    assert metrics["val_failed"] == 1.0 and task.failed(metrics)
    assert task.evaluate(Oracle(0), val, 64, "val")["val_failed"] == 0.0
    assert not task.failed({"val_accuracy_hard": 0.85}) and task.failed({"val_accuracy_hard": 0.8499})


# ---- offline sources, missing paths, fingerprints of local sources ----------------------------------------


@pytest.mark.parametrize("name, option", [("wikitext2", "data_dir"), ("tinystories", "train_file"),
                                          ("enwik8", "data_file"), ("codeparrot", "data_dir"), ("kws", "data_dir")])
def test_offline_without_local_source_names_the_option(name, option, cache, monkeypatch):
    pytest.importorskip("datasets")  # imported up front: its import time is not the hub call's
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache.root) + "-hf")  # an empty HF cache: nothing downloaded before

    def no_network(*args, **kwargs):
        raise AssertionError("an offline build touched the network")

    def no_retry(seconds):
        raise AssertionError(f"an offline build waited {seconds} s to retry an unreachable hub")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(time, "sleep", no_retry)  # a retry loop sleeps between attempts: none may run
    with pytest.raises(SourceUnavailable) as error:
        get_task(name).prepare({}, cache)
    message = str(error.value)
    assert f"`{option}`" in message and "offline" in message and f"scaling cache build {name} --option {option}=" in message
    assert cache.entries() == []


def test_scaling_offline_alone_stops_before_the_hub(cache, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SCALING_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was called"))
    with pytest.raises(SourceUnavailable, match="offline: SCALING_OFFLINE=1"):
        get_task("wikitext2").prepare({}, cache)


# ---- the online code paths, served locally -------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from in-memory datasets shaped like the hub's."""
    import datasets

    from storage.prep.sources import OFFLINE_VARS

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    served, calls = {}, []

    def load_dataset(path, name=None, split=None, revision=None, streaming=False, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "revision": revision, "streaming": streaming})
        if path not in served:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub")
        return served[path] if split is None else served[path][split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return datasets, served, calls


def test_wikitext2_from_the_hub_matches_local_files(tmp_path, cache, fake_hub):
    datasets, served, calls = fake_hub
    local = write_wikitext(tmp_path / "wt2")
    rows = {split: [line + "\n" for line in (local / f"wiki.{name}.tokens").read_text().splitlines()]
            for split, name in (("train", "train"), ("validation", "valid"), ("test", "test"))}
    served["Salesforce/wikitext"] = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()})
    task = get_task("wikitext2")
    hub = task.prepare({"vocab_size": 8, "seq_len": 6, "hf_revision": "abc123"}, cache)
    files = task.prepare({"data_dir": str(local), "vocab_size": 8, "seq_len": 6}, cache)
    assert calls == [{"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": None, "revision": "abc123",
                      "streaming": False}]
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(hub.arrays[split]["tokens"], files.arrays[split]["tokens"])
    assert hub.fingerprint != files.fingerprint  # different source identities
    assert task.prepare({"vocab_size": 8, "seq_len": 6, "hf_revision": "abc123"}, cache).fingerprint == hub.fingerprint
    assert len(calls) == 1  # the second prepare opened the cache: no hub call


def test_tinystories_from_the_hub_matches_local_files(tmp_path, cache, fake_hub):
    datasets, served, _ = fake_hub
    stories = ["Once upon a time, Tom's cat sat.", "The dog ran!", "", "A big red ball."]
    served["roneneldan/TinyStories"] = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": stories}), "validation": datasets.Dataset.from_dict({"text": stories[:2]})})
    write_tinystories(tmp_path / "train.txt", [s for s in stories if s])
    write_tinystories(tmp_path / "valid.txt", stories[:2])
    options = {"vocab_size": 10, "seq_len": 6}
    hub = get_task("tinystories").prepare(options, cache)
    files = get_task("tinystories").prepare({**options, "train_file": str(tmp_path / "train.txt"),
                                             "val_file": str(tmp_path / "valid.txt")}, cache)
    for split in ("train", "val"):
        np.testing.assert_array_equal(hub.arrays[split]["tokens"], files.arrays[split]["tokens"])


def test_codeparrot_streams_from_the_hub_like_a_local_tree(tmp_path, cache, fake_hub):
    datasets, served, calls = fake_hub
    files = {f"m{i:03d}.py": f"x = {i}\nprint(x * {i})\n".encode() * (1 + i % 3) for i in range(120)}
    write_tree(tmp_path / "tree", files)
    rows = [{"content": files[k].decode(), "repo_name": "r", "path": k} for k in sorted(files)]
    served["codeparrot/codeparrot-clean"] = {"train": datasets.IterableDataset.from_generator(lambda: iter(rows))}
    budgets = {"split_bytes": [10**6, 10**6, 10**6], "seq_len": 8}
    hub = get_task("codeparrot").entry(budgets, cache)
    local = get_task("codeparrot").entry({**budgets, "data_dir": str(tmp_path / "tree")}, cache)
    assert calls[0]["streaming"] is True and calls[0]["split"] == "train"
    for split in ("train", "val", "test"):
        assert np.asarray(hub[split].column("bytes")).tobytes() == np.asarray(local[split].column("bytes")).tobytes()


def test_enwik8_download_once_then_offline(tmp_path, cache, monkeypatch):
    from storage.prep.sources import OFFLINE_VARS

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    data = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as archive:
        archive.write(tmp_path / "enwik8", "enwik8")
    url = (tmp_path / "src.zip").as_uri()  # urllib serves file:// like http://
    prepared = get_task("enwik8").prepare({"url": url, "seq_len": 16}, cache)
    assert (tmp_path / "downloads" / "src.zip").exists()
    assert bytes(prepared.arrays["train"]["windows"][0]) == data[:17]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline now: the downloaded archive still serves
    again = get_task("enwik8").prepare({"url": url, "seq_len": 16}, DatasetCache(str(tmp_path / "fresh")))
    assert again.fingerprint == prepared.fingerprint


def test_kws_from_the_official_archive_layout(tmp_path, cache, monkeypatch):
    import tarfile

    from storage.prep.sources import OFFLINE_VARS

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    root = write_speech_commands(tmp_path / "sc")
    with tarfile.open(tmp_path / "speech_commands_v0.02.tar.gz", "w:gz") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname="./" + str(path.relative_to(root)), recursive=False)
    url = (tmp_path / "speech_commands_v0.02.tar.gz").as_uri()
    online = get_task("kws").prepare({"url": url, "words": ["yes", "no"]}, cache)
    local = get_task("kws").prepare({"data_dir": str(root), "words": ["yes", "no"]}, cache)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(online.arrays[split]["features"], local.arrays[split]["features"])
    unpacked = next((tmp_path / "downloads").glob("speech_commands-*"))
    assert sorted(p.name for p in unpacked.iterdir()) == ["no", "testing_list.txt", "validation_list.txt", "yes"]


def test_missing_local_paths_are_named(tmp_path, cache):
    with pytest.raises(SourceUnavailable, match=r"option `data_dir`='/no/such/dir': no such dir"):
        get_task("kws").prepare({"data_dir": "/no/such/dir"}, cache)
    (tmp_path / "wt2").mkdir()
    (tmp_path / "wt2" / "valid.txt").write_text(" a \n")
    with pytest.raises(SourceUnavailable, match="no train split .* set the task option `train_file`"):
        get_task("wikitext2").prepare({"data_dir": str(tmp_path / "wt2")}, cache)


def test_local_fingerprint_follows_content_not_path_or_mtime(tmp_path):
    task = get_task("wikitext2")
    first = fingerprint(task.identity(task.options({"data_dir": str(write_wikitext(tmp_path / "a"))})))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert fingerprint(task.identity(task.options({"data_dir": str(tmp_path / "b")}))) == first
    os.utime(tmp_path / "b" / "wiki.test.tokens", (1, 1))  # same bytes, other mtime
    assert fingerprint(task.identity(task.options({"data_dir": str(tmp_path / "b")}))) == first
    with open(tmp_path / "b" / "wiki.test.tokens", "a") as handle:
        handle.write(" one more line \n")
    assert fingerprint(task.identity(task.options({"data_dir": str(tmp_path / "b")}))) != first
    assert fingerprint(task.identity(task.options({"data_dir": str(tmp_path / "a"), "vocab_size": 9}))) != first


def test_a_worker_without_the_source_opens_the_drivers_entry(tmp_path, cache):
    task = get_task("wikitext2")
    source = write_wikitext(tmp_path / "wt2")
    options = {"data_dir": str(source), "vocab_size": 8, "seq_len": 6}
    built = task.prepare(options, cache)
    shutil.rmtree(source)  # the worker's node has no copy of the dataset
    opened = task.prepare(options, DatasetCache(cache.uri))
    assert opened.fingerprint == built.fingerprint
    np.testing.assert_array_equal(opened.arrays["train"]["tokens"], built.arrays["train"]["tokens"])
    with pytest.raises(SourceUnavailable, match="no such dir"):
        task.prepare(options, DatasetCache(str(tmp_path / "other-cache")))


# ---- the cache CLI with real tasks ---------------------------------------------------------------------


def test_cache_build_ls_verify_rebuild(tmp_path, capsys):
    from scaling.cli import main

    root = str(tmp_path / "cache")
    args = ["cache", "build", "sva", "--cache", root, "-o", "train_examples=300", "-o", "val_examples=100",
            "-o", "test_examples=100"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "built" in out and "train 300 rows" in out and "MB/s" in out
    assert main(args) == 0 and "already cached" in capsys.readouterr().out
    assert main(["cache", "ls", "--cache", root]) == 0 and "sva-" in capsys.readouterr().out
    entry = DatasetCache(root).entries()[0]
    damaged = tmp_path / "cache" / f"sva-{entry['fingerprint']}" / "train.arrow"
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert main(["cache", "verify", "--cache", root]) == 1
    assert main(["cache", "verify", "--cache", root, "--rebuild"]) == 0
    assert "rebuilt" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", root]) == 0
    assert main(["cache", "build", "nope", "--cache", root]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["cache", "build", "--list"]) == 0 and "max_clips_per_word" in capsys.readouterr().out


def test_cache_build_for_a_study(tmp_path, capsys):
    import yaml

    from conftest import tiny_study_dict
    from scaling.cli import main

    study = tiny_study_dict(tmp_path, tasks=[{"name": "sva", "options": {"train_examples": 100, "val_examples": 50,
                                                                         "test_examples": 50}}])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["cache", "build", "--study", str(tmp_path / "study.yaml")]) == 0
    assert "sva-" in capsys.readouterr().out
    assert [m["name"] for m in DatasetCache(study["cache"]).entries()] == ["sva"]


# ---- one short trial per task ----------------------------------------------------------------------------


def _tiny_text() -> tuple[list[str], list[str]]:
    """(WikiText lines, TinyStories stories): random draws from a 12-word vocabulary."""
    rng = np.random.default_rng(0)
    words = "the cat dog sat ran on a mat and big small red".split()
    lines = [" ".join(rng.choice(words, 20)) + " ." for _ in range(60)]
    return lines, [" ".join(rng.choice(words, 30)) for _ in range(60)]


def _tiny_wikitext2(tmp_path) -> dict:
    wt2 = tmp_path / "wt2"
    wt2.mkdir()
    for split in ("train", "valid", "test"):
        (wt2 / f"{split}.txt").write_text("".join(f" {line} \n" for line in _tiny_text()[0]))
    return {"data_dir": str(wt2), "vocab_size": 20, "seq_len": 12}


def _tiny_tinystories(tmp_path) -> dict:
    ts = write_tinystories(tmp_path / "ts.txt", _tiny_text()[1])
    return {"train_file": str(ts), "val_file": str(ts), "vocab_size": 20, "seq_len": 16}


def _tiny_enwik8(tmp_path) -> dict:
    (tmp_path / "enwik8").write_bytes(("<page> some text </page>\n" * 400).encode())
    return {"data_file": str(tmp_path / "enwik8"), "seq_len": 16, "max_eval_tokens": 256}


# tiny options per task, each writing only its own files under tmp_path (the task contract suite,
# tests/test_contracts_tasks.py, uses these too: a new task adds its writer here)
TINY_SOURCES = {
    "wikitext2": _tiny_wikitext2,
    "tinystories": _tiny_tinystories,
    "enwik8": _tiny_enwik8,
    "codeparrot": lambda tmp_path: {"data_dir": os.path.join(sysconfig.get_paths()["stdlib"], "email"),
                                    "split_bytes": [20_000, 4_000, 4_000], "seq_len": 16, "max_eval_tokens": 256},
    "sva": lambda tmp_path: {"train_examples": 200, "val_examples": 64, "test_examples": 64},
    "kws": lambda tmp_path: {"data_dir": str(write_speech_commands(tmp_path / "sc")), "words": ["yes", "no"]},
}


def _tiny_sources(tmp_path, name: str) -> dict:
    return TINY_SOURCES[name](tmp_path)


@pytest.mark.parametrize("name", REAL_TASKS)
def test_a_short_trial_runs_on_every_task(name, tmp_path):
    options = _tiny_sources(tmp_path, name)
    train = {**tiny_spec().train, "steps": 4, "eval_every": 2, "batch_size": 4, "eval_batch_size": 16}
    spec = tiny_spec(task=name, task_options=options, train=train)
    record = run_trial(spec, storage_uri=str(tmp_path / "s"), cache_uri=str(tmp_path / "c"))
    if name == "sva":  # 4 steps cannot pass paper A's failure rule (hard accuracy >= 85%): diverged, saying why
        assert record.status == "diverged" and "failure rule" in record.error
    else:
        assert record.status == "completed", record.error
    task = get_task(name)
    metrics = json.loads(record.metrics_json)
    assert record.metric_name == task.metric and math.isfinite(record.metric_value)
    assert task.metric in metrics
    assert (task.metric.replace("val_", "test_") in metrics) == (name != "tinystories")  # TinyStories: no test split
    prepared = task.prepare(options, DatasetCache(str(tmp_path / "c")))
    n_train = len(next(iter(prepared.arrays["train"].values())))
    seen = BatchOrder(resolve_train(train, {}), n_train, 0).examples_seen(4)  # a tiny split wraps into epoch 2
    assert record.tokens_seen == seen * task.tokens_per_example(prepared)


@pytest.mark.parametrize("name, bad", [("sva", {"generator_seeds": [0, 1]}), ("sva", {"val_examples": 0}),
                                       ("enwik8", {"split_bytes": [90, 10]}), ("codeparrot", {"split_bytes": [1, 0, 1]}),
                                       ("enwik8", {"seq_len": 0}), ("tinystories", {"val_fraction": 1.0})])
def test_bad_option_values_are_rejected_before_any_work(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_task(name).options(bad)
