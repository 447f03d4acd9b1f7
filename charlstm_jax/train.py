"""Training: train state, the jitted train and eval steps, and `train_and_evaluate`.

One step is one window of every stream: the carry comes in, is threaded through the window and
goes out (gradients stopped), so batch `n + 1` starts where batch `n` ended; each epoch starts
from a zero carry. Every `validation_counts` steps, and at each epoch's end, a jitted pass over
the whole validation tail from a fresh carry. A workdir is one run: running again resumes it.
"""

import functools
import math
import signal
import time
from pathlib import Path

import filelock
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax.training import train_state
from tqdm import tqdm

from charlstm_jax import allocator, checkpoint, data, parallel, plots
from charlstm_jax.config import get_config, validate_config
from charlstm_jax.errors import UserError
from charlstm_jax.metrics import MetricsWriter, NoMetrics, bits_per_char, read_metrics
from charlstm_jax.model import CharLSTM, init_params, model_from_config

# Config keys a resumed run may change: the rest must match its checkpoint. The text may move
# (its sha256 must match), skip_nonfinite is what the non-finite error tells users to set, and
# unroll and cell_kernel only change how the loops are computed (unroll's default changed from 2
# to 1; results move by float rounding, about 1e-9 in the gradients for unroll, 1e-6 relative
# for cell_kernel). A run saved before cell_kernel existed resumes with it on.
RESUMABLE_CHANGES = (
    "epochs",
    "data_path",
    "data_dir",
    "skip_nonfinite",
    "patience",
    "unroll",
    "cell_kernel",
)


class TrainingError(UserError):
    """Training cannot go on (a locked or mismatched workdir, a non-finite loss)."""


class TrainState(train_state.TrainState):
    """Params, optimizer state and global step (flax's TrainState)."""


def create_model(config: ml_collections.ConfigDict, vocab_size: int) -> CharLSTM:
    """The config's `CharLSTM` for a vocabulary of `vocab_size` characters."""
    return model_from_config(config, vocab_size)


def _is_kernel(params):
    """True for the weight matrices (decayed), False for the biases (not decayed)."""
    return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
    """Clip by global norm `clip`, then Adam at `learning_rate`: the reference's optimizer.

    Beyond it: `weight_decay > 0` makes it AdamW (kernels only), and the cosine `lr_schedule`
    decays the rate to `min_lr_fraction` of it over `epochs * steps_per_epoch` steps.
    """
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(
            learning_rate, config.epochs * steps_per_epoch, alpha=config.min_lr_fraction
        )
    if config.weight_decay > 0:
        adam = optax.adamw(learning_rate, weight_decay=config.weight_decay, mask=_is_kernel)
    else:
        adam = optax.adam(learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.clip), adam)


def create_train_state(
    config, vocab_size: int, key: jax.Array, steps_per_epoch: int = 1
) -> TrainState:
    """A fresh train state: params initialised from `key`, step 0."""
    model = create_model(config, vocab_size)
    tx = create_optimizer(config, steps_per_epoch)

    # One program for the params, Adam's zeros and the step: run op by op, each of them
    # compiled a program of its own in a fresh run.
    @jax.jit
    def create(key):
        return TrainState.create(apply_fn=model.apply, params=init_params(model, key), tx=tx)

    return create(key)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy in nats of `logits[B, T, V]` against `targets[B, T]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_step(state: TrainState, carry, inputs, targets, dropout_key, axis_name=None):
    """One optimizer step on `inputs[B, T]`, `targets[B, T]`; returns `(state, carry, metrics)`.

    Dropout's key is `fold_in(dropout_key, step)`, so a resumed run draws the same masks. A
    non-finite loss or gradient leaves the state unchanged and counts in `metrics["nonfinite"]`.
    With `axis_name`, the step runs under `shard_map` on one device's rows, and the loss and
    gradients are averaged over the devices (the mean over all rows, as on one device).
    `state.apply_fn` is the model's `apply`, as `create_train_state` makes it.
    """
    step_key = jax.random.fold_in(dropout_key, state.step)
    # The model learns which rows it holds from the axis (its dropout masks follow the rows).
    model = state.apply_fn.__self__.clone(batch_axis=axis_name)

    def loss_fn(params):
        new_carry, logits = model.apply(
            {"params": params}, carry, inputs, train=True, rngs={"dropout": step_key}
        )
        return cross_entropy(logits, targets), new_carry

    (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    # A branch, not a select of every array of the state: the update runs only when finite.
    state = jax.lax.cond(
        finite,
        lambda state: state.apply_gradients(grads=grads),
        lambda state: state.replace(step=state.step + 1),
        state,
    )
    metrics = {"loss": jnp.where(finite, loss, 0.0), "nonfinite": 1 - finite.astype(jnp.int32)}
    return state, jax.lax.stop_gradient(new_carry), metrics


def evaluate(apply_fn, params, inputs, targets, carry, axis_name=None):
    """Mean loss over every window of `inputs[N, R, T]` with `carry` threaded through.

    The reference's validation: evaluation mode (no dropout), windows in order. With
    `axis_name`, under `shard_map` on one device's rows: the mean over the devices.
    """

    def body(carry, batch):
        batch_inputs, batch_targets = batch
        carry, logits = apply_fn({"params": params}, carry, batch_inputs, train=False)
        return carry, cross_entropy(logits, batch_targets)

    _, losses = jax.lax.scan(body, carry, (inputs, targets))
    loss = losses.mean()
    return loss if axis_name is None else jax.lax.pmean(loss, axis_name)


def _check_resumable(config, meta: dict, dataset: data.Dataset, workdir: Path) -> None:
    """Fail in one sentence when `config` or the text differ from the run being resumed."""
    # A run saved before a key existed ran with that key's default.
    defaults = get_config()
    saved = {k: meta["config"].get(k, defaults[k]) for k in config}
    changed = [k for k in config if k not in RESUMABLE_CHANGES and config[k] != saved[k]]
    if config.lr_schedule != "constant" and config.epochs != saved["epochs"]:
        changed.append("epochs")  # the schedule's length is part of the run
    if changed:
        differences = ", ".join(f"{k}={config[k]!r} (run has {saved[k]!r})" for k in changed)
        raise TrainingError(
            f"{workdir} holds a run with other settings: {differences}; only epochs (fixed too "
            "under a cosine schedule), patience, data_path, skip_nonfinite, unroll and "
            "cell_kernel may change on resume, so pass the run's values or choose a new "
            "--workdir."
        )
    if meta["corpus_sha256"] != dataset.sha256:
        raise TrainingError(
            f"{workdir} was trained on a text with sha256 {meta['corpus_sha256']}, but "
            f"{dataset.path} has sha256 {dataset.sha256}; resume on the same text or choose a "
            "new --workdir."
        )


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second interrupt: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _lock(workdir: Path) -> filelock.BaseFileLock:
    """Hold the run's lock; a second trainer on the same workdir gets a clear refusal."""
    lock = filelock.FileLock(workdir / ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise TrainingError(
            f"{workdir} is being trained by another process; wait for it to finish or stop it, "
            "or choose another --workdir."
        ) from None
    return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train the config's model in `workdir`, resuming the run there if it has one.

    Returns a summary: final step and epoch, last train and validation loss, whether the run
    was interrupted.
    """
    validate_config(config)
    parallel.check_batch_size(config.batch_size, parallel.make_mesh())
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # In a multi-process run the first process holds the lock for all of them, and all of
    # them stop when it cannot.
    lock, refusal = None, None
    if parallel.is_primary():
        try:
            lock = _lock(workdir)
        except TrainingError as error:
            refusal = error
    if parallel.sync_flag(refusal is not None):
        raise refusal or TrainingError(
            f"{workdir} is being trained by another process; process 0 could not lock it."
        )
    try:
        return _train(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train(config, workdir: Path) -> dict:
    dataset = data.load_dataset(config)
    checkpoints = checkpoint.RunCheckpoints(workdir)
    try:
        return _train_with(config, workdir, dataset, checkpoints)
    finally:
        checkpoints.close()


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a crash leaves the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _check_fresh_start(config, checkpoints, dataset: data.Dataset, workdir: Path) -> None:
    """Epoch checkpoints without any training state: a run killed before its first state
    checkpoint (train again: its epochs are rewritten) or converted weights (refuse: they
    would be overwritten)."""
    epochs = checkpoints.epochs()
    if not epochs:
        return
    meta = checkpoints.read_meta("epoch", epochs[-1])
    if "source" in meta:
        raise TrainingError(
            f"{workdir} holds weights converted from {meta['source']} but no training state to "
            "resume from; sample from it, or train in a new --workdir."
        )
    _check_resumable(config, meta, dataset, workdir)


def _improves(loss: float, best_loss: float) -> bool:
    """A finite loss lower than the best so far (a NaN never improves, nor blocks later ones)."""
    return math.isfinite(loss) and not loss >= best_loss


def _patience_spent(config, epoch: int, best) -> bool:
    """True when early stopping is on and `epoch` is `patience` epochs past the best."""
    return config.patience > 0 and best is not None and epoch - best[0] >= config.patience


def _train_with(config, workdir: Path, dataset: data.Dataset, checkpoints) -> dict:
    # Data parallel over every device: params and optimizer state replicated, rows split.
    mesh = parallel.make_mesh()
    replicated, row_split = parallel.replicated(mesh), parallel.split_rows(mesh)
    primary = parallel.is_primary()
    root_key = jax.random.key(config.seed)
    # Dropout keys are fold_in(dropout_key, step): the saved step is all the key state a
    # resumed run needs.
    params_key, dropout_key = jax.random.split(root_key)
    num_batches = len(dataset.train_inputs)
    state = create_train_state(config, len(dataset.vocab), params_key, num_batches)
    state = parallel.put(state, replicated)
    model = create_model(config, len(dataset.vocab))
    batch_size = config.batch_size

    def fresh_carry():
        return parallel.put(model.initialize_carry(batch_size), row_split)

    carry = fresh_carry()
    # Where the run stands: the epoch, the next batch in it, and the sums of the steps since
    # the last validation row (saved, so a resumed run logs the rows a straight run would).
    epoch, batch_index, loss_sum, loss_count, nonfinite = 1, 0, 0.0, 0, 0
    restored = None
    if checkpoints.state_steps():
        saved = {"opt_state": state.opt_state, "step": state.step, "carry": carry}
        restored = checkpoints.restore_latest_state(
            checkpoint.abstract_tree(state.params),
            checkpoint.abstract_tree(saved),
            check=lambda meta: _check_resumable(config, meta, dataset, workdir),
        )
    else:
        _check_fresh_start(config, checkpoints, dataset, workdir)
    if restored:
        params, saved, meta = restored
        state = state.replace(params=params, opt_state=saved["opt_state"], step=saved["step"])
        carry = saved["carry"]
        epoch, batch_index = meta["epoch"], meta["batch_index"]
        loss_sum, loss_count = meta["loss_sum"], meta["loss_count"]
        nonfinite = meta.get("nonfinite", 0)
        logging.info("Resuming %s at epoch %d, step %d.", workdir, epoch, int(state.step))
    elif primary:
        dataset.vocab.save(workdir / "vocab.json")
    if primary:
        _write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))

    if batch_index >= num_batches:  # the saved state closed its epoch
        epoch, batch_index = epoch + 1, 0
        carry = fresh_carry()
    step = int(state.step)
    metrics_writer = MetricsWriter(workdir, resume_step=step) if primary else NoMetrics()
    meta_base = {
        "config": config.to_dict(),
        "vocab": list(dataset.vocab.chars),
        "corpus_sha256": dataset.sha256,
        "corpus_path": str(Path(dataset.path).absolute()),  # found from any directory
    }
    logging.info(
        "Training on %s: %d characters, vocabulary %d, %d batches of %dx%d per epoch, "
        "%d validation windows of %d rows, on %d device(s) in %d process(es).",
        dataset.path,
        dataset.num_chars,
        len(dataset.vocab),
        num_batches,
        batch_size,
        config.window,
        len(dataset.valid_inputs),
        dataset.valid_inputs.shape[1],
        mesh.size,
        jax.process_count(),
    )
    if epoch > config.epochs:
        logging.info(
            "%s has already trained %d epochs (config.epochs=%d): nothing to do; pass a larger "
            "--config.epochs to train longer.",
            workdir,
            epoch - 1,
            config.epochs,
        )

    whole, split = replicated.spec, row_split.spec
    jit_train_step = jax.jit(
        parallel.data_parallel(
            train_step, mesh, (whole, split, split, split, whole), (whole, split, whole)
        ),
        donate_argnums=(0, 1),
    )
    # Validation rows are split too when the devices divide them (a short tail may have fewer).
    valid_rows = dataset.valid_inputs.shape[1]
    valid_split = valid_rows % mesh.size == 0
    valid_inputs, valid_targets = parallel.put(
        (dataset.valid_inputs, dataset.valid_targets),
        parallel.split_rows(mesh, axis=1) if valid_split else replicated,
    )
    valid_carry = parallel.put(
        model.initialize_carry(valid_rows), row_split if valid_split else replicated
    )
    evaluate_params = functools.partial(evaluate, model.apply)
    if valid_split:
        windows = parallel.split_rows(mesh, axis=1).spec  # [N, R, T]: the rows are axis 1
        evaluate_params = parallel.data_parallel(
            evaluate_params, mesh, (whole, windows, windows, split), whole
        )
    jit_evaluate = jax.jit(evaluate_params)
    pending = []  # per-step device metrics, brought to the host only at log or save time
    rows = read_metrics(workdir)
    last = {
        "train_loss": rows[-1]["TrainLoss"] if rows else None,
        "valid_loss": rows[-1]["ValidationLoss"] if rows else None,
    }

    def fold_pending() -> None:
        """Add the pending steps' metrics to the sums; stop on a non-finite loss by default."""
        nonlocal loss_sum, loss_count, nonfinite
        host = jax.device_get(pending)
        pending.clear()
        first_step = step - len(host) + 1
        for i, m in enumerate(host):  # one addition per step: a resumed run sums in this order
            if int(m["nonfinite"]):
                if not config.skip_nonfinite:
                    raise TrainingError(
                        f"The training loss became non-finite at step {first_step + i} (epoch "
                        f"{epoch}); the update was skipped and the last good checkpoint is kept "
                        "in the workdir: lower learning_rate, or set "
                        "--config.skip_nonfinite=True to skip such updates and go on."
                    )
                nonfinite += 1
            else:
                loss_sum += float(m["loss"])
                loss_count += 1

    def log_validation(run: int) -> None:
        nonlocal loss_sum, loss_count, nonfinite
        fold_pending()
        train_loss = loss_sum / loss_count if loss_count else float("nan")  # all skipped
        valid_loss = float(run_evaluate(state.params, valid_inputs, valid_targets, valid_carry))
        metrics_writer.write(epoch, run, step, train_loss, valid_loss)
        logging.info(
            "Epoch %d/%d batch %d step %d | Training loss %.4f | Validation loss %.4f "
            "(%.3f bits/char)%s",
            epoch,
            config.epochs,
            run,
            step,
            train_loss,
            valid_loss,
            bits_per_char(valid_loss),
            f" | {nonfinite} non-finite updates skipped" if nonfinite else "",
        )
        loss_sum, loss_count, nonfinite = 0.0, 0, 0
        last.update(train_loss=train_loss, valid_loss=valid_loss)

    def save_state(next_batch: int) -> None:
        """Save everything a resumed run needs to go on from batch `next_batch` of the epoch."""
        fold_pending()
        saved = {"opt_state": state.opt_state, "step": state.step, "carry": carry}
        meta = dict(meta_base, epoch=epoch, batch_index=next_batch, step=step)
        meta.update(loss_sum=loss_sum, loss_count=loss_count, nonfinite=nonfinite)
        checkpoints.save_state(step, state.params, saved, meta)

    interrupted = None
    # (epoch, validation loss) of the best epoch before this one, or None. A best saved by a
    # run that died before its epoch's state is ignored: that epoch is trained again.
    best = checkpoints.best(before=epoch)
    stopped_early = None
    if epoch > 1 and _patience_spent(config, epoch - 1, best) and epoch <= config.epochs:
        stopped_early = epoch - 1
        logging.info(
            "%s stopped early after epoch %d (best validation loss at epoch %d, patience %d): "
            "nothing to do; raise --config.patience or set it to 0 to train on.",
            workdir,
            epoch - 1,
            best[0],
            config.patience,
        )
    chars_per_step = batch_size * config.window
    if epoch <= config.epochs and stopped_early is None:
        first = parallel.put((dataset.train_inputs[0], dataset.train_targets[0]), row_split)
        building = time.perf_counter()
        run_train_step = jit_train_step.lower(state, carry, *first, dropout_key).compile()
        run_evaluate = jit_evaluate.lower(state.params, valid_inputs, valid_targets, valid_carry)
        run_evaluate = run_evaluate.compile()
        building = time.perf_counter() - building
        logging.info("Built the train step and the validation pass in %.1f s.", building)
        # Both programs are built before the first step, so freed memory is kept for reuse
        # from here on, if the process asked for it (see `allocator`), what compilation freed
        # having gone back to the system first.
        allocator.programs_compiled()
    with _StopRequest() as stop:

        def stop_requested(at_log: bool) -> bool:
            """A signal arrived here (or, in a multi-process run, in any process). Processes
            agree only at log points: a collective each step would cost more than it saves."""
            if jax.process_count() == 1:
                return stop.signal is not None
            return at_log and parallel.sync_flag(stop.signal is not None)

        while epoch <= config.epochs and interrupted is None and stopped_early is None:
            bar = tqdm(
                total=num_batches,
                initial=batch_index,
                desc=f"epoch {epoch}/{config.epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
                disable=not primary,
            )
            started, started_step = time.perf_counter(), step
            while batch_index < num_batches:
                inputs, targets = parallel.put(
                    (dataset.train_inputs[batch_index], dataset.train_targets[batch_index]),
                    row_split,
                )
                state, carry, metrics = run_train_step(state, carry, inputs, targets, dropout_key)
                pending.append(metrics)
                # One step at a time: a step queued behind another allocates its ~140 MB of
                # temporaries before the running one frees its own, and with freed memory kept
                # for reuse (see `allocator`) the heap then grows by a buffer per queued step.
                jax.block_until_ready((state, carry, metrics))
                batch_index += 1
                step += 1
                bar.update(1)
                at_log = batch_index % config.validation_counts == 0 or batch_index == num_batches
                if at_log:
                    log_validation(batch_index)
                    speed = (step - started_step) * chars_per_step / (time.perf_counter() - started)
                    metrics_writer.write_speed(step, speed)
                    bar.set_postfix(loss=f"{last['train_loss']:.3f}", chars_per_s=f"{speed:.0f}")
                if stop_requested(at_log) and batch_index < num_batches:  # an epoch's end saves
                    interrupted = stop.signal or "a stop in another process"
                    break
            bar.close()
            if interrupted:
                save_state(batch_index)
                break
            meta = dict(meta_base, epoch=epoch, step=step, valid_loss=last["valid_loss"])
            checkpoints.save_epoch(epoch, state.params, meta)
            if best is None or _improves(last["valid_loss"], best[1]):
                checkpoints.save_best(epoch, state.params, meta)
                best = (epoch, last["valid_loss"])
            if primary:
                plots.plot_run(workdir)
            save_state(num_batches)
            if stop_requested(True) and epoch < config.epochs:
                interrupted = stop.signal or "a stop in another process"
            if _patience_spent(config, epoch, best) and epoch < config.epochs:
                stopped_early = epoch
                logging.info(
                    "Stopping early after epoch %d: validation has not improved for %d epochs "
                    "(best %.4f at epoch %d).",
                    epoch,
                    epoch - best[0],
                    best[1],
                    best[0],
                )
            epoch, batch_index = epoch + 1, 0
            carry = fresh_carry()
    checkpoints.wait()
    metrics_writer.close()
    if interrupted:
        logging.warning(
            "Stopped by %s at epoch %d, step %d; the state is saved in %s: run the same command "
            "again to resume.",
            interrupted,
            epoch - 1 if batch_index == 0 else epoch,
            step,
            workdir,
        )
    return {
        "step": step,
        "epoch": min(epoch if batch_index else epoch - 1, config.epochs),
        "train_loss": last["train_loss"],
        "valid_loss": last["valid_loss"],
        "interrupted": interrupted,
        "stopped_early": stopped_early,
        "best": best,
        "workdir": str(workdir),
    }
