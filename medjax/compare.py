"""Side-by-side table of evaluated runs, as markdown.

  python -m medjax.compare --workdirs runs/ich_unet runs/ich_deeplabv3 [--split=test] \
      [--metrics=dice_pooled,iou_pooled] [--out=comparison.md]

Each workdir is a run directory holding the `config.json` it trained with and the
`eval/<split>/metrics.json` that `medjax.main` (after training) or `medjax.evaluate` wrote.
The default columns are the task's own table (for ICH the reference project's pixel
precision / recall / F1 per class, pixel AUC and IoU, then Dice and slice detection); any
metric missing from a run shows as "-".
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import flags

from medjax import cli, tasks

TASK_COLUMNS = {
    "ich": (
        "pixel_precision_0",
        "pixel_recall_0",
        "pixel_f1_0",
        "pixel_precision_1",
        "pixel_recall_1",
        "pixel_f1_1",
        "pixel_auc",
        "iou_pooled",
        "dice_pooled",
        "dice_positive_slices",
        "iou_positive_slices",
        "dice_all_slices",
        "slice_auc",
        "slice_sensitivity",
        "slice_specificity",
    ),
    "perfusion": (
        "accuracy",
        "macro_f1",
        "kappa",
        "mfi_mae",
        "quadrant_accuracy",
        "quadrant_mae",
        "majority_accuracy",
        "num_videos",
    ),
}


class CompareError(ValueError):
    """A workdir without the files a comparison needs; the message says what to run."""


def load_run(workdir: str, split: str) -> dict:
    """{'name', 'task', 'model', 'metrics'} of one evaluated run directory."""
    config_path = os.path.join(workdir, "config.json")
    metrics_path = os.path.join(workdir, "eval", split, "metrics.json")
    if not os.path.isfile(config_path):
        raise CompareError(f"{workdir}: no config.json; is this a run directory of medjax.main?")
    if not os.path.isfile(metrics_path):
        raise CompareError(
            f"{workdir}: no {metrics_path}; evaluate it first: python -m medjax.evaluate "
            f"--config=configs/<task>.py --workdir={workdir} --split={split}"
        )
    config, metrics = _read_json(config_path), _read_json(metrics_path)
    model = config.get("model", {}).get("name", "?")
    data = config.get("data", {})
    if data.get("num_folds", 0):
        model += f" (fold {data.get('fold')}/{data['num_folds']})"
    return {
        "name": os.path.basename(os.path.normpath(workdir)),
        "task": config.get("task", "?"),
        "model": model,
        "metrics": metrics,
    }


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(
            f"{path} is not valid JSON ({e}); it was cut off or edited: evaluate the run again."
        ) from None


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(runs: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table, one row per run and one column per metric."""
    if columns is None:
        task_columns = TASK_COLUMNS.get(runs[0]["task"])
        if task_columns is None:
            task_columns = [m for m in tasks.HEADLINE_METRICS if m in runs[0]["metrics"]]
        columns = list(task_columns)
    header = ["model", "run", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run["model"], run["name"], *(_cell(run["metrics"].get(c)) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(workdirs: list[str], split: str = "test", columns: list[str] | None = None) -> str:
    runs = [load_run(w, split) for w in workdirs]
    kinds = sorted({r["task"] for r in runs})
    if len(kinds) > 1:
        raise CompareError(f"The runs are of different tasks ({', '.join(kinds)}).")
    return markdown_table(runs, columns)


def main(argv):
    # `--workdirs A B C`: absl takes A as the flag's value and leaves B, C as arguments.
    workdirs = list(FLAGS.workdirs) + list(argv[1:])
    columns = FLAGS.metrics.split(",") if FLAGS.metrics else None
    try:
        table = compare(workdirs, FLAGS.split, columns)
    except CompareError as e:
        sys.exit(f"medjax.compare: {e}")
    print(table, end="")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    flags.DEFINE_list(
        "workdirs", None, "Evaluated run directories (comma- or space-separated).", required=True
    )
    flags.DEFINE_string("split", "test", "The evaluated split to compare.")
    flags.DEFINE_string("metrics", "", "Comma-separated metric names (default: the task's).")
    flags.DEFINE_string("out", "", "Also write the table to this markdown file.")
    FLAGS = flags.FLAGS
    cli.run(main)
