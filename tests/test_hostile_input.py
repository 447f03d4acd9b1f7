"""Hostile input: whatever text or sampling option comes in, it works or raises the documented
error (`DataError` for texts, `SamplingError` for prompts and options), never anything else.

Inputs are drawn with numpy generators of fixed seeds, so a failure reproduces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charlstm_jax import checkpoint, sampling
from charlstm_jax.data import DataError, Vocab, load_dataset, read_text
from charlstm_jax.model import CharLSTM
from charlstm_jax.train import train_and_evaluate

UNICODE = (
    "Ça va? naïve café, Ωμέγα, Ёж; "  # accents, Greek, Cyrillic
    "e\u0301 a\u0308\u0323 "  # combining marks
    "שָׁלוֹם مرحبا بالعالم "  # right-to-left, with vowel marks
    "🐷🐖 👩‍🌾 🇬🇧 ✊🏽 "  # emoji: astral, zero-width joiner, flag, skin tone
    "漢字かなカナ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\u00a0\ufffd\t"  # CJK, math letters, invisible spaces
)


def _dataset_or_data_error(config, path):
    """`load_dataset` on `path`: a consistent Dataset, or None after a `DataError`."""
    config.data_path = str(path)
    try:
        dataset = load_dataset(config)
    except DataError as error:
        assert str(error).endswith(".") and "\n" not in str(error)
        return None
    text = read_text(path)
    assert "\r" not in text and dataset.num_chars == len(text)
    assert dataset.vocab == Vocab.from_text(text)
    assert dataset.vocab.decode(dataset.vocab.encode(text)) == text
    rows, window = config.batch_size, config.window
    assert dataset.train_inputs.shape[1:] == (rows, window)
    assert dataset.train_inputs.max() < len(dataset.vocab)
    return dataset


@pytest.mark.parametrize("size", [0, 1, 2, 3, 100, 1000, 5000, 100_000])
def test_random_bytes_load_or_raise_data_error(tiny_config, tmp_path, size):
    rng = np.random.default_rng(size)
    for trial in range(5):
        path = tmp_path / f"random{trial}.bin"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        _dataset_or_data_error(tiny_config, path)


@pytest.mark.parametrize("alphabet", ["ascii", "unicode", "control"])
def test_random_valid_utf8_texts_load(tiny_config, tmp_path, alphabet):
    rng = np.random.default_rng(len(alphabet))
    chars = {
        "ascii": [chr(i) for i in range(32, 127)] + ["\n", "\r", "\r\n"],
        "unicode": list(UNICODE) + ["\r\n", "\n"],
        "control": [chr(i) for i in range(0, 32)] + ["\x7f", "\u2028", "\u2029"],
    }[alphabet]
    text = "".join(rng.choice(chars, 20_000))
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    assert _dataset_or_data_error(tiny_config, path) is not None


def test_binary_files_are_refused_with_the_offset(tiny_config, tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    path = tmp_path / "image.png"
    path.write_bytes(png)
    with pytest.raises(DataError, match=r"is not UTF-8 text: byte b'\\x89' at byte offset 0"):
        read_text(path)
    elf = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + bytes(range(128, 256)) * 20
    (tmp_path / "program").write_bytes(elf)
    with pytest.raises(DataError, match="at byte offset 16"):
        read_text(tmp_path / "program")
    zeros = tmp_path / "zeros.bin"  # NUL bytes are valid UTF-8: a text of one symbol
    zeros.write_bytes(b"\x00" * 5000)
    dataset = _dataset_or_data_error(tiny_config, zeros)
    assert dataset.vocab.chars == ("\x00",)


def test_one_line_multi_megabyte_file(tiny_config, tmp_path):
    rng = np.random.default_rng(3)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    path = tmp_path / "one_line.txt"
    path.write_bytes(rng.choice(letters, 4_000_000).tobytes())  # no newline at all
    dataset = _dataset_or_data_error(tiny_config, path)
    assert dataset.num_chars == 4_000_000 and len(dataset.vocab) == 27


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\xef\xbb\xbf", "is empty"),  # a byte-order mark only
        (b"\r\n" * 10, "is too short"),
        (b"short text", "is too short"),
        (b"abc\xff", "is not UTF-8"),
        (b"\xed\xa0\x80 lone surrogate", "is not UTF-8"),
    ],
)
def test_empty_short_and_broken_files_raise_data_error(tiny_config, tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    tiny_config.data_path = str(path)
    with pytest.raises(DataError, match=message):
        load_dataset(tiny_config)


def test_a_directory_or_missing_path_raises_data_error(tiny_config, tmp_path):
    for path in (tmp_path, tmp_path / "missing.txt"):
        tiny_config.data_path = str(path)
        with pytest.raises(DataError, match="No text file at"):
            load_dataset(tiny_config)


def test_mixed_line_ends_become_lf(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"one\r\ntwo\nthree\rfour\r\n\r\nfive\n\rsix")
    assert read_text(path) == "one\ntwo\nthree\nfour\n\nfive\n\nsix"


def test_unicode_text_trains_saves_and_samples(tiny_config, tmp_path):
    path = tmp_path / "unicode.txt"
    path.write_bytes(("\r\n".join([UNICODE] * 4) + "\n").encode("utf-8") * 40)
    tiny_config.data_path = str(path)
    train_and_evaluate(tiny_config, tmp_path / "run")
    loaded = checkpoint.load_checkpoint(tmp_path / "run")
    assert loaded.vocab == Vocab.from_text(read_text(path))  # astral and combining chars kept
    (text,) = sampling.sample(loaded.model, loaded.params, loaded.vocab, "🐷 שָׁלוֹם e\u0301", 50)
    assert len(text) == 50 and set(text) <= set(loaded.vocab.chars)


VOCAB = Vocab("\n abcdefghij.🐷é\u0301ש")


@pytest.fixture(scope="module")
def model_and_params():
    model = CharLSTM(vocab_size=len(VOCAB), hidden_size=8, num_layers=1, drop_prob=0.0)
    params = model.init(jax.random.key(0), model.initialize_carry(1), jnp.zeros((1, 1), int))
    return model, jax.tree_util.tree_map(lambda p: 3 * p, params["params"])


def _random_prompt(rng):
    kind = rng.integers(0, 4)
    if kind == 0:  # characters of the vocabulary only
        return "".join(rng.choice(list(VOCAB.chars), rng.choice([1, 5, 40])))
    if kind == 1:  # any code points, unknown ones among them
        return "".join(chr(c) for c in rng.integers(1, 0x10FFFF, 5) if not 0xD800 <= c < 0xE000)
    return str(rng.choice(["", "\n", "🐷", "e\u0301", "ש" * 3, "pigs", "\x00", "a" * 3000]))


def test_random_prompts_and_options_work_or_raise_sampling_error(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    # (values that work, values that must be refused) for each option
    options = {
        "top_k": ([1, 3, len(VOCAB)], [0, -1, len(VOCAB) + 1, True, 2.5]),
        "temperature": ([1.0, 0.3, 1e-30, 1e30], [0.0, -1.0, float("nan"), float("inf")]),
        "top_p": ([1.0, 0.5, 1e-9], [0.0, 1.5, -0.1, float("nan")]),
        "num_samples": ([1, 2], [0, -1, True, 1.5]),
        "rng_seed": ([0, 7, -3, 2**40], []),
        "drop_unknown": ([False, True], []),
    }

    def draw(values):
        good, bad = values
        pool = bad if bad and rng.random() < 0.1 else good
        return pool[rng.integers(len(pool))]

    worked = refused = 0
    for _ in range(40):
        prompt = _random_prompt(rng)
        length = int(rng.choice([0, 1, 9, 300, -1], p=[0.2, 0.2, 0.3, 0.2, 0.1]))
        chosen = {name: draw(values) for name, values in options.items()}
        try:
            texts = sampling.sample(model, params, VOCAB, prompt, length, **chosen)
        except sampling.SamplingError as error:
            assert str(error).endswith(".") and "\n" not in str(error)
            refused += 1
            continue
        assert len(texts) == chosen["num_samples"]
        for text in texts:
            assert len(text) == length and set(text) <= set(VOCAB.chars)
        worked += 1
    assert worked >= 5 and refused >= 5  # both kinds were exercised
