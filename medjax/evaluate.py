"""Checkpoint-based evaluation: restore a checkpoint and run the task's evaluator on a split.

  python -m medjax.evaluate --config=configs/crl.py --workdir=runs/crl \
      [--checkpoint=best|latest|STEP] [--split=test]

Writes `<workdir>/eval/<split>/metrics.json` and the task's pictures (for segmentation, a PNG
grid of image / ground truth / prediction overlays). Needs no training code and no
optimizer: the model's variables are read from the checkpoint by name.

`evaluate_variables` is also what the trainer calls for its periodic validation, so the
numbers a training run logs and the numbers this script prints come from the same code.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from medjax import checkpoint as ckpt_lib
from medjax import cli, parallel, tasks, writers

MODEL_COLLECTIONS = ("params", "batch_stats")


def evaluate_variables(
    task,
    variables: Mapping[str, Any],
    split: str,
    mesh,
    *,
    num_samples: int = 0,
    gathered_out: dict | None = None,
) -> tuple[dict, list]:
    """Runs the task's evaluator over every example of `split`.

    Args:
      task: a medjax Task.
      variables: the model's variables (replicated on `mesh`).
      split: dataset split name.
      mesh: device mesh; eval batches are sharded over its 'data' axis.
      num_samples: how many (example, host fields, prediction) triples to return for pictures.
      gathered_out: if a dict, receives the split's gathered per-example values.

    Returns:
      (metrics dict, samples list)
    """
    batch_size = parallel.per_process_batch_size(
        task.config.eval.batch_size, mesh, name="eval.batch_size"
    )
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def step_with_valid(variables, batch):
        return task.eval_step(variables, batch), batch["valid"]

    eval_step = parallel.jit(
        step_with_valid, in_shardings=(replicated, sharded), out_shardings=replicated
    )
    predict = parallel.jit(
        task.predict, in_shardings=(replicated, sharded), out_shardings=replicated
    )
    totals: dict[str, list[float]] = {}
    gathered: dict[str, list[np.ndarray]] = {}
    samples = []
    # Prediction is a collective over all processes: all run it on the same first batches.
    picture_batches = math.ceil(num_samples / batch_size)
    for index, (device_batch, host_batch) in enumerate(task.eval_batches(split, batch_size)):
        global_batch = parallel.to_global(device_batch, mesh)
        outputs, valid = jax.device_get(eval_step(variables, global_batch))
        for name, value in outputs.items():
            if isinstance(value, tuple):  # A (sum, count) pair.
                acc = totals.setdefault(name, [0.0, 0.0])
                acc[0] += float(value[0])
                acc[1] += float(value[1])
            else:  # Per-example values, kept for metrics that need them all (e.g. AUC).
                gathered.setdefault(name, []).append(np.asarray(value)[valid])
        if index < picture_batches:
            outputs = jax.device_get(predict(variables, global_batch))
            for i in range(int(device_batch["valid"].sum()) * (jax.process_index() == 0)):
                if len(samples) == num_samples:
                    break
                samples.append(
                    (
                        {k: v[i] for k, v in device_batch.items()},
                        {k: v[i] for k, v in host_batch.items()},
                        {k: np.asarray(v[i]) for k, v in outputs.items()},
                    )
                )
    if not totals and not gathered:
        raise ValueError(f"Split {split!r} is empty: nothing to evaluate.")
    gathered = {k: np.concatenate(v) for k, v in gathered.items()}
    if gathered_out is not None:
        gathered_out.update(gathered)
    metrics = task.finalize_metrics({k: tuple(v) for k, v in totals.items()}, gathered)
    return metrics, samples


def model_variables(state_tree: Mapping[str, Any]) -> dict:
    """Picks the model's collections out of a restored train state (a nested dict)."""
    return {k: state_tree[k] for k in MODEL_COLLECTIONS if k in state_tree and state_tree[k]}


def evaluate_checkpoint(
    config, workdir: str, *, checkpoint: str = "best", split: str = "test"
) -> dict:
    """Restores `checkpoint` from `workdir`, evaluates `split`, writes metrics.json + pictures.

    Returns:
      The metrics dict that was written (with 'step', 'checkpoint' and 'split' added).
    """
    mesh = parallel.make_mesh()
    task = tasks.get_task(config)
    task.load_artifacts(workdir)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        best_metric=config.train.best_metric,
        best_mode=config.train.best_mode,
        read_only=True,
    )
    step = checkpointer.resolve(checkpoint)
    logging.info(
        "Restoring checkpoint %r = step %d from %s", checkpoint, step, checkpointer.directory
    )
    state = checkpointer.restore_arrays(step, parallel.replicated(mesh))
    variables = model_variables(state)
    start = time.time()
    gathered = {}
    metrics, samples = evaluate_variables(
        task, variables, split, mesh, num_samples=config.eval.num_plot, gathered_out=gathered
    )
    out_dir = os.path.join(workdir, "eval", split)
    result = {
        **metrics,
        "step": int(step),
        "checkpoint": checkpoint,
        "split": split,
        "seconds": round(time.time() - start, 2),
    }
    if jax.process_index() == 0:
        writers.write_json(os.path.join(out_dir, "metrics.json"), result)
        pictures = task.write_report(out_dir, samples)
        pictures += task.write_evaluation(out_dir, split, gathered, variables=variables)
        logging.info("Evaluation of step %d on %r: %s", step, split, _format(metrics))
        logging.info(
            "Wrote %s and %s",
            os.path.join(out_dir, "metrics.json"),
            ", ".join(pictures) or "no pictures",
        )
    return result


def _format(metrics: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


# ---------------------------------------------------------------------------- command line
def _define_flags():
    """Flags exist only when this module is the program (medjax.main imports it too)."""
    config_flags.DEFINE_config_file("config", None, "Task config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The experiment's directory (as given to medjax.main).")
    flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
    flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
    flags.DEFINE_bool(
        "end_to_end",
        False,
        "Evaluate the task's chained stages together "
        "(crl: segment -> quality -> keypoints -> CRL, GA; echonet: LV areas -> beats -> "
        "beat-to-beat EF) into <workdir>/eval.",
    )
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    writers.quiet_library_logs()
    parallel.maybe_initialize_distributed()
    f = flags.FLAGS
    if f.end_to_end:
        tasks.end_to_end_evaluator(f.config)(
            f.config, f.workdir, split=f.split, checkpoint=f.checkpoint
        )
        return
    run_dir = tasks.run_dir(f.config, f.workdir)
    evaluate_checkpoint(f.config, run_dir, checkpoint=f.checkpoint, split=f.split)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
