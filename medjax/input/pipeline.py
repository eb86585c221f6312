"""grain pipelines over TFDS data sources: training stream and evaluation batches.

Training: an endless, shuffled stream in a global order that does not depend on how many
processes read it (`GlobalOrderSource`); deterministic per-example preprocessing, then random
augmentation seeded by each example's global position (so a resumed iterator, or a job with
another process count, reproduces the same augmented batches), then batching. The loader's
iterator state is JSON and goes into the checkpoint.

Evaluation: every example of the split exactly once, deterministic preprocessing only, each
process reading its own strided share; the last batch is padded and carries `valid` so
metrics ignore the padding and every process runs the same number of steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import grain.python as grain
import jax
import numpy as np

Example = dict[str, Any]
Preprocess = Callable[[Example], Example]
Augment = Callable[[Example, np.random.Generator], Example]


class GlobalOrderSource:
    """The training stream as a random-access source whose order ignores the process count.

    Global position g (the g-th example the whole job trains on) holds record
    perm_e[g % N] of epoch e = g // N, where perm_e is a permutation seeded by (seed, e).
    Global batch t is positions [t*B, (t+1)*B); process p of P reads its slice
    [t*B + p*b, t*B + (p+1)*b) with b = B / P. One process with 4 devices and two processes with
    2 each therefore train on exactly the same batches, and each example's augmentation is
    seeded by its global position, not by which process read it.

    Args:
      source: random-access data source of N records.
      process_batch_size: b, examples per batch on this process.
      num_processes: P.
      process_index: p.
      seed: shuffling seed.
    """

    def __init__(
        self,
        source: Sequence,
        process_batch_size: int,
        num_processes: int,
        process_index: int,
        seed: int,
    ):
        self.source = source
        self.b, self.num_processes, self.process_index = (
            process_batch_size,
            num_processes,
            process_index,
        )
        self.seed = seed
        self._permutation = (None, None)  # (epoch, permutation) of the last epoch read.

    def __repr__(self) -> str:
        # grain compares reprs to check that a restored iterator state fits this stream. The
        # process index is left out: every process consumes the same local indices, so the
        # state saved by process 0 restores all of them.
        return (
            f"GlobalOrderSource(records={len(self.source)}, "
            f"process_batch_size={self.b}, seed={self.seed})"
        )

    def __len__(self) -> int:
        return 2**40  # Endless for any practical run; grain never materialises it.

    def global_position(self, index: int) -> int:
        batch, offset = divmod(index, self.b)
        return (batch * self.num_processes + self.process_index) * self.b + offset

    def __getitem__(self, index: int) -> tuple[int, Any]:
        position = self.global_position(int(index))
        epoch, k = divmod(position, len(self.source))
        if self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = (epoch, rng.permutation(len(self.source)))
        return position, self.source[int(self._permutation[1][k])]


class Subset:
    """The records `indices` of a random-access source, itself random access (picklable)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[int(i)]]

    def __repr__(self) -> str:
        return f"Subset({len(self.indices)} of {len(self.source)})"


class _PrepareTrainExample(grain.MapTransform):
    """Deterministic preprocessing, then augmentation seeded by the example's global position
    (picklable when the functions are module-level functions or partials of them)."""

    def __init__(self, preprocess: Preprocess, augment: Optional[Augment], seed: int):
        self.preprocess, self.augment, self.seed = preprocess, augment, seed

    def map(self, element):
        position, record = element
        example = self.preprocess(record)
        if self.augment is not None:
            example = self.augment(example, np.random.default_rng([self.seed, 1, position]))
        return example


def train_loader(
    source: Sequence,
    *,
    preprocess: Preprocess,
    augment: Optional[Augment],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
) -> grain.DataLoader:
    """An endless, shuffled, augmented stream of host-local batches of `batch_size`.

    Args:
      source: a random-access data source (e.g. `builder.as_data_source()[split]`).
      preprocess: deterministic example -> example (decode, resize, select keys).
      augment: random (example, rng) -> example, or None.
      batch_size: examples per batch on THIS process.
      seed: shuffling and augmentation seed.
      num_workers: grain worker processes (0: in the main process).
    """
    global_batch = batch_size * jax.process_count()
    if len(source) < global_batch:
        raise ValueError(
            f"The training split has {len(source)} examples, fewer than the global batch size "
            f"{global_batch}: lower train.batch_size."
        )
    stream = GlobalOrderSource(source, batch_size, jax.process_count(), jax.process_index(), seed)
    sampler = grain.IndexSampler(
        num_records=len(stream), shard_options=grain.NoSharding(), shuffle=False, num_epochs=1
    )
    return grain.DataLoader(
        data_source=stream,
        sampler=sampler,
        operations=[
            _PrepareTrainExample(preprocess, augment, seed),
            grain.Batch(batch_size, drop_remainder=True),
        ],
        worker_count=num_workers,
    )


def eval_batches(
    source: Sequence, *, preprocess: Preprocess, batch_size: int, host_keys: Sequence[str] = ()
) -> Iterator[tuple[Example, Example]]:
    """Yields (device_batch, host_batch) covering each example of `source` once.

    Args:
      source: random-access data source.
      preprocess: deterministic example -> example.
      batch_size: examples per batch on THIS process.
      host_keys: keys kept on the host (strings such as ids), returned in `host_batch` as
        lists; all other keys are stacked into numpy arrays for the device.

    Each device batch has a boolean `valid` row mask; padding rows repeat the first example.
    """
    process, num_processes = jax.process_index(), jax.process_count()
    indices = list(range(process, len(source), num_processes))
    per_process = math.ceil(len(source) / num_processes)
    num_batches = math.ceil(per_process / batch_size)
    for b in range(num_batches):
        chunk = indices[b * batch_size : (b + 1) * batch_size]
        examples = [preprocess(source[i]) for i in chunk]
        if not examples:  # This process ran out before the others: a fully padded batch.
            examples = [preprocess(source[0])]
            num_valid = 0
        else:
            num_valid = len(examples)
        examples += [examples[0]] * (batch_size - len(examples))
        host = {k: [e[k] for e in examples[:num_valid]] for k in host_keys}
        device = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k not in host_keys}
        device["valid"] = np.arange(batch_size) < num_valid
        yield device, host


def decode_text(value: Any) -> str:
    """TFDS text features come back as bytes (or numpy bytes); make them str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
