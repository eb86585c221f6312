"""Sequence classifiers over per-frame embeddings, for the embryo time-lapse task.

`LSTMClassifier` reads a video as a sequence of per-frame feature vectors (frame embeddings,
optionally with each frame's time) padded to a fixed length T, with each video's true length:

    features (B, T, F) -> Dense(hidden) + GELU -> dropout -> LSTM x num_layers
        -> video vector (the last valid step's hidden state, or the mean over valid steps)
        -> dropout -> Dense(num_classes): outcome logits (B, num_classes)
        per step  -> Dense(num_phases):   phase logits (B, T, num_phases), when num_phases > 0

The LSTM is `flax.linen.RNN` over `OptimizedLSTMCell` with `seq_lengths`, so padding steps
never reach the video vector (`bidirectional`: a second LSTM reads each video backwards from
its last valid step). Padded steps' phase logits are computed but must be masked by the loss.

`FrameSequenceClassifier` puts a frame encoder (`backbone`, any module with an
`embed(frames) -> (N, D)` method such as `medjax.models.vae.VAE`) in front of an
`LSTMClassifier` (`head`), to fine-tune the embedder and the classifier end to end on frames.
Its parameter groups are named so that `config.model.freeze_backbone_steps` and
`backbone_lr_multiplier` of the trainer apply to the encoder.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("last", "mean")


def step_mask(lengths: jax.Array, num_steps: int) -> jax.Array:
    """(B, T) bool: True at the valid steps t < lengths[b]."""
    return jnp.arange(num_steps)[None, :] < jnp.asarray(lengths)[:, None]


def sequence_features(
    embeddings: jax.Array,
    hours: jax.Array,
    mean: jax.Array | Sequence[float],
    std: jax.Array | Sequence[float],
    *,
    max_hours: float,
    use_hours: bool,
) -> jax.Array:
    """Per-frame classifier inputs: standardised embeddings, then (optionally) hours / max_hours.

    Args:
      embeddings: (..., D) frame embeddings.
      hours: (...) time of each frame since insemination.
      mean, std: (D,) statistics of the training frames' embeddings.
      max_hours: the time scale (the dataset's max_hours).
      use_hours: append the scaled time as one more feature.

    Returns:
      (..., D + use_hours) float32.
    """
    z = (jnp.asarray(embeddings, jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
        std, jnp.float32
    )
    if not use_hours:
        return z
    t = jnp.asarray(hours, jnp.float32)[..., None] / max_hours
    return jnp.concatenate([z, t], axis=-1)


class LSTMClassifier(nn.Module):
    """Video outcome (and optional per-frame phase) from a padded feature sequence.

    Attributes:
      num_classes: outcome classes.
      hidden: LSTM units (and the input projection's size).
      num_layers: stacked LSTM layers.
      bidirectional: also read each sequence backwards.
      pooling: 'last' (hidden state at the last valid step) or 'mean' (over valid steps).
      dropout_rate: dropout on the projected inputs and on the video vector.
      num_phases: size of the per-frame phase head; 0 for none.

    Inputs: {'features': (B, T, F) float, 'lengths': (B,) int32}. Returns {'logits': (B,
    num_classes)} and, with a phase head, 'phase_logits' (B, T, num_phases).
    """

    num_classes: int = 3
    hidden: int = 64
    num_layers: int = 1
    bidirectional: bool = False
    pooling: str = "last"
    dropout_rate: float = 0.0
    num_phases: int = 0

    @nn.compact
    def __call__(self, inputs: dict, train: bool = False) -> dict[str, jax.Array]:
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"config.model.pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}."
            )
        features = jnp.asarray(inputs["features"], jnp.float32)
        lengths = jnp.asarray(inputs["lengths"], jnp.int32)
        x = nn.gelu(nn.Dense(self.hidden, name="project")(features))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        last = None
        for layer in range(self.num_layers):
            forward = nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"lstm{layer}")
            if self.bidirectional:
                backward = nn.RNN(
                    nn.OptimizedLSTMCell(self.hidden),
                    reverse=True,
                    keep_order=True,
                    name=f"lstm{layer}_backward",
                )
                rnn = nn.Bidirectional(forward, backward, return_carry=True)
                ((_, h_forward), (_, h_backward)), x = rnn(x, seq_lengths=lengths)
                last = jnp.concatenate([h_forward, h_backward], axis=-1)
            else:
                (_, last), x = forward(x, seq_lengths=lengths, return_carry=True)
        mask = step_mask(lengths, x.shape[1])
        if self.pooling == "mean":
            weights = mask[..., None].astype(x.dtype)
            video = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        else:
            video = last
        video = nn.Dropout(self.dropout_rate, deterministic=not train)(video)
        out = {"logits": nn.Dense(self.num_classes, name="outcome")(video)}
        if self.num_phases > 0:
            out["phase_logits"] = nn.Dense(self.num_phases, name="phase")(x)
        return out


class FrameSequenceClassifier(nn.Module):
    """A frame encoder (`backbone`) and an `LSTMClassifier` (`head`), trained end to end.

    Attributes:
      backbone: a module with `embed(frames (N, S, S, C)) -> (N, D)`.
      head: the sequence classifier.
      feature_mean, feature_std: (D,) standardisation of the embeddings (those the head was
        designed for: the training frames' statistics under the initial encoder).
      max_hours, use_hours: as `sequence_features`.

    Inputs: {'frames': (B, T, S, S, C) float in [0, 1], 'hours': (B, T), 'lengths': (B,)}.
    """

    backbone: nn.Module
    head: LSTMClassifier
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    max_hours: float = 140.0
    use_hours: bool = True

    def __call__(self, inputs: dict, train: bool = False) -> dict[str, jax.Array]:
        frames = jnp.asarray(inputs["frames"], jnp.float32)
        b, t = frames.shape[:2]
        z = self.backbone.embed(frames.reshape((b * t,) + frames.shape[2:])).reshape(b, t, -1)
        features = sequence_features(
            z,
            inputs["hours"],
            self.feature_mean,
            self.feature_std,
            max_hours=self.max_hours,
            use_hours=self.use_hours,
        )
        return self.head({"features": features, "lengths": inputs["lengths"]}, train=train)
