"""Tests of store/data.py: sources, tokenizers, the built-in corpus and the batch stream."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from store import corpus
from store import data as data_lib
from store.data import DataConfig
from train.config import load
from store.data import Batch, ByteTokenizer, DataState, TokenStream

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ---------------------------------------------------------------------------
# Tokenizers.


@pytest.mark.parametrize("text", ["hello, world", "混合精度训练 FP8", "naïve café ∑ 🙂", ""])
def test_byte_tokenizer_round_trips_any_language(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_byte_tokenizer_decodes_broken_utf8_with_replacement():
    ids = ByteTokenizer().encode("训")
    assert ByteTokenizer().decode(ids[:2] + [ord("a")]) == "\ufffda"


def test_byte_tokenizer_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 256\).*\[256, -1\]"):
        ByteTokenizer().decode([65, 256, -1])


def test_hf_tokenizer_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    with pytest.raises(ImportError, match="pip install tokenizers"):
        data_lib.make_tokenizer(str(tmp_path / "tokenizer.json"))


def test_hf_tokenizer_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = data_lib.make_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.vocab_size, tok.separator) == (4, [1])
    assert tok.encode("hello world") == [2, 3]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        data_lib.make_tokenizer(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------
# Sources.


CORPUS_SHA256 = "faedb2619c47c28623d9ebec18c39bdb661979e580f94930412f319fbfc93bf5"


def test_builtin_corpus_is_over_a_megabyte_of_english_text():
    docs = data_lib.builtin_corpus()
    text = "\n\n".join(docs)
    assert len(text.encode("utf-8")) >= 1_000_000
    assert len(docs) > 1000
    letters = sum(c.isalpha() for c in text) / len(text)
    assert letters > 0.6, letters  # prose, not code
    assert "the" in text.split()[:2000]
    assert data_lib.builtin_corpus() == docs  # deterministic (and a fresh list)
    assert data_lib.builtin_corpus() is not docs


def test_builtin_corpus_is_the_same_text_on_every_machine():
    # The shipped file, not the local standard library: README figures depend on it.
    # Rebuilding it (store/corpus.py) changes this digest; re-measure the figures then.
    text = "\x00".join(data_lib.builtin_corpus())
    assert hashlib.sha256(text.encode()).hexdigest() == CORPUS_SHA256
    rebuilt = corpus.stdlib_corpus()
    if sys.version_info[:3] == (3, 11, 7):  # the Python it was extracted from
        assert rebuilt == data_lib.builtin_corpus()


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"),
    (b"  \n\n", "holds no text"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
])
def test_unusable_text_files_are_named(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data_lib.load_documents(str(path))


def test_docstrings_are_extracted_in_source_order():
    source = ('"""Module."""\nclass A:\n    """Class A."""\n'
              '    def f(self):\n        """F.\n\n        More."""\n')
    assert corpus._docstrings(source) == ["Module.", "Class A.", "F.\n\nMore."]


def test_text_jsonl_glob_and_directory_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first 文本", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third", "id": 3}) + "\n")
    assert data_lib.load_documents(str(tmp_path / "a.txt")) == ["first 文本"]
    assert data_lib.load_documents(str(tmp_path / "sub" / "b.jsonl")) == ["second", "third"]
    assert data_lib.load_documents(str(tmp_path / "**" / "*.jsonl")) == ["second", "third"]
    assert data_lib.load_documents(str(tmp_path)) == ["first 文本", "second", "third"]


@pytest.mark.parametrize("source", ["missing.txt", "nothing/*.txt", "emptydir"])
def test_missing_sources_are_named(tmp_path, source):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match=source.replace("*", r"\*")):
        data_lib.load_documents(str(tmp_path / source))


@pytest.mark.parametrize("lines, expected", [
    (['{"text": "ok"}', "{not json"], r"bad.jsonl:2: invalid JSON"),
    (['{"text": "ok"}', '{"content": "x"}'], r'bad.jsonl:2: expected an object with a string "text"'),
    (['{"text": 3}'], r"bad.jsonl:1: expected an object"),
    (['["text"]'], r"bad.jsonl:1: expected an object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=expected):
        data_lib.load_documents(str(path))


def test_non_utf8_text_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        data_lib.load_documents(str(tmp_path / "latin1.txt"))


def test_documents_are_joined_with_the_separator():
    tokens = data_lib.encode_documents(["ab", "c"], ByteTokenizer())
    assert tokens.dtype == np.int32
    assert bytes(tokens.astype(np.uint8)) == b"ab\n\nc\n\n"


# ---------------------------------------------------------------------------
# The stream. Tokens 0..n-1 (vocab n) make each window's start visible in its ids.


def counting_stream(n=1000, seq_len=8, batch_size=4, eval_fraction=0.1, seed=0):
    return TokenStream(np.arange(n), seq_len=seq_len, batch_size=batch_size, vocab_size=n,
                       eval_fraction=eval_fraction, seed=seed)


def test_batches_are_shifted_contiguous_windows():
    stream = counting_stream()
    batch, state = stream.batch(DataState())
    assert isinstance(batch, Batch) and state == DataState(0, 1)
    for x in batch:
        assert x.shape == (4, 8) and x.dtype == np.int32
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    np.testing.assert_array_equal(batch.inputs, batch.inputs[:, :1] + np.arange(8))
    np.testing.assert_array_equal(batch.targets, batch.inputs + 1)


def test_eval_split_is_the_contiguous_tail_and_never_trained_on():
    stream = counting_stream(n=1000, eval_fraction=0.1)
    np.testing.assert_array_equal(stream.eval_tokens, np.arange(900, 1000))
    np.testing.assert_array_equal(stream.train_tokens, np.arange(900))
    state, seen_max = DataState(), 0
    for _ in range(3 * stream.steps_per_epoch):
        batch, state = stream.batch(state)
        seen_max = max(seen_max, int(batch.targets.max()))
    assert seen_max < 900
    first, again = stream.eval_batch(0), stream.eval_batches(2)[0]
    np.testing.assert_array_equal(first.inputs, again.inputs)
    np.testing.assert_array_equal(first.inputs[:, 0], 900 + 8 * np.arange(4))
    assert stream.num_eval_batches == (100 - 1) // 8 // 4


def test_an_epoch_visits_each_window_once_in_a_new_order():
    stream = counting_stream()
    starts = {}
    state = DataState()
    for _ in range(2 * stream.steps_per_epoch):
        epoch = state.epoch
        batch, state = stream.batch(state)
        starts.setdefault(epoch, []).extend(batch.inputs[:, 0].tolist())
    assert state == DataState(2, 0)
    for epoch_starts in starts.values():
        assert len(set(epoch_starts)) == len(epoch_starts) == stream.steps_per_epoch * 4
        offsets = {s % 8 for s in epoch_starts}
        assert len(offsets) == 1  # one random offset per epoch
    assert starts[0] != starts[1]


def test_resuming_from_a_saved_state_gives_the_same_batches():
    stream = counting_stream()
    n = stream.steps_per_epoch * 2 + 3
    state, straight = DataState(), []
    for _ in range(n):
        batch, state = stream.batch(state)
        straight.append(batch)
    state, resumed = DataState(), []
    for i in range(n):
        if i in (5, stream.steps_per_epoch, n - 1):  # stop, serialize, restart in a new stream
            state = DataState.from_dict(json.loads(json.dumps(state.to_dict())))
            stream = counting_stream()
        batch, state = stream.batch(state)
        resumed.append(batch)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.inputs, b.inputs)


def test_seed_changes_the_order():
    a, _ = counting_stream(seed=0).batch(DataState())
    b, _ = counting_stream(seed=1).batch(DataState())
    assert not np.array_equal(a.inputs, b.inputs)


def test_too_small_corpus_names_the_sizes():
    with pytest.raises(ValueError, match=r"30 training tokens.*seq_len=8.*batch_size=4.*40"):
        counting_stream(n=30, eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"held-out split too small: 10 tokens"):
        counting_stream(n=100, eval_fraction=0.1)


def test_token_ids_must_fit_the_vocabulary():
    with pytest.raises(ValueError, match=r"vocab_size=256.*\[0, 999\]"):
        TokenStream(np.arange(1000), seq_len=8, batch_size=4, vocab_size=256)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenStream(np.zeros(100, np.float32), seq_len=8, batch_size=4, vocab_size=256)


def test_out_of_range_positions_are_errors():
    stream = counting_stream()
    with pytest.raises(ValueError, match="step_in_epoch must be in"):
        stream.batch(DataState(0, stream.steps_per_epoch))
    with pytest.raises(ValueError, match=f"has {stream.num_eval_batches} batches"):
        stream.eval_batch(stream.num_eval_batches)
    with pytest.raises(ValueError, match="epoch"):
        DataState.from_dict({"epoch": 1})


def test_build_from_the_tiny_config_covers_the_run():
    cfg = load(CONFIGS / "tiny.yaml")
    stream, tok = data_lib.build(cfg.data, cfg.model.vocab_size)
    assert isinstance(tok, ByteTokenizer)
    assert stream.steps_per_epoch >= cfg.steps  # the tiny run sees no window twice
    assert stream.num_eval_batches >= cfg.eval_batches
    batch, _ = stream.batch(DataState())
    assert batch.inputs.shape == (cfg.data.batch_size, cfg.data.seq_len)


def test_build_checks_the_tokenizer_fits_the_model(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 2000)
    cfg = DataConfig(source=str(tmp_path / "a.txt"), seq_len=8, batch_size=2, eval_fraction=0)
    with pytest.raises(ValueError, match="256 ids but model.vocab_size=100"):
        data_lib.build(cfg, vocab_size=100)
