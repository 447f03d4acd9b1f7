"""Text reading, vocabulary, corpora download and the stateful stream batches."""

import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest

from charlstm_jax import data
from tests.conftest import shared_text


def test_vocab_is_sorted_deterministic_and_round_trips(tmp_path):
    text = "Manor Farm\nAll animals are equal.é"
    vocab = data.Vocab.from_text(text)
    assert list(vocab.chars) == sorted(set(text))
    assert data.Vocab.from_text(text[::-1]) == vocab  # order of appearance does not matter
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert vocab.decode(ids) == text
    vocab.save(tmp_path / "vocab.json")
    assert data.Vocab.load(tmp_path / "vocab.json") == vocab
    assert data.Vocab.from_json(vocab.to_json()).chars == vocab.chars


def test_vocab_rejects_unknown_characters():
    vocab = data.Vocab.from_text("abc")
    assert vocab.missing("abzzy") == ["z", "y"]
    with pytest.raises(data.DataError, match="not in the vocabulary"):
        vocab.encode("abz")


def test_animal_farm_has_the_documented_size_and_symbols():
    text = data.read_text(shared_text("animal_farm.txt"))
    assert len(text) == 168_566
    assert len(data.Vocab.from_text(text)) == 71
    assert "\r" not in text


def test_read_text_universal_newlines(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"one\r\ntwo\rthree\nfour")
    assert data.read_text(path) == "one\ntwo\nthree\nfour"


def test_read_text_errors(tmp_path):
    with pytest.raises(data.DataError, match="No text file at"):
        data.read_text(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(data.DataError, match="is empty"):
        data.read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(data.DataError, match="byte offset 3"):
        data.read_text(tmp_path / "latin1.txt")


def test_split_is_contiguous_as_the_reference():
    ids = np.arange(1000)
    train, valid = data.split_train_validation(ids, 0.1)
    assert len(train) == 900 and train[-1] == 899 and valid[0] == 900 and len(valid) == 100


def test_stream_batches_continue_rows_and_shift_targets():
    ids = np.arange(1, 1 + 3 * 4 * 5 + 7)  # 3 batches of 4 rows x 5, with 7 ids spare
    inputs, targets = data.stream_batches(ids, batch_size=4, window=5)
    assert inputs.shape == targets.shape == (3, 4, 5)
    rows = inputs.transpose(1, 0, 2).reshape(4, -1)
    assert np.array_equal(rows.reshape(-1), ids[:60])  # rows are contiguous stretches
    for n in range(2):  # row i of batch n + 1 continues row i of batch n
        assert np.array_equal(inputs[n + 1, :, 0], inputs[n, :, -1] + 1)
    # Every target is the true next character, the last window's last one included.
    assert np.array_equal(targets, inputs + 1)


def test_stream_batches_last_target_when_text_fits_exactly():
    ids = np.arange(2 * 3 * 4 + 1)  # exactly one spare id for the last target
    inputs, targets = data.stream_batches(ids, batch_size=2, window=4)
    assert inputs.shape == (3, 2, 4)
    assert targets[-1, -1, -1] == ids[-1]
    with pytest.raises(data.DataError, match="at least 9"):
        data.stream_batches(np.arange(8), batch_size=2, window=4)


def test_load_dataset_sizes_and_too_short_text(tiny_config, tmp_path, phrase_file):
    tiny_config.data_path = str(phrase_file)
    dataset = data.load_dataset(tiny_config)
    n = len("the pigs rule the farm. " * 120)
    train_count = int(n * 0.9)
    assert dataset.train_inputs.shape == ((train_count - 1) // 64, 4, 16)
    assert dataset.valid_inputs.shape[1:] == (4, 16)
    assert np.array_equal(dataset.train_targets[:, :, :-1], dataset.train_inputs[:, :, 1:])
    short = tmp_path / "short.txt"
    short.write_text("x" * 70)
    tiny_config.data_path = str(short)
    with pytest.raises(data.DataError, match=r"needs at least 65 \(batch_size \* window \+ 1\)"):
        data.load_dataset(tiny_config)


class _Server:
    """A local HTTP server on 127.0.0.1 serving one directory."""

    def __init__(self, directory):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        handler.log_message = lambda *args: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "novel.txt").write_text("Four legs good, two legs bad.\n" * 50)
    httpd = _Server(served)
    yield httpd, served
    httpd.close()


def test_fetch_corpus_downloads_and_checks_sha256(server, tmp_path):
    httpd, served = server
    sha = hashlib.sha256((served / "novel.txt").read_bytes()).hexdigest()
    corpus = data.Corpus("novel.txt", httpd.url + "novel.txt", sha)
    data_dir = tmp_path / "data"
    path = data.fetch_corpus("novel", data_dir, corpus)
    assert path == data_dir / "novel.txt" and data.file_sha256(path) == sha
    httpd.close()  # a present, intact file needs no network
    assert data.fetch_corpus("novel", data_dir, corpus) == path


def test_fetch_corpus_mismatch_removes_the_download(server, tmp_path):
    httpd, _ = server
    corpus = data.Corpus("novel.txt", httpd.url + "novel.txt", "0" * 64)
    with pytest.raises(data.DataError, match="did not match sha256"):
        data.fetch_corpus("novel", tmp_path / "data", corpus)
    assert not (tmp_path / "data" / "novel.txt").exists()


def test_fetch_corpus_offline_says_where_to_put_the_file(tmp_path):
    corpus = data.Corpus("novel.txt", "http://127.0.0.1:9/novel.txt", "0" * 64)
    with pytest.raises(data.DataError, match=r"put novel.txt .* at .*novel.txt yourself"):
        data.fetch_corpus("novel", tmp_path / "data", corpus)


def test_fetch_corpus_wrong_local_file_and_unknown_name(tmp_path):
    (tmp_path / "animal_farm.txt").write_text("not the novel")
    with pytest.raises(data.DataError, match="delete it to download the right one"):
        data.fetch_corpus("animal_farm", tmp_path)
    with pytest.raises(data.DataError, match="Unknown corpus 'moby'"):
        data.fetch_corpus("moby", tmp_path)
