"""The Task interface: what the task-agnostic trainer and evaluator ask of a task.

A task is a model builder + loss + metrics + data (scenic's `BaseModel`, plus the input
pipeline). Everything the trainer jit-compiles (`loss`, `eval_step`, `predict`) is a pure
function of (variables, batch[, rng]).

Metrics from `eval_step` are (sum, count) pairs per batch, added up over the whole split on
the host and divided once by `finalize_metrics`, so a mean never depends on batching.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np

from medjax import data as data_lib
from medjax import parallel

Batch = Mapping[str, Any]
Variables = Mapping[str, Any]


class DatasetAccess:
    """Mixin: the task's dataset (`config.data.name`), built once on first use (by one
    process, the others wait; see `parallel.build_once`) and opened as array_record sources.

    `config.data` gives manual_dir ('' = synthetic), data_dir, synthetic_num and synthetic_seed;
    a class lists in `BUILD_OPTIONS` the further `config.data` keys that are the builder's
    options (frame size, ...: see `medjax.data`), passed on by name.
    """

    config: Any
    BUILD_OPTIONS: tuple[str, ...] = ()
    _builder = None
    _sources: dict | None = None

    def builder(self):
        if self._builder is None:
            cfg = self.config.data
            build = functools.partial(
                data_lib.ensure_built,
                cfg.name,
                manual_dir=cfg.manual_dir or None,
                data_dir=cfg.data_dir,
                synthetic_num=cfg.synthetic_num,
                synthetic_seed=cfg.synthetic_seed,
                **{name: cfg[name] for name in self.BUILD_OPTIONS},
            )
            self._builder = parallel.build_once(build)
        return self._builder

    def sources(self) -> dict:
        """Split name -> random-access source of records."""
        if self._sources is None:
            self._sources = self.builder().as_data_source()
        return self._sources

    def source(self, split: str):
        sources = self.sources()
        if split not in sources:
            raise ValueError(
                f"The {self.config.data.name} dataset has no {split!r} split; it has "
                f"{', '.join(sources)} (a split is left out when no patient falls in it: "
                "use more data)."
            )
        return sources[split]


def apply_model(model: nn.Module, variables: Variables, inputs, *, train: bool, rng=None):
    """Applies `model`; returns (outputs, updated mutable state).

    In training, batch statistics (when the model has them) are updated and returned, and
    `rng` (when given) drives dropout; otherwise the state is an empty dict.
    """
    mutable = ["batch_stats"] if (train and "batch_stats" in variables) else False
    rngs = {"dropout": rng} if rng is not None else None
    out = model.apply(variables, inputs, train=train, mutable=mutable, rngs=rngs)
    return out if mutable else (out, {})


class Task(abc.ABC):
    """Base class of all tasks. Subclasses set `model` in __init__."""

    model: nn.Module

    def __init__(self, config):
        self.config = config

    # ------------------------------------------------------------------ model
    @abc.abstractmethod
    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zeros with the shapes/dtypes of a training batch (used to initialise the model)."""

    def init_variables(self, rng: jax.Array, batch: Batch) -> dict:
        """Returns the model's variables: {'params': ..., and e.g. 'batch_stats': ...}."""
        return dict(self.model.init(rng, self.model_inputs(batch), train=False))

    @abc.abstractmethod
    def model_inputs(self, batch: Batch) -> jax.Array:
        """The array the model is applied to, computed from a (device) batch."""

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def loss(
        self, variables: Variables, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        """Training loss. Returns (loss, (scalar metrics, updated mutable model state))."""

    # ------------------------------------------------------------------ evaluation
    @abc.abstractmethod
    def eval_step(self, variables: Variables, batch: Batch) -> dict[str, Any]:
        """Per-batch metric values; rows with batch['valid'] False must not count.

        Each value is either a (sum, count) pair, added up over the split, or an array of
        per-example values (leading batch axis), gathered over the split's valid rows for
        metrics that need every value (AUC, Bland-Altman).
        """

    def finalize_metrics(
        self, totals: Mapping[str, tuple[float, float]], gathered: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """The split's metrics from summed pairs and gathered values (default: sum / count)."""
        return {k: (s / c if c else float("nan")) for k, (s, c) in totals.items()}

    @abc.abstractmethod
    def predict(self, variables: Variables, batch: Batch) -> dict[str, jax.Array]:
        """Inference outputs for a batch (probabilities, masks, points, ...)."""

    # ------------------------------------------------------------------ data
    @abc.abstractmethod
    def train_loader(self, batch_size: int, seed: int):
        """A grain DataLoader of host-local training batches of `batch_size`."""

    @abc.abstractmethod
    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[dict, dict]]:
        """(device_batch, host_batch) pairs covering `split` once."""

    @abc.abstractmethod
    def num_examples(self, split: str) -> int:
        """Number of examples in a split."""

    # ------------------------------------------------------------------ run artifacts
    def save_artifacts(self, run_dir: str) -> None:
        """Writes what inference needs besides the weights and config (e.g. input statistics
        measured on the training data) into the run directory. Default: nothing."""

    def load_artifacts(self, run_dir: str) -> None:
        """Reads what `save_artifacts` wrote, so inference needs no training data."""

    def without_data(self) -> None:
        """Lets the model be initialised and applied without the dataset (benchmarks on
        synthetic batches): constants measured on the data take neutral values."""

    # ------------------------------------------------------------------ reports
    def write_report(self, out_dir: str, samples: list[tuple[dict, dict, dict]]) -> list[str]:
        """Writes pictures of (example, host fields, prediction) samples; returns the paths."""
        return []

    def write_evaluation(
        self,
        out_dir: str,
        split: str,
        gathered: Mapping[str, np.ndarray],
        variables: Variables | None = None,
    ):
        """Writes files made from all of a split's gathered per-example values (prediction
        tables, plots over the whole split); returns the paths. Default: none.

        `variables` (the evaluated model's, when given) lets a task predict again on chosen
        examples, e.g. to picture its worst and best cases. Called on process 0 only."""
        return []
