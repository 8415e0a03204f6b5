"""Tests of the text tokenizers and TextDataModule, on small texts the tests write."""

from __future__ import annotations

import hashlib
import http.server
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from datamodules import text
from datamodules.text import IGNORE_INDEX, TextDataModule
from datamodules.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)

WORDS = "the king doth wake to night and speak of crowns, my lord; thou art here".split()


def make_text(num_lines: int = 400, seed: int = 0) -> str:
    """Lines of random words, about 40 characters each."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def file_datamodule(path: Path, **kwargs) -> TextDataModule:
    settings = {"source": "file", "path": str(path), "block_size": 16, "batch_size": 4}
    settings.update(kwargs)
    datamodule = TextDataModule(**settings)
    datamodule.setup()
    return datamodule


# Tokenizers


def test_char_tokenizer_round_trip():
    corpus = "To be, or not to be: that is the question.\n"
    tokenizer = CharTokenizer.from_text(corpus)

    assert tokenizer.chars == "".join(sorted(set(corpus)))
    assert tokenizer.vocab_size == len(set(corpus))
    assert tokenizer.encode(" \n")[0] == tokenizer.chars.index(" ")
    assert tokenizer.decode(tokenizer.encode(corpus)) == corpus


def test_byte_tokenizer_round_trip():
    sample = "Café, naïve — 東京 🎭\n"
    tokenizer = ByteTokenizer()

    ids = tokenizer.encode(sample)
    assert ids == list(sample.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.vocab_size == 256
    assert tokenizer.decode(ids) == sample


def test_byte_tokenizer_decodes_invalid_utf8():
    # A lone continuation byte is not valid UTF-8, so decoding replaces it instead of raising.
    assert ByteTokenizer().decode([0x41, 0x80, 0x42]) == "A\ufffdB"


def test_char_tokenizer_unknown_characters_raise():
    tokenizer = CharTokenizer.from_text("abc")

    with pytest.raises(ValueError, match="not in the vocabulary") as error:
        tokenizer.encode("abXcZ")
    assert "'XZ'" in str(error.value)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizer_dict_round_trip(kind):
    corpus = "hello, world\n"
    tokenizer = build_tokenizer(kind, corpus)

    rebuilt = tokenizer_from_dict(tokenizer.to_dict())
    assert type(rebuilt) is type(tokenizer)
    assert rebuilt.vocab_size == tokenizer.vocab_size
    assert rebuilt.encode(corpus) == tokenizer.encode(corpus)
    assert rebuilt.decode(tokenizer.encode(corpus)) == corpus


def test_tokenizer_from_dict_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        tokenizer_from_dict({"kind": "bpe"})


# Splits and batches


def test_split_is_contiguous(text_file):
    datamodule = file_datamodule(text_file)
    tokens = datamodule.tokenizer.encode(text_file.read_text(encoding="utf-8"))
    num_train = int(len(tokens) * 0.9)

    assert len(datamodule.train_tokens) == num_train
    assert len(datamodule.val_tokens) == len(tokens) - num_train
    assert datamodule.train_tokens.tolist() == tokens[:num_train]
    assert datamodule.val_tokens.tolist() == tokens[num_train:]


def test_char_vocabulary_covers_whole_corpus(tmp_path):
    # "Z" appears only in the validation part, and must still be in the vocabulary.
    path = tmp_path / "corpus.txt"
    path.write_text(make_text() + "Z" * 50, encoding="utf-8")
    datamodule = file_datamodule(path)

    assert "Z" in datamodule.tokenizer.chars
    assert datamodule.model_inputs()["vocab_size"] == len(set(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("val_batch_size", [1, 3, 7])
def test_validation_covers_every_target_once(text_file, val_batch_size):
    datamodule = file_datamodule(text_file, block_size=16, val_batch_size=val_batch_size)
    val_tokens = datamodule.val_tokens

    inputs, targets = [], []
    for x, y in datamodule.val_dataloader():
        assert x.dtype == torch.int64
        assert y.dtype == torch.int64
        assert x.shape == y.shape
        assert x.shape[1] <= 16
        for row_x, row_y in zip(x, y, strict=True):
            keep = row_y != IGNORE_INDEX
            inputs.append(row_x[keep])
            targets.append(row_y[keep])
    inputs, targets = torch.cat(inputs), torch.cat(targets)

    assert len(targets) == len(val_tokens) - 1
    assert torch.equal(targets, val_tokens[1:])
    assert torch.equal(inputs, val_tokens[:-1])


def test_validation_pads_last_chunk(text_file):
    datamodule = file_datamodule(text_file, block_size=16, val_batch_size=1000)
    num_targets = len(datamodule.val_tokens) - 1
    assert num_targets % 16 != 0, "the test text must leave a shorter last chunk"

    x, y = next(iter(datamodule.val_dataloader()))
    last_length = num_targets % 16
    assert (y[-1, last_length:] == IGNORE_INDEX).all()
    assert (y[-1, :last_length] != IGNORE_INDEX).all()
    assert (y[:-1] != IGNORE_INDEX).all()


def test_training_windows_are_random(text_file):
    datamodule = file_datamodule(text_file, block_size=16, batch_size=8)
    train_tokens = datamodule.train_tokens.tolist()
    loader = datamodule.train_dataloader()

    assert len(loader.dataset) == len(train_tokens) - 16
    first_x, first_y = next(iter(loader))
    again_x, _ = next(iter(loader))
    loader.sampler.set_epoch(1)
    next_epoch_x, _ = next(iter(loader))

    assert first_x.shape == (8, 16)
    # Shuffled, the same way for the same seed and epoch, another way in the next epoch.
    assert first_x[:, 0].tolist() != train_tokens[:8]
    assert torch.equal(first_x, again_x)
    assert not torch.equal(first_x, next_epoch_x)
    # Each row is a window of the training tokens, and y is x shifted by one.
    for row_x, row_y in zip(first_x.tolist(), first_y.tolist(), strict=True):
        assert row_x[1:] == row_y[:-1]
        starts = [i for i in range(len(train_tokens) - 16) if train_tokens[i : i + 16] == row_x]
        assert starts, "a training row is not a window of the training split"
        assert any(train_tokens[s + 1 : s + 17] == row_y for s in starts)


def test_training_windows_reach_both_ends(text_file):
    datamodule = file_datamodule(text_file, block_size=16)
    dataset = datamodule.train_dataloader().dataset
    train_tokens = datamodule.train_tokens

    first_x, _ = dataset[0]
    _, last_y = dataset[len(dataset) - 1]
    assert torch.equal(first_x, train_tokens[:16])
    assert torch.equal(last_y, train_tokens[-16:])


def test_embedded_corpus_loads():
    datamodule = TextDataModule(source="embedded", block_size=64)
    inputs = datamodule.model_inputs()
    corpus = datamodule.read_corpus()

    assert len(corpus) == 200_376
    assert corpus.startswith("First Citizen:\n")
    assert inputs["vocab_size"] == len(set(corpus))
    assert inputs["block_size"] == 64
    assert tokenizer_from_dict(inputs["tokenizer"]).decode(datamodule.val_tokens[:5].tolist())


def test_byte_tokenizer_on_file(tmp_path):
    path = tmp_path / "accents.txt"
    path.write_text("Ça va très bien, merci. " * 200, encoding="utf-8")
    datamodule = file_datamodule(path, tokenizer="byte")

    assert datamodule.model_inputs()["vocab_size"] == 256
    assert len(datamodule.train_tokens) + len(datamodule.val_tokens) == len(path.read_bytes())


# Sources and their errors


def test_shakespeare_reads_data_dir(tmp_path):
    corpus = make_text(seed=1)
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    (folder / "input.txt").write_text(corpus, encoding="utf-8")

    datamodule = TextDataModule(source="shakespeare", data_dir=str(tmp_path), download=False)
    datamodule.prepare_data()
    datamodule.setup()

    assert datamodule.read_corpus() == corpus
    tokens = torch.cat([datamodule.train_tokens, datamodule.val_tokens]).tolist()
    assert datamodule.tokenizer.decode(tokens) == corpus


def test_shakespeare_missing_offline_names_file(tmp_path):
    data_dir = tmp_path / "no_data_here"
    datamodule = TextDataModule(source="shakespeare", data_dir=str(data_dir), download=False)

    with pytest.raises(FileNotFoundError) as error:
        datamodule.model_inputs()
    message = str(error.value)
    assert str(data_dir / "tinyshakespeare" / "input.txt") in message
    assert f"folder {data_dir / 'tinyshakespeare'}" in message
    assert "data.download=true" in message


def test_shakespeare_download_failure_names_file(tmp_path, monkeypatch):
    # Nothing listens on the discard port of the loopback interface, so the connection is
    # refused at once.
    monkeypatch.setattr(text, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    monkeypatch.setattr(text, "DOWNLOAD_TIMEOUT_S", 5.0)
    datamodule = TextDataModule(source="shakespeare", data_dir=str(tmp_path), download=True)

    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        datamodule.prepare_data()
    assert time.monotonic() - started < 10

    message = str(error.value)
    assert "http://127.0.0.1:9/input.txt" in message
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in message
    assert f"folder {tmp_path / 'tinyshakespeare'}" in message
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 that serves the files of tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shakespeare_download_checks_md5(tmp_path, monkeypatch, loopback_server):
    served, base_url = loopback_server
    corpus = make_text(seed=2)
    (served / "input.txt").write_text(corpus, encoding="utf-8")
    monkeypatch.setattr(text, "SHAKESPEARE_URL", f"{base_url}/input.txt")
    target = tmp_path / "data" / "tinyshakespeare" / "input.txt"

    # The served file is not the real corpus, so its md5 does not match.
    datamodule = TextDataModule(
        source="shakespeare", data_dir=str(tmp_path / "data"), download=True
    )
    with pytest.raises(ValueError, match="md5"):
        datamodule.prepare_data()
    assert not target.exists()

    # With the served file's md5 as the expected one, the download is kept and loads.
    monkeypatch.setattr(text, "SHAKESPEARE_MD5", hashlib.md5(corpus.encode()).hexdigest())
    datamodule.prepare_data()
    datamodule.setup()
    assert target.read_text(encoding="utf-8") == corpus
    assert list(target.parent.iterdir()) == [target]


def test_file_source_missing_file(tmp_path):
    missing = tmp_path / "missing.txt"
    datamodule = TextDataModule(source="file", path=str(missing))

    with pytest.raises(FileNotFoundError, match="data.path") as error:
        datamodule.setup()
    assert str(missing) in str(error.value)


def test_file_source_rejects_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ".encode("latin-1") * 100)

    with pytest.raises(ValueError, match="not valid UTF-8"):
        TextDataModule(source="file", path=str(path)).setup()


def test_short_text_rejected(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc" * 10, encoding="utf-8")

    with pytest.raises(ValueError, match="data.block_size"):
        TextDataModule(source="file", path=str(path), block_size=64).setup()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"source": "web"}, "data.source"),
        ({"tokenizer": "bpe"}, "data.tokenizer"),
        ({"block_size": 0}, "data.block_size"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"val_batch_size": 0}, "data.val_batch_size"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"source": "file"}, "data.path is required"),
        ({"path": "corpus.txt"}, "not read by data.source 'embedded'"),
        ({"data_dir": "data"}, "data.data_dir"),
        ({"download": True}, "data.download"),
        ({"source": "shakespeare"}, "needs data.path"),
    ],
)
def test_invalid_settings_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(**settings)
