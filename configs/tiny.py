"""A tiny model for tests and a first try on a laptop: seconds per epoch on a CPU."""

from charlstm_jax.config import get_config as base_config


def get_config():
    """1 x 32 LSTM on 4 streams of 16 characters, 2 epochs, validation every 5 steps."""
    config = base_config()
    config.num_layers = 1  # one layer: no between-layer dropout
    config.hidden_size = 32
    config.epochs = 2
    config.batch_size = 4
    config.window = 16
    config.learning_rate = 1e-2  # a small model learns fast at a larger rate
    config.validation_counts = 5
    config.drop_prob = 0.0
    return config
