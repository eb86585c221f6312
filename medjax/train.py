"""The one task-agnostic trainer: `train_and_evaluate(config, workdir)`.

Read top to bottom: setup -> state created in place -> resume -> jit train step -> loop with
logging, validation, checkpoints and preemption handling -> final save.

Data parallel: the train state is replicated over a one-axis mesh, each batch is sharded on
'data', and the state is donated to the step. Resuming restores the state AND the data
iterator, so a resumed run sees exactly the batches an uninterrupted run would have seen.

Faults:
- SIGTERM / Ctrl-C save a checkpoint and return cleanly; re-running resumes.
- A killed run (kill -9, power loss) resumes from its newest complete checkpoint; the
  temporary directory of a save cut short is ignored and removed (see medjax.checkpoint).
- A workdir that cannot be written is reported before anything is built (`WorkdirError`); a
  checkpoint that cannot be written (disk full) stops the run with `CheckpointWriteError`,
  leaving the previous checkpoint intact.
- A NaN/Inf loss, gradient or updated state: with `train.nonfinite = "stop"` (the default)
  the run stops with `NonFiniteLossError` naming the step; with "skip" that step's update is
  dropped (parameters, optimizer state and batch statistics stay as they were), counted and
  logged, and training goes on. Either way the examples of the offending batch are listed in
  `<workdir>/nonfinite_batch_<step>.json`, and a non-finite state is never checkpointed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from medjax import checkpoint as ckpt_lib
from medjax import evaluate as eval_lib
from medjax import parallel, tasks, writers
from medjax.input import pipeline

NONFINITE_MODES = ("stop", "skip")
# What each entry of the step's finiteness flags checks, in order.
_FINITE_CHECKS = ("loss", "gradients", "updated state")
_FINITE_KEY = "finite_checks"  # Step output read by the guard, never logged as a metric.


# ============================================================================ train state
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict:
        variables = {"params": self.params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def make_optimizer(
    config, head_names: tuple[str, ...]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, after global-norm gradient clipping.

    `config.optimizer` (optional) selects SGD with momentum instead (``name="sgd"``), and a
    step decay (``lr_step_every``, ``lr_step_gamma``) instead of the cosine.

    With `model.freeze_backbone_steps` > 0 (or a `model.backbone_lr_multiplier` other than 1),
    parameters outside `head_names` get no update for the first steps, then updates scaled by
    the multiplier: train the new head on a pretrained backbone first, then fine-tune.
    """
    train_cfg, model_cfg = config.train, config.model
    opt_cfg = config.get("optimizer") or {}
    name = opt_cfg.get("name", "adamw")
    if name not in ("adamw", "sgd"):
        raise ValueError(f"config.optimizer.name={name!r} is not one of 'adamw', 'sgd'.")
    warmup = min(train_cfg.warmup_steps, train_cfg.steps)
    step_every = opt_cfg.get("lr_step_every", 0)
    if step_every > 0:  # Step decay (EchoNet-Dynamic: x0.1 every 15 epochs).
        decay = optax.exponential_decay(
            train_cfg.learning_rate,
            transition_steps=step_every,
            decay_rate=opt_cfg.get("lr_step_gamma", 0.1),
            staircase=True,
        )
        schedule = decay
        if warmup > 0:
            schedule = optax.join_schedules(
                [optax.linear_schedule(0.0, train_cfg.learning_rate, warmup), decay], [warmup]
            )
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=train_cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(train_cfg.steps, warmup + 1),
            end_value=train_cfg.learning_rate * 0.01,
        )

    def base_optimizer():
        if name == "sgd":  # PyTorch's SGD: L2 weight decay added to the gradient, momentum.
            return optax.chain(
                optax.add_decayed_weights(train_cfg.weight_decay),
                optax.sgd(schedule, momentum=opt_cfg.get("momentum", 0.9)),
            )
        return optax.adamw(schedule, weight_decay=train_cfg.weight_decay)

    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    freeze_steps = model_cfg.get("freeze_backbone_steps", 0)
    multiplier = model_cfg.get("backbone_lr_multiplier", 1.0)
    if freeze_steps > 0 or multiplier != 1.0:
        from medjax.models.pretrained import make_finetune_optimizer

        parts.append(
            make_finetune_optimizer(
                base_optimizer,
                freeze_steps=freeze_steps,
                backbone_lr_multiplier=multiplier,
                head_names=head_names,
            )
        )
    else:
        parts.append(base_optimizer())
    return optax.chain(*parts), schedule


def head_names(params: Any) -> tuple[str, ...]:
    """Top-level parameter groups that are not pretrained: all but 'backbone' if there is
    one (ResNet classifiers, heatmap networks), else 'head' (VGG)."""
    if "backbone" in params:
        return tuple(k for k in params if k != "backbone")
    return ("head",)


def load_pretrained(task, state: "TrainState", path: str, mesh) -> "TrainState":
    """Replaces the freshly initialised weights by those of a local ImageNet file."""
    from medjax.models import pretrained, pretrained_name

    variables = jax.device_get(state.variables())
    loaded, report = pretrained.load_pretrained(
        variables, path, model_name=pretrained_name(task.config.model)
    )
    for line in report.summary().splitlines():
        logging.info("%s", line)
    loaded = parallel.replicate(loaded, mesh)
    return state.replace(
        params=loaded["params"], batch_stats=loaded.get("batch_stats", state.batch_stats)
    )


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss, the gradients or the updated state become NaN or Inf
    (with `train.nonfinite = "stop"`)."""


class WorkdirError(OSError):
    """The workdir (or its checkpoint directory) cannot be created or written."""


def check_writable_dir(path: str) -> None:
    """Creates `path` if needed and checks that a file can be written in it.

    Raises:
      WorkdirError: naming `path` and the reason (not a directory, permission denied, disk
        full, read-only file system).
    """
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        failure = WorkdirError(
            f"Cannot write to {path}: {error.strerror or error}. Pass a --workdir that you "
            "can write to (or fix that directory's permissions, or free disk space)."
        )
        failure.errno = error.errno  # Not strerror or filename: they would replace the message.
        raise failure from error


def nonfinite_mode(config) -> str:
    """`config.train.nonfinite` ('stop' when the config has no such key), checked."""
    mode = config.train.get("nonfinite", "stop")
    if mode not in NONFINITE_MODES:
        choices = ", ".join(map(repr, NONFINITE_MODES))
        raise ValueError(f"config.train.nonfinite={mode!r} is not one of {choices}.")
    return mode


def batch_examples(loader: Any, step: int, batch_size: int) -> list[dict]:
    """The examples this process trained on at `step` (1-based), for fault reports.

    The training stream is read in order, `batch_size` examples per step, so step s used the
    stream's entries [(s-1)*b, s*b). For a medjax training loader (a grain DataLoader over a
    `pipeline.GlobalOrderSource`), each entry is described by its global position in the
    stream, its epoch, and the identifying fields of its record (ids, file names, slice
    numbers); for any other loader, by its index in the stream only.

    Returns:
      One dict per example of the batch, in batch order.
    """
    first = (step - 1) * batch_size
    stream = getattr(loader, "_data_source", None)
    if not isinstance(stream, pipeline.GlobalOrderSource):
        return [{"stream_index": first + j} for j in range(batch_size)]
    examples = []
    for j in range(batch_size):
        position, record = stream[first + j]
        example = {"position": int(position), "epoch": int(position // len(stream.source))}
        for key, value in record.items():
            if _is_identifier(key, value):
                example[key] = _scalar(value)
        examples.append(example)
    return examples


def _is_identifier(key: str, value: Any) -> bool:
    names = key in ("id", "filename") or key.endswith(("_id", "_number", "_name"))
    return names and np.ndim(value) == 0


def _scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.item() if isinstance(value, np.generic) else value


class _NonFiniteGuard:
    """Checks the steps' finiteness flags on the host, a few steps late (no sync per step).

    In 'stop' mode the first bad step raises NonFiniteLossError; in 'skip' mode (the jitted
    step has already dropped the update) each bad step is counted and logged. Either way the
    bad step's batch is listed in `<workdir>/nonfinite_batch_<step>.json`.
    """

    def __init__(
        self, mode: str, workdir: str, describe_batch: Callable[[int], list[dict]], skipped=0
    ):
        self.mode, self.workdir, self.describe_batch = mode, workdir, describe_batch
        self.skipped = skipped
        self._pending: list[tuple[int, Any, Any]] = []  # (step, flags, (loss, grad_norm)).

    def add(self, step: int, flags: jax.Array, loss: jax.Array, grad_norm: jax.Array) -> None:
        self._pending.append((step, flags, (loss, grad_norm)))

    def check(self, last_saved: Any) -> None:
        """Raises NonFiniteLossError (stop mode) naming the first bad step since the last check."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = np.asarray(jax.device_get([f for _, f, _ in pending]))
        for (step, _, values), ok in zip(pending, flags):
            if ok.all():
                continue
            loss, grad_norm = (float(v) for v in jax.device_get(values))
            failed = [name for name, good in zip(_FINITE_CHECKS, ok) if not good]
            reason = f"non-finite {' and '.join(failed)} (loss {loss}, gradient norm {grad_norm})"
            path = self._dump(step, reason, loss, grad_norm)
            if self.mode == "stop":
                raise NonFiniteLossError(
                    f"Training step {step} gave a {reason}; stopped at step {step} without "
                    f"checkpointing that state. The last good checkpoint is step {last_saved}. "
                    f"The examples of that step's batch are listed in {path}. Check them, lower "
                    "train.learning_rate, or set train.nonfinite='skip' to drop such steps; "
                    "then re-run to resume from the last good checkpoint."
                )
            self.skipped += 1
            logging.warning(
                "Skipped the update of step %d: %s (train.nonfinite='skip'; %d skipped so "
                "far). Its batch is listed in %s.",
                step,
                reason,
                self.skipped,
                path,
            )

    def _dump(self, step: int, reason: str, loss: float, grad_norm: float) -> str:
        suffix = f"_process{jax.process_index()}" if jax.process_index() else ""
        path = os.path.join(self.workdir, f"nonfinite_batch_{step}{suffix}.json")
        try:
            examples = self.describe_batch(step)
        except Exception as error:  # The report must never hide the fault it reports.
            examples = [{"error": f"could not list the batch's examples: {error}"}]
        writers.write_json(
            path,
            {
                "step": step,
                "reason": reason,
                "loss": _json_number(loss),
                "grad_norm": _json_number(grad_norm),
                "action": "stopped" if self.mode == "stop" else "skipped",
                "process_index": jax.process_index(),
                "examples": examples,
            },
        )
        return path


def _json_number(value: float) -> float | str:
    """A float JSON can hold: finite values as they are, NaN/Inf as 'nan', 'inf', '-inf'."""
    return value if np.isfinite(value) else str(value)


def skipped_before(workdir: str, step: int) -> int:
    """Steps up to `step` whose update was skipped, from their `nonfinite_batch_*.json`."""
    count = 0
    for path in glob.glob(os.path.join(workdir, "nonfinite_batch_*.json")):
        match = re.fullmatch(r"nonfinite_batch_(\d+)\.json", os.path.basename(path))
        if not match or int(match.group(1)) > step:
            continue
        try:
            with open(path) as f:
                count += json.load(f).get("action") == "skipped"
        except (OSError, ValueError):
            continue  # Unreadable: not counted, and not worth stopping a resume for.
    return count


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        logging.warning(
            "Received %s: saving a checkpoint and stopping after this step "
            "(press Ctrl-C again to abort without saving).",
            self.signal_name,
        )
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self):
        return self.signal_name is not None


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ============================================================================ state and step
def build_training(config, task, mesh):
    """The optimizer, the initial train state (created in place, replicated on `mesh`) and
    the jitted train step (batch sharded on 'data', state donated).

    The step's metrics include `finite_checks`, three booleans (loss, gradients, updated
    state all finite); with `train.nonfinite = "skip"` a step failing any of them keeps the
    previous parameters, optimizer state and batch statistics (the step counter advances).

    Returns:
      (tx, schedule, state, train_step) with train_step(state, batch) -> (state, metrics).
    """
    skip_nonfinite = nonfinite_mode(config) == "skip"
    replicated = parallel.replicated(mesh)
    abstract = jax.eval_shape(
        lambda: task.init_variables(jax.random.key(0, impl="rbg"), task.example_batch(1))
    )
    tx, schedule = make_optimizer(config, head_names(abstract["params"]))

    def init_state(rng):
        # Parameters are drawn with the 'rbg' generator: on CPU it compiles in a third of the time
        # of threefry for a U-Net; the init is replicated, so it is the same on any device count.
        init_rng = jax.random.key(config.seed, impl="rbg")
        variables = task.init_variables(init_rng, task.example_batch(1))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=rng,
        )

    rng = jax.random.key_data(jax.random.key(config.seed))
    state = parallel.jit(init_state, out_shardings=replicated)(rng)

    def train_step(state: TrainState, batch):
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            return task.loss(variables, batch, step_rng)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updated = (params, opt_state, model_state.get("batch_stats", state.batch_stats))
        checks = jnp.stack([jnp.isfinite(loss), _all_finite(grads), _all_finite(updated)])
        if skip_nonfinite:
            keep = checks.all()
            previous = (state.params, state.opt_state, state.batch_stats)
            # One conditional, not a select per leaf: per-leaf selects over the whole state
            # made XLA's CPU compile of a U-Net step three times slower.
            updated = jax.lax.cond(
                keep, lambda new, old: new, lambda new, old: old, updated, previous
            )
        params, opt_state, batch_stats = updated
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            _FINITE_KEY: checks,
        }
        return new_state, metrics

    jitted_step = parallel.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    return tx, schedule, state, jitted_step


def _all_finite(tree: Any) -> jax.Array:
    """True when every floating-point leaf of `tree` is free of NaN and Inf."""
    leaves = [
        jnp.isfinite(x).all()
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


# ============================================================================ main entry
def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.task` in `workdir`, resuming from its latest checkpoint if any.

    Returns:
      {'step': last step, 'stopped_by': signal name or None, 'val': last validation metrics,
       'skipped_steps': steps whose update was dropped (train.nonfinite='skip')}

    Raises:
      WorkdirError: `workdir` cannot be written (raised before anything is built).
      checkpoint.CheckpointWriteError: a checkpoint could not be written (e.g. disk full).
      NonFiniteLossError: NaN/Inf with train.nonfinite='stop'.
    """
    # --------------------------------------------------------------------------- setup
    mode = nonfinite_mode(config)
    check_writable_dir(workdir)
    check_writable_dir(os.path.join(workdir, "checkpoints"))
    mesh = parallel.make_mesh()
    logging.info("Devices: %s", parallel.describe(mesh))
    train_cfg = config.train
    batch_size = parallel.per_process_batch_size(
        train_cfg.batch_size, mesh, name="train.batch_size"
    )
    if jax.process_index() == 0:
        _write_config(config, workdir)
    task = tasks.get_task(config)
    if jax.process_index() == 0:
        task.save_artifacts(workdir)
    writer = writers.MetricWriter(workdir)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=train_cfg.keep_checkpoints,
        best_metric=train_cfg.best_metric,
        best_mode=train_cfg.best_mode,
    )
    tx, schedule, state, p_train_step = build_training(config, task, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model %s: %.3fM parameters", config.model.name, num_params / 1e6)

    # --------------------------------------------------------------------------- resume
    train_loader = task.train_loader(batch_size, seed=config.seed)
    train_iter = iter(train_loader)
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(latest, state)
        if data_state:
            train_iter.set_state(json.dumps(data_state).encode())
        start_step = int(jax.device_get(state.step))
        logging.info("Resumed from step %d (%s).", start_step, checkpointer.directory)
    elif config.model.get("init_from"):
        state = load_pretrained(task, state, config.model.init_from, mesh)
    # Lines logged after the restored step (or, with no checkpoint, by a run killed before its
    # first one) are replayed now: drop them so that metrics.jsonl reads like one run.
    writer.truncate_after(start_step)

    # --------------------------------------------------------------------------- loop
    total = train_cfg.steps
    halt = train_cfg.halt_at_step if train_cfg.halt_at_step > 0 else total
    last_saved = latest
    guard = _NonFiniteGuard(
        mode,
        workdir,
        lambda bad_step: batch_examples(train_loader, bad_step, batch_size),
        skipped=skipped_before(workdir, start_step) if mode == "skip" else 0,
    )
    val_metrics: dict = {}
    step = start_step

    def save(step, metrics=None):
        nonlocal last_saved
        guard.check(last_saved)
        if last_saved == step:
            return
        checkpointer.save(
            step,
            state,
            data_state=json.loads(train_iter.get_state()),
            config=config.to_dict(),
            metrics=metrics,
        )
        last_saved = step

    if start_step >= total:
        logging.info("Already trained to step %d of %d: nothing to do.", start_step, total)
    logging.info(
        "Training %s from step %d to %d, global batch %d (%d per process).",
        config.task,
        start_step,
        min(total, halt),
        train_cfg.batch_size,
        batch_size,
    )
    interval_start, interval_steps, t0 = time.time(), 0, time.time()
    stopped_by = None
    try:
        with _StopRequest() as stop:
            while step < min(total, halt):
                batch = parallel.to_global(next(train_iter), mesh)
                state, metrics = p_train_step(state, batch)
                step += 1
                interval_steps += 1
                guard.add(step, metrics.pop(_FINITE_KEY), metrics["loss"], metrics["grad_norm"])

                if step % train_cfg.log_every == 0 or step == total:
                    guard.check(last_saved)
                    elapsed = time.time() - interval_start
                    steps_per_sec = interval_steps / max(elapsed, 1e-9)
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if mode == "skip":
                        scalars["skipped_steps"] = guard.skipped
                    scalars["steps_per_sec"] = steps_per_sec
                    writer.write(step, scalars)
                    logging.info(
                        "step %d/%d loss %.4f lr %.2e %.2f steps/s ETA %s",
                        step,
                        total,
                        scalars["loss"],
                        scalars["learning_rate"],
                        steps_per_sec,
                        _format_eta((total - step) / steps_per_sec),
                    )
                    interval_start, interval_steps = time.time(), 0

                ckpt_metrics = None
                if step % train_cfg.eval_every == 0 or step == total:
                    guard.check(last_saved)
                    val_metrics, _ = eval_lib.evaluate_variables(
                        task, state.variables(), "validation", mesh
                    )
                    writer.write(
                        step,
                        {
                            f"val_{k}": v
                            for k, v in val_metrics.items()
                            if isinstance(v, (int, float))
                        },
                    )
                    logging.info("step %d validation: %s", step, eval_lib._format(val_metrics))
                    ckpt_metrics = {
                        f"val_{k}": v for k, v in val_metrics.items() if isinstance(v, float)
                    }
                    interval_start = time.time()  # Validation time is not training throughput.

                # Every process must stop at the same step: a signal seen by one stops all.
                stopping = parallel.any_process(bool(stop))
                if step % train_cfg.checkpoint_every == 0 or step == total or stopping:
                    save(step, ckpt_metrics)
                if stopping:
                    stopped_by = stop.signal_name or "a signal to another process"
                    logging.warning(
                        "Stopped by %s at step %d; checkpoint saved. Re-run the same "
                        "command to resume.",
                        stopped_by,
                        step,
                    )
                    break
            else:
                if step < total:
                    save(step)
                    logging.info("Halted at step %d (train.halt_at_step).", step)
    finally:
        checkpointer.close()
        writer.close()
    if guard.skipped:
        logging.warning(
            "%d step(s) had a non-finite loss, gradient or update and were skipped; their "
            "batches are listed in %s.",
            guard.skipped,
            os.path.join(workdir, "nonfinite_batch_<step>.json"),
        )
    logging.info(
        "Training done: step %d in %s; checkpoints in %s",
        step,
        _format_eta(time.time() - t0),
        checkpointer.directory,
    )
    return {
        "step": step,
        "stopped_by": stopped_by,
        "val": val_metrics,
        "skipped_steps": guard.skipped,
    }


def _write_config(config, workdir: str) -> None:
    """Writes config.json; if a different one is there (a resumed run), logs what changed."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except ValueError:
                old = None
        if old is not None and old != new:
            logging.warning(
                "config.json in %s differs from this run's config; overwriting it.", workdir
            )
    writers.write_json(path, new)
