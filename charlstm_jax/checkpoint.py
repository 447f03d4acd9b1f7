"""Orbax checkpoints of a run directory (the only module that imports orbax).

    <workdir>/checkpoints/epochs/<epoch>/  params + meta, one per epoch, all kept
    <workdir>/checkpoints/best/<epoch>/    a copy of the epoch with the lowest validation loss
    <workdir>/checkpoints/state/<step>/    params + training state + meta, the latest two

`meta` is JSON: the config, the vocabulary, the corpus's sha256, the epoch and step, and a
sha256 of the saved arrays, so a damaged checkpoint is detected instead of giving wrong weights.
Everything sampling needs is in each checkpoint; the training state (optimizer state, carry,
position in the epoch) is what a resumed run needs on top.
"""

import hashlib
import logging as std_logging
import math
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from charlstm_jax import parallel
from charlstm_jax.data import Vocab
from charlstm_jax.errors import UserError
from charlstm_jax.model import CharLSTM, model_from_config

EPOCHS = "checkpoints/epochs"
BEST = "checkpoints/best"
STATE = "checkpoints/state"
_DIRS = {"epoch": EPOCHS, "best": BEST, "state": STATE}


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for; the message names what was looked for."""


def tree_sha256(tree) -> str:
    """A sha256 over a tree's arrays (shapes, dtypes and bytes, in tree order)."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        array = parallel.to_host(leaf)  # the whole array, however it is split over devices
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _manager(directory: Path, max_to_keep: int | None, read_only: bool):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        # Processes meet at barriers named by step: the managers' steps overlap (epoch 2 and
        # best 2 are written at once), so each manager names its own.
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name
        ),
    )
    return ocp.CheckpointManager(
        directory.absolute(), options=options, item_names=("params", "state", "meta")
    )


def _restore_args(abstract_params, abstract_state=None):
    items = {
        "params": ocp.args.StandardRestore(abstract_params),
        "meta": ocp.args.JsonRestore(),
    }
    if abstract_state is not None:
        items["state"] = ocp.args.StandardRestore(abstract_state)
    return ocp.args.Composite(**items)


class _FailedReadEchoes(std_logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of orbax's array reads.

    Of a read's task ("Task exception ...") or of the `gather` that awaited it
    ("_GatheringFuture exception ...", where only the traceback names the read).
    """

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message.partition("\n")[0]:
            return True
        details = message
        if record.exc_info:
            details += "".join(traceback.format_exception(*record.exc_info))
        return "_read_array_index" not in details and "_read_shard" not in details


_FAILED_READ_ECHOES = _FailedReadEchoes()  # one instance: adding it again changes nothing


def _silence_failed_read_echoes() -> None:
    """Drop the echoes of a failed restore, from now on in this process (installed once).

    When one array of a damaged checkpoint cannot be read, the reads still pending fail again
    in orbax's threads as its event loop closes (then or at exit), and Python would print each
    as an "Exception ignored" traceback, or asyncio would log it as a task exception never
    retrieved, after our one-sentence error. Only those echoes are dropped; any other
    unraisable exception goes to the previous hook, any other asyncio report is logged.
    """
    std_logging.getLogger("asyncio").addFilter(_FAILED_READ_ECHOES)
    previous = sys.unraisablehook
    if getattr(previous, "charlstm_jax_filter", False):
        return

    def hook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "loop is closed" in str(
            unraisable.exc_value
        )
        if not (closed_loop or "_read_array_index" in repr(unraisable.object)):
            previous(unraisable)

    hook.charlstm_jax_filter = True
    sys.unraisablehook = hook


class RunCheckpoints:
    """The checkpoints of one run directory: every epoch's weights and the latest state."""

    def __init__(self, workdir: str | Path, read_only: bool = False):
        self.workdir = Path(workdir)
        self.read_only = read_only
        self._managers = {
            "epoch": _manager(self.workdir / EPOCHS, None, read_only),
            "best": _manager(self.workdir / BEST, 1, read_only),
            "state": _manager(self.workdir / STATE, 2, read_only),
        }
        self._epochs = self._managers["epoch"]
        self._state = self._managers["state"]

    def epochs(self) -> list[int]:
        """The epochs that have a complete checkpoint, ascending."""
        return sorted(self._epochs.all_steps())

    def best(self, before: int | None = None) -> tuple[int, float] | None:
        """`(epoch, validation loss)` of the best epoch (of those before epoch `before`), or
        None when there is none.

        It is the best checkpoint's; a run that has none (trained before they were kept), or
        whose best is not before `before`, gets the lowest validation loss of its epochs.
        """
        kept = sorted(self._managers["best"].all_steps())
        if kept and (before is None or kept[-1] < before):
            return kept[-1], self.read_meta("best", kept[-1])["valid_loss"]
        losses = {}
        for epoch in self.epochs():
            if before is None or epoch < before:
                loss = self.read_meta("epoch", epoch).get("valid_loss")
                if loss is not None and math.isfinite(loss):
                    losses[epoch] = loss
        if not losses:
            return None
        epoch = min(losses, key=losses.get)
        return epoch, losses[epoch]

    def has_best_copy(self, epoch: int) -> bool:
        """Whether `checkpoints/best/` holds epoch `epoch`."""
        return epoch in self._managers["best"].all_steps()

    def state_steps(self) -> list[int]:
        """The steps that have a complete training-state checkpoint, ascending."""
        return sorted(self._state.all_steps())

    def save_epoch(self, epoch: int, params, meta: dict) -> None:
        """Keep epoch `epoch`'s weights with `meta` (written in the background).

        An existing checkpoint of that epoch is replaced: it belongs to a run that died before
        its next training state was saved, and has just been trained again from that state.
        """
        meta = dict(meta, params_sha256=tree_sha256(params))
        self._replace(self._epochs, epoch)
        self._epochs.save(
            epoch,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
            ),
        )

    def save_best(self, epoch: int, params, meta: dict) -> None:
        """Keep epoch `epoch`'s weights as the best so far (the previous best is deleted)."""
        meta = dict(meta, params_sha256=tree_sha256(params))
        manager = self._managers["best"]
        self._replace(manager, epoch)
        manager.save(
            epoch,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def save_state(self, step: int, params, state, meta: dict) -> None:
        """Keep the full training state at global step `step` (written in the background).

        An existing checkpoint of that step (a damaged one that resuming fell back from) is
        replaced.
        """
        meta = dict(meta, params_sha256=tree_sha256(params), state_sha256=tree_sha256(state))
        self._replace(self._state, step)
        self._state.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    @staticmethod
    def _replace(manager, step: int) -> None:
        if step in manager.all_steps():
            manager.wait_until_finished()
            manager.delete(step)

    def wait(self) -> None:
        """Block until every checkpoint write has finished."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        """Finish the writes and release the managers."""
        for manager in self._managers.values():
            manager.close()

    def _where(self, kind: str, step: int) -> Path:
        return self.workdir / _DIRS[kind] / str(step)

    def read_meta(self, kind: str, step: int) -> dict:
        """The JSON meta of a checkpoint (`kind` is "epoch", "best" or "state")."""
        manager = self._managers[kind]
        where = self._where(kind, step)
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(meta["meta"])
        except Exception as error:
            raise CheckpointError(
                f"The checkpoint {where} is damaged: its meta could not be read "
                f"({type(error).__name__}); delete that directory to use an earlier one."
            ) from None

    def _restore(self, kind: str, step: int, abstract_params, abstract_state=None):
        manager = self._managers[kind]
        where = self._where(kind, step)
        _silence_failed_read_echoes()
        try:
            restored = manager.restore(step, args=_restore_args(abstract_params, abstract_state))
        except Exception as error:
            raise CheckpointError(
                f"The checkpoint {where} is damaged or does not fit this model "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "delete that directory to use an earlier one."
            ) from None
        meta = dict(restored["meta"])
        checks = [("params", restored["params"])]
        if abstract_state is not None:
            checks.append(("state", restored["state"]))
        for name, tree in checks:
            if tree_sha256(tree) != meta.get(f"{name}_sha256"):
                raise CheckpointError(
                    f"The checkpoint {where} is damaged: its {name} do not match the sha256 "
                    "written with them; delete that directory to use an earlier one."
                )
        return restored["params"], restored.get("state"), meta

    def restore_epoch(self, epoch: int, abstract_params, kind: str = "epoch"):
        """`(params, meta)` of epoch `epoch` (of the best checkpoint with `kind="best"`),
        restored onto `abstract_params`' shardings."""
        params, _, meta = self._restore(kind, epoch, abstract_params)
        return params, meta

    def restore_latest_state(self, abstract_params, abstract_state, check=None):
        """`(params, state, meta)` of the newest intact training state, else None.

        `check(meta)` may refuse a checkpoint (by raising) before its arrays are read. A damaged
        newest checkpoint is skipped with a warning for the one before it; when every one is
        damaged, the error names the oldest.
        """
        steps = self.state_steps()
        for step in reversed(steps):
            try:
                meta = self.read_meta("state", step)
                if check is not None:
                    check(meta)
                return self._restore("state", step, abstract_params, abstract_state)
            except CheckpointError as error:
                if step == steps[0]:
                    raise
                logging.warning("%s Falling back to the checkpoint before it.", error)
        return None


def abstract_tree(tree, sharding=None):
    """`ShapeDtypeStruct`s of a tree's arrays, placed on `sharding`, else where each array of
    `tree` lives (a restore onto any mesh), else on this process's first device."""
    first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(x):
        if not hasattr(x, "shape"):  # a Python scalar, like a fresh TrainState's step
            x = jax.numpy.asarray(x)
        where = sharding or getattr(x, "sharding", None) or first_device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    return jax.tree_util.tree_map(abstract, tree)


class LoadedCheckpoint(NamedTuple):
    """What sampling and evaluation need from one checkpoint."""

    model: CharLSTM
    params: dict
    vocab: Vocab
    meta: dict
    epoch: int


def resolve_run(path: str | Path) -> tuple[Path, int | None]:
    """`(workdir, epoch)` for a run directory, or for one epoch's checkpoint directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path, None
    if path.parent.name == "epochs" and path.parent.parent.name == "checkpoints":
        if path.name.isdigit() and path.is_dir():
            return path.parent.parent.parent, int(path.name)
    raise CheckpointError(
        f"No checkpoints at {path}: looked for {path / EPOCHS}/<epoch>; give a run directory "
        "made by scripts/train.py (or scripts/convert_torch.py), or one epoch's checkpoint "
        "directory inside it."
    )


def available_epochs(workdir: str | Path) -> list[int]:
    """The epochs of a run that have a complete checkpoint."""
    checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        return checkpoints.epochs()
    finally:
        checkpoints.close()


def select_epochs(path: str | Path, value: str) -> list:
    """The epochs an `--epoch` flag asks for: a number, "final", "best", or "all" of them."""
    value = value.strip().lower()
    if value == "all":
        workdir, _ = resolve_run(path)
        epochs = available_epochs(workdir)
        if not epochs:
            raise CheckpointError(f"{workdir} has no epoch checkpoint yet; train at least one.")
        return epochs
    if value in ("final", "best"):
        return [value]
    if value.isdigit():
        return [int(value)]
    raise CheckpointError(f"--epoch must be a number, 'final', 'best' or 'all', got {value!r}.")


def load_checkpoint(path: str | Path, epoch: int | str = "final") -> LoadedCheckpoint:
    """Load one epoch's checkpoint onto this machine's first device (CPU, GPU or TPU).

    `path` is a run directory or an epoch's checkpoint directory; `epoch` a number, "final"
    (the last epoch saved) or "best" (the lowest validation loss). A checkpoint written on
    other devices restores here.
    """
    workdir, path_epoch = resolve_run(path)
    checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        epochs = checkpoints.epochs()
        if path_epoch is not None:
            epoch = path_epoch
        if not epochs:
            raise CheckpointError(
                f"{workdir} has no complete epoch checkpoint yet (looked in {workdir / EPOCHS}); "
                "train at least one epoch first."
            )
        kind = "epoch"
        if epoch == "final":
            epoch = epochs[-1]
        elif epoch == "best":
            best = checkpoints.best()
            if best is None:
                raise CheckpointError(
                    f"{workdir} has no epoch with a validation loss; give an epoch number."
                )
            epoch = best[0]
            if checkpoints.has_best_copy(epoch):
                kind = "best"
        if kind == "epoch" and epoch not in epochs:
            raise CheckpointError(
                f"No checkpoint for epoch {epoch} in {workdir / EPOCHS}; epochs present: "
                f"{', '.join(map(str, epochs))}."
            )
        meta = checkpoints.read_meta(kind, epoch)
        vocab = Vocab(meta["vocab"])
        model = model_from_config(meta["config"], len(vocab))
        abstract = jax.eval_shape(
            lambda: model.init(
                jax.random.key(0), model.initialize_carry(1), jax.numpy.zeros((1, 1), "int32")
            )["params"]
        )
        params, meta = checkpoints.restore_epoch(epoch, abstract_tree(abstract), kind)
        return LoadedCheckpoint(model, params, vocab, meta, epoch)
    finally:
        checkpoints.close()
