"""Data: tokenizers, the default corpus, the deterministic split and batches."""
import numpy as np
import pytest

from model.data import (VAL_EVERY, ByteTokenizer, Corpus, DataError, HFTokenizer, batch_at, expand_paths,
                        stdlib_files, val_batch_count, val_batches)


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo →".encode())
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == "héllo →"


def test_default_corpus_is_the_stdlib_source_in_sorted_order():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_split_is_by_file_and_deterministic(tmp_path):
    for i in range(2 * VAL_EVERY):
        (tmp_path / f"f{i:02d}.txt").write_bytes(bytes([i]) * 10)
    corpus = Corpus.from_files(expand_paths([tmp_path]), ByteTokenizer())
    assert sorted(set(corpus.val.tolist())) == [VAL_EVERY - 1, 2 * VAL_EVERY - 1]
    assert len(corpus.train) == 10 * (2 * VAL_EVERY - 2)
    again = Corpus.from_files(expand_paths([tmp_path]), ByteTokenizer())
    np.testing.assert_array_equal(again.train, corpus.train)


def test_a_single_file_holds_out_its_tail(tmp_path):
    (tmp_path / "a.py").write_bytes(bytes(range(200)))
    corpus = Corpus.from_files([tmp_path / "a.py"], ByteTokenizer())
    assert np.concatenate([corpus.train, corpus.val]).tolist() == list(range(200))
    assert len(corpus.val) == 200 // VAL_EVERY


def test_empty_and_missing_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        Corpus.from_files([tmp_path / "empty.txt"], ByteTokenizer())
    with pytest.raises(DataError, match="no such file"):
        expand_paths([tmp_path / "nope"])
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(200)))
    corpus = Corpus.from_files([data], ByteTokenizer())
    with pytest.raises(DataError, match="training tokens"):
        corpus.check_fits(batch=16, seq=16, vocab_size=256)
    with pytest.raises(DataError, match="vocab_size"):
        corpus.check_fits(batch=1, seq=2, vocab_size=10)


def test_batch_rows_walk_lanes_far_apart_and_wrap_together():
    stream = np.arange(23, dtype=np.int32)  # two lanes of 11: [0, 11) and [11, 22) (+1 target)
    x, y, pos = batch_at(stream, 0, 2, 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [11, 12, 13, 14, 15]] and (y == x + 1).all() and pos == 5
    x, _, pos = batch_at(stream, pos, 2, 5)
    assert x[:, 0].tolist() == [5, 16] and pos == 10
    x, _, pos = batch_at(stream, pos, 2, 5)  # 10 + 5 > 11: both lanes back to their start
    assert x[:, 0].tolist() == [0, 11] and pos == 5


def test_validation_batches_are_fixed_and_cover_the_stream():
    stream = np.arange(1000, dtype=np.int32)
    batches = val_batches(stream, batch=4, seq=10, count=3)
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    assert all((y == x + 1).all() for x, y in batches)
    assert batches[0][0][0, 0] == 0 and batches[-1][0][-1, -1] >= 980
    short = val_batches(np.arange(101, dtype=np.int32), batch=4, seq=10, count=3)  # 10 windows
    assert [x.shape for x, _ in short] == [(4, 10), (4, 10)]


@pytest.mark.parametrize("tokens", [2, 17, 33, 100, 101, 160, 161, 1000])
def test_the_validation_batches_a_stream_holds_are_the_most_val_batches_gives(tokens):
    """(The command line refuses or cuts --eval-batches above it: any more were silently fewer.)"""
    stream = np.arange(tokens, dtype=np.int32)
    for batch in (1, 2, 4, 7):
        for seq in (s for s in (1, 3, 10, 16) if s < tokens):
            held = val_batch_count(stream, batch, seq)
            assert [len(val_batches(stream, batch, seq, n)) for n in (held, held + 1, 10 * held)] == [held] * 3


def test_hf_tokenizer_json_is_used_when_given(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "def": 1, "main": 2, "(": 3, ")": 4, ":": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    assert hf.vocab_size == 6
    assert hf.encode(b"def main ( ) : nope").tolist() == [1, 2, 3, 4, 5, 0]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        HFTokenizer(tmp_path / "bad.json")


def test_a_corpus_that_is_not_utf8_is_refused_for_a_tokenizer_json_naming_the_file_and_byte(tmp_path):
    """tokenizer.json reads text: the bytes were decoded with U+FFFD in place of each bad one, and the
    model trained on text that is in no file. The byte tokenizer reads any bytes, as before."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "latin1.py").write_bytes(b"def caf\xe9\n" * 50)
    with pytest.raises(DataError) as e:
        Corpus.from_files([tmp_path / "latin1.py"], HFTokenizer(tmp_path / "tokenizer.json"))
    msg = str(e.value)
    assert str(tmp_path / "latin1.py") in msg and "byte 7" in msg and "UTF-8" in msg and "\n" not in msg
    assert len(Corpus.from_files([tmp_path / "latin1.py"], ByteTokenizer()).train) > 0
