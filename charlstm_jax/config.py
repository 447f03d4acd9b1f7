"""The base configuration (the reference run's hyper-parameters) and the checks of its values."""

import ml_collections

from charlstm_jax.errors import UserError


def get_config() -> ml_collections.ConfigDict:
    """The reference run of "LSTM Writes Animal Farm"; every configs/*.py starts from this."""
    config = ml_collections.ConfigDict()
    # Data.
    config.corpus = "animal_farm"  # a known corpus (see data.CORPORA), fetched into data_dir
    config.data_path = ""  # any UTF-8 text file; when set it replaces `corpus`
    config.data_dir = "data"  # where known corpora are looked for and downloaded to
    config.validation_split = 0.1  # the tail of the text that validates, as the reference
    # Model: the reference's nn.LSTM(vocab, 512, num_layers=2, dropout=0.5) + Linear.
    config.num_layers = 2
    config.hidden_size = 512
    config.drop_prob = 0.5  # between layers and on the top layer's outputs
    # Regularisation beyond the reference (AWD-LSTM's); the defaults leave the reference's model.
    config.variational_dropout = False  # True: drop_prob's mask is the same at every time step
    config.weight_drop = 0.0  # DropConnect on the recurrent kernels, one mask per batch
    config.embed_drop = 0.0  # drops whole characters from the first layer's input
    # Training: the reference's Adam with global-norm clipping, truncated BPTT over windows.
    config.epochs = 30
    config.batch_size = 16  # rows of the stateful streams
    config.window = 100  # characters per row per step (the BPTT length)
    config.learning_rate = 1e-3
    config.clip = 5.0  # max global gradient norm
    config.weight_decay = 0.0  # > 0: AdamW's decoupled decay of the kernels (not the biases)
    config.lr_schedule = "constant"  # or "cosine": decay to lr * min_lr_fraction over the epochs
    config.min_lr_fraction = 0.0
    config.patience = 0  # > 0: stop when validation has not improved for this many epochs
    config.validation_counts = 10  # steps between validation passes and log lines
    config.seed = 0  # params init and dropout keys
    config.skip_nonfinite = False  # False: stop on a non-finite loss; True: skip such updates
    # Engine.
    config.fused_backward = True  # hand-written LSTM backward pass (same gradients, faster)
    # Time steps per loop iteration in the scans: with the feature-major layout, 1 made the
    # train step about 5% faster than 2 on a 2-core CPU (the validation pass 2% slower).
    config.unroll = 1
    # The compiled CPU kernel for the LSTM cell's step (charlstm_jax/cell_kernel.py), where it
    # applies (CPU backend, hidden size a multiple of 16); False: XLA's loop, slower. Results
    # differ between the two by float rounding only.
    config.cell_kernel = True
    return config


_POSITIVE_INTS = (
    "num_layers",
    "hidden_size",
    "epochs",
    "batch_size",
    "window",
    "validation_counts",
    "unroll",
)


class ConfigError(UserError):
    """A configuration value is out of range; the message says which and what to do."""


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise `ConfigError` with one clear sentence for the first out-of-range value."""
    known = set(get_config().keys())
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(unknown)}; "
            f"known keys are {', '.join(sorted(known))}."
        )
    for key in _POSITIVE_INTS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{key} must be a positive integer, got {value!r}.")
    if not 0.0 < config.validation_split < 1.0:
        raise ConfigError(
            f"config.validation_split must lie in (0, 1), got {config.validation_split!r}."
        )
    for key in ("drop_prob", "weight_drop", "embed_drop"):
        if not 0.0 <= config[key] < 1.0:
            raise ConfigError(f"config.{key} must lie in [0, 1), got {config[key]!r}.")
    if not 0.0 <= config.min_lr_fraction <= 1.0:
        raise ConfigError(
            f"config.min_lr_fraction must lie in [0, 1], got {config.min_lr_fraction!r}."
        )
    if not config.weight_decay >= 0:
        raise ConfigError(f"config.weight_decay must be 0 or more, got {config.weight_decay!r}.")
    if config.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(
            f"config.lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}."
        )
    if isinstance(config.patience, bool) or not isinstance(config.patience, int):
        raise ConfigError(f"config.patience must be an integer, got {config.patience!r}.")
    if config.patience < 0:
        raise ConfigError(f"config.patience must be 0 (off) or more, got {config.patience!r}.")
    if not config.clip > 0:
        raise ConfigError(f"config.clip must be positive, got {config.clip!r}.")
    if not config.learning_rate > 0:
        raise ConfigError(f"config.learning_rate must be positive, got {config.learning_rate!r}.")
    if not config.data_path and not config.corpus:
        raise ConfigError("Set config.data_path to a text file or config.corpus to a known corpus.")
