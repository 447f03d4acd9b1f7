"""The reference run of "LSTM Writes Animal Farm": its hyper-parameters exactly."""

from charlstm_jax.config import get_config as base_config


def get_config():
    """2 x 512 LSTM, 30 epochs of 16 streams x 100 characters, Adam 1e-3, clip 5, dropout 0.5."""
    config = base_config()
    config.corpus = "animal_farm"
    return config
