"""Config values out of range are refused in one sentence, before anything compiles."""

import pytest

from charlstm_jax.config import ConfigError, get_config, validate_config


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_size", 0, "config.hidden_size must be a positive integer"),
        ("num_layers", -1, "config.num_layers must be a positive integer"),
        ("batch_size", 2.5, "config.batch_size must be a positive integer"),
        ("window", 0, "config.window must be a positive integer"),
        ("epochs", 0, "config.epochs must be a positive integer"),
        ("validation_counts", 0, "config.validation_counts must be a positive integer"),
        ("validation_split", 0.0, r"config.validation_split must lie in \(0, 1\)"),
        ("validation_split", 1.0, r"config.validation_split must lie in \(0, 1\)"),
        ("drop_prob", 1.0, r"config.drop_prob must lie in \[0, 1\)"),
        ("drop_prob", -0.1, r"config.drop_prob must lie in \[0, 1\)"),
        ("clip", 0.0, "config.clip must be positive"),
        ("learning_rate", -1e-3, "config.learning_rate must be positive"),
        ("weight_drop", 1.0, r"config.weight_drop must lie in \[0, 1\)"),
        ("embed_drop", -0.5, r"config.embed_drop must lie in \[0, 1\)"),
        ("weight_decay", -1.0, "config.weight_decay must be 0 or more"),
        ("lr_schedule", "linear", "config.lr_schedule must be 'constant' or 'cosine'"),
        ("min_lr_fraction", 2.0, r"config.min_lr_fraction must lie in \[0, 1\]"),
        ("patience", -1, r"config.patience must be 0 \(off\) or more"),
        ("patience", 1.5, "config.patience must be an integer"),
    ],
)
def test_out_of_range_values(key, value, message):
    config = get_config()
    with config.ignore_type():
        config[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_unknown_key_is_named():
    config = get_config()
    config.hiden_size = 3
    with pytest.raises(ConfigError, match="Unknown config key.*hiden_size"):
        validate_config(config)


def test_reference_configs_are_valid():
    from configs import animal_farm, animal_farm_tuned, nineteen_eighty_four, tiny

    reference = animal_farm.get_config()
    validate_config(reference)
    assert (reference.num_layers, reference.hidden_size, reference.epochs) == (2, 512, 30)
    assert (reference.batch_size, reference.window, reference.learning_rate) == (16, 100, 1e-3)
    assert (reference.clip, reference.validation_split, reference.drop_prob) == (5, 0.1, 0.5)
    assert reference.validation_counts == 10
    validate_config(nineteen_eighty_four.get_config())
    validate_config(tiny.get_config())
    tuned = animal_farm_tuned.get_config()
    validate_config(tuned)
    # The tuned model is the reference's network: only regularisation and schedule differ.
    assert (tuned.num_layers, tuned.hidden_size, tuned.window) == (2, 512, 100)
    # The reference's run uses none of the additions.
    assert not reference.variational_dropout and reference.weight_drop == 0
    assert reference.embed_drop == 0 and reference.weight_decay == 0
    assert reference.lr_schedule == "constant" and reference.patience == 0
