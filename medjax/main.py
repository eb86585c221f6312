"""Train then evaluate one task:  python -m medjax.main --config=configs/crl.py --workdir=DIR

Overrides: --config.train.steps=200 --config.model.width=8; variants: configs/crl.py:smoke.
Re-running the same command on the same workdir resumes from its latest checkpoint.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from medjax import cli, evaluate, parallel, tasks, train, writers

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Task config file, e.g. configs/crl.py or configs/crl.py:smoke.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for a multi-process job "
    "(or JAX_COORDINATOR_ADDRESS; SLURM and Cloud TPU need none).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    writers.quiet_library_logs()
    parallel.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    config = _CONFIG.value
    workdir = tasks.run_dir(config, _WORKDIR.value)
    fit = tasks.fit_without_gradients(config)
    if fit is not None:  # No gradient training (e.g. an SVM): it fits, evaluates and reports.
        fit(config, workdir)
        return
    result = train.train_and_evaluate(config, workdir)
    if result["stopped_by"] or result["step"] < config.train.steps:
        return  # Interrupted or halted: evaluate once training has finished.
    metrics = evaluate.evaluate_checkpoint(
        config, workdir, checkpoint=config.eval.checkpoint, split=config.eval.split
    )
    if jax.process_index() == 0:
        eval_dir = os.path.join(workdir, "eval", config.eval.split)
        summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in tasks.HEADLINE_METRICS if k in metrics)
        print(
            f"\nDone. {config.eval.split} ({config.eval.checkpoint} checkpoint, step "
            f"{metrics['step']}): {summary}\n"
            f"  checkpoints: {os.path.join(workdir, 'checkpoints')}\n"
            f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')}, "
            f"{os.path.join(eval_dir, 'metrics.json')}\n"
            f"  pictures:    {eval_dir}\n"
            f"  tensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}"
        )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
