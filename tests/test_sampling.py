"""The jitted top-k sampler: greedy, top-k, seeds, batching, priming, bad options, the script."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charlstm_jax import checkpoint, sampling
from charlstm_jax.data import Vocab
from charlstm_jax.model import CharLSTM
from charlstm_jax.train import train_and_evaluate
from tests.conftest import run_script

VOCAB = Vocab("\n abcdefghijklmnopqrstuvwxyz.,!")


@pytest.fixture(scope="module")
def model_and_params():
    model = CharLSTM(vocab_size=len(VOCAB), hidden_size=24, num_layers=2, drop_prob=0.5)
    params = model.init(jax.random.key(1), model.initialize_carry(1), jnp.zeros((1, 1), int))
    # Larger weights than the initialiser's give peaked, varied distributions to sample from.
    params = jax.tree_util.tree_map(lambda p: 4 * p, params["params"])
    return model, params


def _step_logits(model, params, text):
    """Logits after each character of `text`, fed one character at a time: `[len, V]`."""
    step = jax.jit(lambda carry, i: model.apply({"params": params}, carry, jnp.full((1, 1), i)))
    carry, out = model.initialize_carry(1), []
    for i in VOCAB.encode(text):
        carry, logits = step(carry, i)
        out.append(logits[0, 0])
    return jnp.stack(out)


def test_greedy_equals_step_by_step_argmax(model_and_params):
    model, params = model_and_params
    prompt = "the pigs"
    (text,) = sampling.sample(model, params, VOCAB, prompt, 40, top_k=1)
    step = jax.jit(lambda carry, i: model.apply({"params": params}, carry, jnp.full((1, 1), i)))
    carry, expected = model.initialize_carry(1), prompt
    for i in VOCAB.encode(prompt):
        carry, logits = step(carry, i)
    for _ in range(40):  # feed back each argmax, one character at a time
        next_id = int(jnp.argmax(logits[0, 0]))
        expected += VOCAB.chars[next_id]
        carry, logits = step(carry, next_id)
    assert text == expected[len(prompt) :]


def test_top_k_never_draws_outside_the_k_most_likely(model_and_params):
    model, params = model_and_params
    k, prompt = 3, "animals"
    texts = sampling.sample(model, params, VOCAB, prompt, 30, top_k=k, num_samples=32)
    ids = np.stack([VOCAB.encode(prompt + text) for text in texts])  # [32, len]
    _, logits = jax.jit(model.apply)({"params": params}, model.initialize_carry(32), ids[:, :-1])
    logits = np.asarray(logits[:, len(prompt) - 1 :])  # the logits each drawn id came from
    drawn = ids[:, len(prompt) :]
    drawn_logit = np.take_along_axis(logits, drawn[..., None], axis=-1)
    ranks = (logits > drawn_logit).sum(axis=-1)
    assert ranks.max() < k
    assert len({t for t in texts}) > 1  # the draws do vary


def test_same_seed_same_text_other_seed_other_text(model_and_params):
    model, params = model_and_params
    first = sampling.sample(model, params, VOCAB, "pigs", 80, top_k=5, rng_seed=7)
    again = sampling.sample(model, params, VOCAB, "pigs", 80, top_k=5, rng_seed=7, chunk=17)
    other = sampling.sample(model, params, VOCAB, "pigs", 80, top_k=5, rng_seed=8)
    assert first == again  # chunking does not change the text either
    assert first != other


def test_batched_call_equals_single_stream_calls(model_and_params):
    model, params = model_and_params
    batched = sampling.sample(model, params, VOCAB, "farm", 50, num_samples=4, rng_seed=3)
    keys = sampling.stream_keys(3, 4)
    ids = jnp.asarray(VOCAB.encode("farm")[None])
    for i in range(4):
        carry, logits = sampling.prime(model, params, ids)
        _, _, new = sampling.generate_chunk(
            model, 50, 5, params, carry, logits, keys[i : i + 1], 0, 1.0, 1.0
        )
        assert VOCAB.decode(new[0]) == batched[i]


def test_priming_in_one_scan_equals_one_character_at_a_time(model_and_params):
    model, params = model_and_params
    prompt = "manor farm, chapter"
    _, last_logits = sampling.prime(model, params, jnp.asarray(VOCAB.encode(prompt)[None]))
    np.testing.assert_allclose(last_logits[0], _step_logits(model, params, prompt)[-1], atol=1e-5)


def test_top_p_and_temperature_narrow_the_choice(model_and_params):
    model, params = model_and_params
    greedy = sampling.sample(model, params, VOCAB, "pigs", 40, top_k=1)
    tiny_nucleus = sampling.sample(model, params, VOCAB, "pigs", 40, top_k=30, top_p=1e-6)
    cold = sampling.sample(model, params, VOCAB, "pigs", 40, top_k=30, temperature=1e-4)
    assert tiny_nucleus == greedy and cold == greedy


def test_length_counts_new_characters_and_empty_prompt_starts_a_paragraph(model_and_params):
    model, params = model_and_params
    (text,) = sampling.sample(model, params, VOCAB, "", 25)
    assert len(text) == 25
    assert sampling.sample(model, params, VOCAB, "pigs", 0) == [""]
    empty = sampling.sample(model, params, VOCAB, "", 25, top_k=1)
    newline = sampling.sample(model, params, VOCAB, "\n", 25, top_k=1)
    assert empty == newline


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_k": 0}, r"top_k must lie in \[1, 31\]"),
        ({"top_k": 32}, r"top_k must lie in \[1, 31\]"),
        ({"temperature": 0.0}, "temperature must be a positive number"),
        ({"temperature": float("nan")}, "temperature must be a positive number"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"length": -1}, "length must be a non-negative integer"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"prompt": "pigs€ and 🐖"}, "never saw: '€🐖'"),
        ({"precision": "float16"}, "precision must be one of float32, bfloat16"),
    ],
)
def test_bad_options_give_one_sentence(model_and_params, options, message):
    model, params = model_and_params
    options = dict(options)
    prompt, length = options.pop("prompt", "pigs"), options.pop("length", 10)
    with pytest.raises(sampling.SamplingError, match=message):
        sampling.sample_chunks(model, params, VOCAB, prompt, length, **options)


def test_drop_unknown_leaves_them_out(model_and_params):
    model, params = model_and_params
    dropped = sampling.sample(model, params, VOCAB, "pi€gs", 20, top_k=1, drop_unknown=True)
    assert dropped == sampling.sample(model, params, VOCAB, "pigs", 20, top_k=1)
    only_unknown = sampling.sample(model, params, VOCAB, "€", 20, top_k=1, drop_unknown=True)
    assert only_unknown == sampling.sample(model, params, VOCAB, "", 20, top_k=1)


@pytest.fixture(scope="module")
def phrase_run(tmp_path_factory):
    """A tiny model overfit on a repeated phrase, trained for three epochs."""
    from charlstm_jax.config import get_config

    tmp = tmp_path_factory.mktemp("phrase")
    (tmp / "phrase.txt").write_text("the pigs rule the farm. " * 120)
    config = get_config()
    config.update(num_layers=1, hidden_size=32, epochs=3, batch_size=4, window=16)
    config.update(learning_rate=1e-2, validation_counts=5, drop_prob=0.0)
    config.data_path = str(tmp / "phrase.txt")
    train_and_evaluate(config, tmp / "run")
    return tmp / "run"


def test_overfit_model_reproduces_its_phrase_greedily(phrase_run):
    loaded = checkpoint.load_checkpoint(phrase_run)
    assert loaded.epoch == 3
    (text,) = sampling.sample(loaded.model, loaded.params, loaded.vocab, "the pigs", 48, top_k=1)
    assert text == (" rule the farm. the pigs" * 2)


def test_bfloat16_products_stay_close_to_float32(model_and_params):
    model, params = model_and_params
    fast_model, fast_params = sampling.with_precision(model, params, "bfloat16")
    kernel = fast_params["lstm_1"]["recurrence"]["cell"]["recurrent_kernel"]
    assert kernel.dtype == jnp.bfloat16 and fast_params["head"]["kernel"].dtype == jnp.float32
    ids = jnp.asarray(VOCAB.encode("the pigs rule the farm, and the dogs")[None])
    _, exact = sampling.prime(model, params, ids)
    _, fast = sampling.prime(fast_model, fast_params, ids)
    assert fast.dtype == jnp.float32
    difference = float(jnp.max(jnp.abs(fast - exact)))
    assert 0 < difference < 0.1 * float(jnp.std(exact))  # rounded, yet the same distribution


def test_bfloat16_sampler_reproduces_the_phrase(phrase_run):
    loaded = checkpoint.load_checkpoint(phrase_run)
    (text,) = sampling.sample(
        loaded.model, loaded.params, loaded.vocab, "the pigs", 48, top_k=1, precision="bfloat16"
    )
    assert text == (" rule the farm. the pigs" * 2)


def test_bfloat16_model_refuses_to_train(model_and_params):
    model, params = model_and_params
    fast_model, fast_params = sampling.with_precision(model, params, "bfloat16")
    with pytest.raises(ValueError, match="product_dtype is for sampling only"):
        fast_model.apply(
            {"params": fast_params},
            fast_model.initialize_carry(1),
            jnp.zeros((1, 3), int),
            train=True,
            rngs={"dropout": jax.random.key(0)},
        )


def _sample_cli(*args):
    return run_script("sample.py", *args, cwd=None)


def test_cli_samples_each_epoch_and_reports_missing_ones(phrase_run):
    result = _sample_cli(
        "--workdir", str(phrase_run), "--epoch", "all", "--prompt", "the", "--top_k", "1",
        "--length", "21",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for epoch in (1, 2, 3):
        assert f"=== epoch {epoch} ===" in result.stdout
    assert "the farm. the pigs rule" in result.stdout
    one = _sample_cli(
        "--workdir", str(phrase_run / "checkpoints" / "epochs" / "2"), "--length", "45",
        "--prompt", "the", "--top_k", "1", "--report_novelty",
    )  # fmt: skip
    assert one.returncode == 0 and one.stdout.startswith("the farm. the pigs")
    # The overfit model copies its training text: every 20-character piece occurs in it.
    assert "[novelty: longest copied substring: 45 characters" in one.stdout
    assert "100% of its 26 20-character pieces occur in the training text" in one.stdout
    missing = _sample_cli("--workdir", str(phrase_run), "--epoch", "9")
    assert missing.returncode == 2
    assert (
        "No checkpoint for epoch 9" in missing.stderr
        and "epochs present: 1, 2, 3" in missing.stderr
    )
    assert "Traceback" not in missing.stderr
    nowhere = _sample_cli("--workdir", str(phrase_run / "nothing"))
    assert nowhere.returncode == 2 and "No checkpoints at" in nowhere.stderr
