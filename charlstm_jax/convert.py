"""Between the PyTorch reference and our params: the weight mapping both ways, and the import of
the reference's training checkpoints into a run directory that sampling reads.

Shapes: `V` vocabulary, `H` hidden size, `D` a layer's input size (`V` for the first layer,
`H` above it), `L` layers. PyTorch's `nn.LSTM` keeps, per layer `k`, `weight_ih_lk[4H, D]`,
`weight_hh_lk[4H, H]`, `bias_ih_lk[4H]` and `bias_hh_lk[4H]`; `nn.Linear` keeps
`weight[V, H]` and `bias[V]`. Both frameworks order the gates input, forget, cell, output along
the `4H` axis, and our layers keep PyTorch's two biases (summed once inside the layer), so the
mapping is transposes and copies:

    lstm_k.input_kernel[D, 4H]                    = weight_ih_lk.T
    lstm_k.recurrence.cell.recurrent_kernel[H, 4H] = weight_hh_lk.T
    lstm_k.input_bias[4H], lstm_k.recurrent_bias  = bias_ih_lk, bias_hh_lk
    head.kernel[H, V], head.bias[V]               = fc.weight.T, fc.bias

The reference feeds one-hot vectors, so `one_hot(id) @ weight_ih_l0.T` is row `id` of
`input_kernel`: our row gather is the same function. Keeping both biases (not their sum) makes
Adam and global-norm clipping act on the same parameters as the reference's, so a training
step lands on the same weights.

The reference numbers its characters in the order of a Python `set`; ours are sorted. The
mapping takes `reference_ids[V]`, the reference's id of each of our characters, and permutes the
rows of the first input kernel and of the head so that every character keeps its weights.

torch is imported only inside the functions that need it: the package's core does not need it.
"""

import collections
import dataclasses
import hashlib
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from charlstm_jax import checkpoint, data
from charlstm_jax.config import get_config, validate_config
from charlstm_jax.errors import UserError

# The keys of the reference's checkpoint dict and of its hyper-parameters dict.
CHECKPOINT_KEYS = ("parameters", "model", "tokens")
HYPER_PARAMETERS = (
    "num_layers",
    "hidden_size",
    "epochs",
    "batch_size",
    "window",
    "learning_rate",
    "clip",
    "validation_split",
    "drop_prob",
    "validation_counts",
)

# A stand-in for the reference's `rnn.loader.Tokens`, so its checkpoints load without its code.
Tokens = collections.namedtuple("Tokens", ["int_to_chars", "chars_to_int", "tokens"])


class ConversionError(UserError):
    """A file is not a checkpoint of the PyTorch reference, or does not fit a run directory."""


def _numpy(x) -> np.ndarray:
    """A float32 numpy copy of a torch tensor or an array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _num_layers(state_dict) -> int:
    layers = 0
    while f"lstm.weight_ih_l{layers}" in state_dict:
        layers += 1
    return layers


def flax_from_torch_state_dict(state_dict, reference_ids=None) -> dict:
    """Our params tree from the reference's `state_dict` (`lstm.*`, `fc.*`; tensors or arrays).

    `reference_ids[V]`: the reference's id of each of our ids (identity when None). Works on
    gradients too (a dict of `.grad`s under the same names).
    """
    names = ["fc.weight", "fc.bias"]
    num_layers = _num_layers(state_dict)
    for k in range(num_layers):
        names += [f"lstm.{w}_l{k}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    missing = [n for n in names if n not in state_dict]
    unknown = sorted(set(state_dict) - set(names))
    if num_layers == 0:
        missing.append("lstm.weight_ih_l0")
    if missing or unknown:
        raise ConversionError(
            "The weights are not those of the reference's nn.LSTM + nn.Linear model (missing "
            f"{', '.join(missing) or 'none'}; unexpected {', '.join(unknown) or 'none'}); "
            "convert a checkpoint of the reference's LSTMModel."
        )
    w = {n: _numpy(state_dict[n]) for n in names}
    if w["fc.weight"].ndim != 2 or w["fc.bias"].shape != w["fc.weight"].shape[:1]:
        raise ConversionError(
            f"The output layer's weights have shapes {list(w['fc.weight'].shape)} and "
            f"{list(w['fc.bias'].shape)}, not [V, H] and [V]; the checkpoint is damaged or not "
            "of the reference's model."
        )
    vocab_size, hidden_size = w["fc.weight"].shape
    reference_ids = np.arange(vocab_size) if reference_ids is None else np.asarray(reference_ids)
    if len(reference_ids) != vocab_size:
        raise ConversionError(
            f"The vocabulary has {len(reference_ids)} characters but the output layer "
            f"{vocab_size}; the checkpoint is damaged."
        )
    params = {}
    for k in range(num_layers):
        input_size = vocab_size if k == 0 else hidden_size
        shapes = {
            f"lstm.weight_ih_l{k}": (4 * hidden_size, input_size),
            f"lstm.weight_hh_l{k}": (4 * hidden_size, hidden_size),
            f"lstm.bias_ih_l{k}": (4 * hidden_size,),
            f"lstm.bias_hh_l{k}": (4 * hidden_size,),
        }
        for name, shape in shapes.items():
            if w[name].shape != shape:
                raise ConversionError(
                    f"The weight {name} has shape {list(w[name].shape)}, not the {list(shape)} "
                    f"of a {num_layers}-layer LSTM of {hidden_size} units over {vocab_size} "
                    "characters; the checkpoint is damaged or not of the reference's model."
                )
        input_kernel = w[f"lstm.weight_ih_l{k}"].T
        if k == 0:  # our character j is the reference's character reference_ids[j]
            input_kernel = input_kernel[reference_ids]
        params[f"lstm_{k}"] = {
            "input_kernel": input_kernel,
            "input_bias": w[f"lstm.bias_ih_l{k}"],
            "recurrent_bias": w[f"lstm.bias_hh_l{k}"],
            "recurrence": {"cell": {"recurrent_kernel": w[f"lstm.weight_hh_l{k}"].T}},
        }
    params["head"] = {
        "kernel": w["fc.weight"][reference_ids].T,
        "bias": w["fc.bias"][reference_ids],
    }
    return jax.tree_util.tree_map(jnp.asarray, params)


def torch_state_dict_from_flax(params, reference_ids=None) -> dict:
    """The reference's `state_dict` (torch tensors) from our params tree.

    `reference_ids[V]`: the reference's id of each of our ids (identity when None).
    """
    import torch

    def tensor(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    head_kernel = np.asarray(params["head"]["kernel"])
    vocab_size = head_kernel.shape[1]
    order = np.arange(vocab_size) if reference_ids is None else np.asarray(reference_ids)
    state_dict = {}
    for k in range(sum(1 for name in params if name.startswith("lstm_"))):
        layer = params[f"lstm_{k}"]
        input_kernel = np.asarray(layer["input_kernel"])
        if k == 0:  # row j is our character j: put it at the reference's id of that character
            reordered = np.empty_like(input_kernel)
            reordered[order] = input_kernel
            input_kernel = reordered
        state_dict[f"lstm.weight_ih_l{k}"] = tensor(input_kernel.T)
        state_dict[f"lstm.weight_hh_l{k}"] = tensor(
            np.asarray(layer["recurrence"]["cell"]["recurrent_kernel"]).T
        )
        state_dict[f"lstm.bias_ih_l{k}"] = tensor(layer["input_bias"])
        state_dict[f"lstm.bias_hh_l{k}"] = tensor(layer["recurrent_bias"])
    fc_weight = np.empty((vocab_size, head_kernel.shape[0]), np.float32)
    fc_weight[order] = head_kernel.T
    fc_bias = np.empty(vocab_size, np.float32)
    fc_bias[order] = np.asarray(params["head"]["bias"])
    state_dict["fc.weight"], state_dict["fc.bias"] = tensor(fc_weight), tensor(fc_bias)
    return state_dict


@dataclasses.dataclass(frozen=True)
class ReferenceCheckpoint:
    """What a checkpoint of the reference's training holds, as plain Python and numpy."""

    hyper_parameters: dict  # the reference's `parameters` dict
    state_dict: dict  # name -> float32 array, the reference's LSTMModel weights
    int_to_chars: dict  # reference id -> character
    tokens: np.ndarray | None  # [num_chars] reference ids of the whole text, if present


def _safe_globals() -> list:
    """What unpickling may build besides torch's tensors: the stand-in Tokens and an int array.

    numpy 1.x wrote `numpy.core.multiarray._reconstruct`, numpy 2 `numpy._core...`: both names
    lead to the same function. Only integer dtypes may be built, as the tokens array needs.
    """
    reconstruct = np._core.multiarray._reconstruct
    integer_dtypes = {type(np.dtype(code)) for code in np.typecodes["AllInteger"]}
    return [
        (Tokens, "rnn.loader.Tokens"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *sorted(integer_dtypes, key=lambda t: t.__name__),
    ]


def _load(path: Path):
    """`torch.load` with torch's weights-only unpickler: no other global is ever imported."""
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not for users
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused or "unrecognized function" in str(error) or "allowlisted" in str(error):
            what = f" ({refused.group(1)})" if refused else ""
            raise ConversionError(
                f"{path} holds a Python object{what} that a checkpoint of the PyTorch reference "
                "does not, so it was refused unread (unpickling it could run code); convert only "
                "checkpoints written by the reference's training script."
            ) from None
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint (torch.load cannot read it); give a .pt file "
            "written by the reference's training script."
        ) from None
    except Exception as error:  # a zip that is not torch's, an empty or truncated file
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint (torch.load: {type(error).__name__}); give a "
            ".pt file written by the reference's training script."
        ) from None


def read_reference_checkpoint(path: str | Path) -> ReferenceCheckpoint:
    """Read a checkpoint written by the reference's training script, without its code.

    The file is a `torch.save`d dict: `parameters` (hyper-parameters), `model` (the LSTMModel's
    state_dict) and `tokens` (the pickled `rnn.loader.Tokens`); nothing else is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(
            f"No file at {path}: give the path of a checkpoint written by the PyTorch "
            "reference's training script (--checkpoint)."
        )
    raw = _load(path)
    if not isinstance(raw, dict) or any(key not in raw for key in CHECKPOINT_KEYS):
        found = ", ".join(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise ConversionError(
            f"{path} is a PyTorch file but not a checkpoint of the reference: it should hold "
            f"the keys {', '.join(CHECKPOINT_KEYS)}, and holds {found or 'nothing'}."
        )
    hyper_parameters, model, tokens = (raw[key] for key in CHECKPOINT_KEYS)
    if not isinstance(hyper_parameters, dict):
        raise ConversionError(
            f"{path}: 'parameters' should be the reference's hyper-parameters dict, "
            f"not a {type(hyper_parameters).__name__}; the checkpoint is not the reference's."
        )
    if not isinstance(model, dict) or not all(hasattr(v, "shape") for v in model.values()):
        raise ConversionError(
            f"{path}: 'model' should be the state_dict of the reference's LSTMModel; the "
            "checkpoint is not the reference's."
        )
    if not isinstance(tokens, Tokens):
        raise ConversionError(
            f"{path}: 'tokens' should be the reference's Tokens(int_to_chars, chars_to_int, "
            f"tokens), not a {type(tokens).__name__}; the checkpoint is not the reference's."
        )
    int_to_chars = tokens.int_to_chars
    if (
        not isinstance(int_to_chars, dict)
        or sorted(int_to_chars) != list(range(len(int_to_chars)))
        or not all(isinstance(c, str) and len(c) == 1 for c in int_to_chars.values())
        or len(set(int_to_chars.values())) != len(int_to_chars)
    ):
        raise ConversionError(
            f"{path}: the vocabulary int_to_chars should map the ids 0..V-1 to V distinct "
            "characters; the checkpoint is damaged or not the reference's."
        )
    ids = None if tokens.tokens is None else np.asarray(tokens.tokens)
    if ids is not None and (
        not np.issubdtype(ids.dtype, np.integer)
        or ids.ndim != 1
        or (ids.size and (ids.min() < 0 or ids.max() >= len(int_to_chars)))
    ):
        raise ConversionError(
            f"{path}: the tokens should be the text's ids, integers in 0..{len(int_to_chars) - 1}"
            "; the checkpoint is damaged or not the reference's."
        )
    return ReferenceCheckpoint(
        hyper_parameters=dict(hyper_parameters),
        state_dict={name: _numpy(value) for name, value in model.items()},
        int_to_chars=dict(int_to_chars),
        tokens=ids,
    )


def reference_order(int_to_chars: dict) -> tuple[data.Vocab, np.ndarray]:
    """Our sorted `Vocab` of the reference's characters, and `reference_ids[V]`: the reference's
    id of each of our ids."""
    vocab = data.Vocab(int_to_chars.values())
    chars_to_int = {char: ref_id for ref_id, char in int_to_chars.items()}
    return vocab, np.array([chars_to_int[char] for char in vocab.chars])


def _config_from(hyper_parameters: dict, num_layers: int, hidden_size: int, path: Path):
    """Our config: `get_config()` with the reference's hyper-parameters (use_gpu has no use)."""
    config = get_config()
    for key in HYPER_PARAMETERS:
        if key not in hyper_parameters:
            continue
        value, default = hyper_parameters[key], config[key]
        try:
            config[key] = type(default)(value)
        except (TypeError, ValueError):
            raise ConversionError(
                f"{path}: the hyper-parameter {key}={value!r} is not a {type(default).__name__}; "
                "the checkpoint is damaged or not the reference's."
            ) from None
    for key, found in (("num_layers", num_layers), ("hidden_size", hidden_size)):
        if key in hyper_parameters and config[key] != found:
            raise ConversionError(
                f"{path}: its parameters say {key}={config[key]} but its weights have {found}; "
                "the checkpoint is damaged."
            )
        config[key] = found
    config.data_path = ""
    try:
        validate_config(config)
    except UserError as error:
        raise ConversionError(f"{path}: {error}") from None
    return config


def _corpus_of(text: str | None) -> tuple[str, str]:
    """`(corpus name, sha256)` of the reference's text: a known corpus when the text is one.

    The text was read with universal newlines, so a corpus with CRLF line ends (Animal Farm)
    is recognised through its CRLF form too. Unknown texts keep the base config's corpus.
    """
    if text is None:
        return get_config().corpus, ""
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    crlf = hashlib.sha256(text.replace("\n", "\r\n").encode("utf-8")).hexdigest()
    for name, corpus in data.CORPORA.items():
        if corpus.sha256 in (sha256, crlf):
            return name, sha256
    return get_config().corpus, sha256


def _epoch_of(path: Path, epochs: int) -> int:
    """The epoch in a file name such as `model_7.pt`, else the run's last epoch (`final`)."""
    match = re.search(r"(\d+)$", path.stem)
    if match and 1 <= int(match.group(1)) <= epochs:
        return int(match.group(1))
    return epochs


def _check_workdir(workdir: Path, config, vocab: data.Vocab, epoch: int) -> None:
    """A workdir is new, or a conversion of the same reference run without this epoch yet."""
    config_path = workdir / "config.json"
    if not config_path.exists():
        if (workdir / checkpoint.EPOCHS).exists():
            raise ConversionError(
                f"{workdir} already holds checkpoints but no config.json; choose a new --workdir."
            )
        return
    saved = json.loads(config_path.read_text())
    same = all(saved.get(k) == config[k] for k in ("num_layers", "hidden_size"))
    vocab_path = workdir / "vocab.json"
    if not same or not vocab_path.exists() or data.Vocab.load(vocab_path) != vocab:
        raise ConversionError(
            f"{workdir} holds a run of another model or vocabulary; choose a new --workdir."
        )
    epoch_dir = workdir / checkpoint.EPOCHS / str(epoch)
    if epoch_dir.exists():
        raise ConversionError(
            f"{workdir} already has a checkpoint of epoch {epoch}; delete {epoch_dir} to "
            "convert it again, or choose a new --workdir."
        )


def convert_checkpoint(checkpoint_path: str | Path, workdir: str | Path) -> dict:
    """Convert a reference checkpoint into the run directory `workdir`, as training writes it.

    Writes `checkpoints/epochs/<epoch>/` (params and meta), `config.json` and `vocab.json`;
    more epochs of the same reference run may be converted into the same workdir. Returns
    `{"workdir", "epoch", "vocab_size", "corpus"}`.
    """
    checkpoint_path, workdir = Path(checkpoint_path), Path(workdir)
    reference = read_reference_checkpoint(checkpoint_path)
    vocab, reference_ids = reference_order(reference.int_to_chars)
    try:
        params = flax_from_torch_state_dict(reference.state_dict, reference_ids)
    except ConversionError as error:
        raise ConversionError(f"{checkpoint_path}: {error}") from None
    hidden_size = params["head"]["kernel"].shape[0]
    config = _config_from(
        reference.hyper_parameters, _num_layers(reference.state_dict), hidden_size, checkpoint_path
    )
    text = None
    if reference.tokens is not None:
        text = "".join(reference.int_to_chars[int(i)] for i in reference.tokens)
    config.corpus, corpus_sha256 = _corpus_of(text)
    epoch = _epoch_of(checkpoint_path, config.epochs)
    _check_workdir(workdir, config, vocab, epoch)

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    vocab.save(workdir / "vocab.json")
    meta = {
        "config": config.to_dict(),
        "vocab": list(vocab.chars),
        "corpus_sha256": corpus_sha256,
        "corpus_path": "",
        "epoch": epoch,
        "step": 0,  # the reference does not record its step count
        "valid_loss": None,
        "source": str(checkpoint_path.absolute()),
    }
    checkpoints = checkpoint.RunCheckpoints(workdir)
    try:
        checkpoints.save_epoch(epoch, params, meta)
        checkpoints.wait()
    finally:
        checkpoints.close()
    logging.info(
        "Converted %s (epoch %d, %d x %d, %d characters) into %s.",
        checkpoint_path,
        epoch,
        config.num_layers,
        config.hidden_size,
        len(vocab),
        workdir,
    )
    return {
        "workdir": str(workdir),
        "epoch": epoch,
        "vocab_size": len(vocab),
        "corpus": config.corpus,
    }
