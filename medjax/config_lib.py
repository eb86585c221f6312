"""Helpers for configs/*.py: parsing the variant argument of `get_config(arg)`.

A config file is addressed as `configs/crl.py:smoke,stage=segment`: everything after the
colon is a comma-separated list of variants, `name` (a boolean switch) or `name=value`, so
variants compose. An unknown variant name is an error that lists the known ones.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_variants(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'smoke,stage=keypoints' against `defaults` (name -> default value).

    Values are converted to the type of the default; a bare name sets a boolean to True.

    Returns:
      A locked ConfigDict holding every variant (defaults filled in).

    Raises:
      ValueError: naming an unknown variant or a value that does not fit its type.
    """
    values = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, has_value, raw = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(
                f"Unknown config variant {name!r} in {arg!r}; known variants: "
                f"{', '.join(sorted(defaults))}."
            )
        default = defaults[name]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"Config variant {name!r} needs a value: {name}=...")
            values[name] = True
        elif isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Config variant {name}={raw!r}: expected true or false.")
            values[name] = raw.lower() in ("true", "1")
        else:
            try:
                values[name] = type(default)(raw)
            except ValueError:
                raise ValueError(
                    f"Config variant {name}={raw!r}: expected a {type(default).__name__}."
                ) from None
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raises ValueError unless `value` is one of `choices`, naming the config key."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def train_config(
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    best_metric: str,
    best_mode: str,
    warmup_steps: int = 50,
    weight_decay: float = 1e-4,
    grad_clip: float = 1.0,
    log_every: int = 25,
    eval_every: int = 200,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
) -> ml_collections.ConfigDict:
    """The `config.train` block every task config has (read by `medjax.train`).

    Args:
      steps: optimizer steps.
      batch_size: global batch, split over all devices.
      learning_rate: peak learning rate (after `warmup_steps` of linear warm-up).
      best_metric: logged metric that picks the "best" checkpoint, e.g. ``"val_dice"``.
      best_mode: ``"max"`` or ``"min"`` of `best_metric`.
      warmup_steps, weight_decay, grad_clip (0: none), log_every, eval_every: as named.
      checkpoint_every: steps between checkpoints; None: `eval_every`.
      keep_checkpoints: checkpoints kept besides the best.

    Returns:
      A ConfigDict with those keys, plus ``halt_at_step`` (-1; > 0 stops there as if
      preempted) and ``nonfinite`` (``"stop"`` at a NaN/Inf loss, gradient or state, or
      ``"skip"`` the step).
    """
    train = ml_collections.ConfigDict()
    train.steps = steps
    train.batch_size = batch_size
    train.learning_rate = learning_rate
    train.warmup_steps = warmup_steps
    train.weight_decay = weight_decay
    train.grad_clip = grad_clip
    train.log_every = log_every
    train.eval_every = eval_every
    train.checkpoint_every = eval_every if checkpoint_every is None else checkpoint_every
    train.keep_checkpoints = keep_checkpoints
    train.best_metric = best_metric
    train.best_mode = best_mode
    train.halt_at_step = -1
    train.nonfinite = "stop"
    return train
