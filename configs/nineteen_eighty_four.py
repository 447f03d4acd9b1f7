"""The reference's bonus model: the same hyper-parameters, trained on *1984*."""

from charlstm_jax.config import get_config as base_config


def get_config():
    """The reference configuration on George Orwell's *1984*."""
    config = base_config()
    config.corpus = "1984"
    return config
