"""Frame embedders for the embryo task: a convolutional VAE and a stacked denoising autoencoder.

Both map a (B, S, S, C) image with values in [0, 1] to a latent vector and back, and are
trained without labels on single frames; their latent code is the frame's embedding.

- `VAE` (Kingma & Welling, 2014): the encoder gives the mean and log-variance of a diagonal
  Gaussian q(z | x); in training z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (the
  reparameterisation, drawn from the 'latent' RNG stream), at evaluation z = mean. The loss
  is the negative ELBO with a weight beta on the KL term (beta-VAE; beta = 1 is the ELBO):
  `reconstruction_loss(logits, x) + beta * gaussian_kl(mean, logvar)`.
- `DenoisingAutoencoder` (Vincent et al., 2010): the input is corrupted (`corrupt`: additive
  Gaussian noise and masking noise, pixels set to 0) and the clean frame reconstructed. It is
  "stacked" in that the encoder is a stack of `levels` convolutional levels, each halving the
  resolution, mirrored by the decoder; the levels are trained jointly, end to end, not
  greedily one at a time as in the original stacked DAE.

Encoder: per level, a stride-2 3x3 convolution then `blocks` 3x3 convolutions (each with
GroupNorm when `norm`, and ReLU), `width * 2**level` channels; then a dense layer to the
latent size (twice that for the VAE). Decoder: a dense layer to the coarsest grid, per level
a nearest-neighbour 2x upsampling, a 3x3 convolution and `blocks` more, then a 3x3
convolution to the image channels. The decoder returns logits;
`jax.nn.sigmoid(logits)` is the reconstructed image. No batch statistics: training and
evaluation compute the same function. `image_size` must divide by 2**levels.

The loss functions return per-example sums over pixels / latent dimensions (shape (B,)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

RECONSTRUCTION_LOSSES = ("bce", "mse")


def _activate(x: jax.Array, channels: int, norm: bool) -> jax.Array:
    if norm:
        x = nn.GroupNorm(num_groups=min(8, channels))(x)
    return nn.relu(x)


class ConvEncoder(nn.Module):
    """Image (B, S, S, C) -> (B, features).

    Attributes:
      features: size of the output vector.
      width: channels of the first level; level l has width * 2**l.
      levels: number of stride-2 levels.
      blocks: 3x3 convolutions per level after the stride-2 one.
      norm: GroupNorm after every convolution.
    """

    features: int
    width: int = 16
    levels: int = 3
    blocks: int = 1
    norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for level in range(self.levels):
            channels = self.width * 2**level
            x = nn.Conv(channels, (3, 3), strides=(2, 2), padding=1, name=f"down{level}")(x)
            x = _activate(x, channels, self.norm)
            for block in range(self.blocks):
                x = nn.Conv(channels, (3, 3), padding=1, name=f"conv{level}_{block}")(x)
                x = _activate(x, channels, self.norm)
        return nn.Dense(self.features, name="out")(x.reshape(x.shape[0], -1))


class ConvDecoder(nn.Module):
    """Latent (B, D) -> image logits (B, S, S, C).

    Attributes:
      image_size: S, divisible by 2**levels.
      channels: image channels C.
      width, levels, blocks, norm: as the encoder's (the decoder mirrors it).
    """

    image_size: int
    channels: int = 1
    width: int = 16
    levels: int = 3
    blocks: int = 1
    norm: bool = True

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        base = self.image_size // 2**self.levels
        top = self.width * 2 ** (self.levels - 1)
        x = nn.Dense(base * base * top, name="in")(z)
        x = nn.relu(x.reshape(z.shape[0], base, base, top))
        for level in reversed(range(self.levels)):
            channels = self.width * 2**level
            # Nearest-neighbour upsampling then a convolution: as expressive as a stride-2
            # transposed convolution here, several times faster to differentiate on a CPU.
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nn.Conv(channels, (3, 3), padding=1, name=f"up{level}")(x)
            x = _activate(x, channels, self.norm)
            for block in range(self.blocks):
                x = nn.Conv(channels, (3, 3), padding=1, name=f"conv{level}_{block}")(x)
                x = _activate(x, channels, self.norm)
        return nn.Conv(self.channels, (3, 3), padding=1, name="logits")(x)


def _check_size(image_size: int, levels: int) -> None:
    if levels < 1 or image_size % 2**levels:
        raise ValueError(
            f"config.model.image_size={image_size} must divide by 2**levels = {2**levels} "
            f"(config.model.levels={levels}); change one of them."
        )


class VAE(nn.Module):
    """Convolutional variational autoencoder (see the module docstring).

    Attributes:
      image_size: frame side S.
      latent_dim: size of z.
      width, levels, blocks, norm: encoder / decoder size (see `ConvEncoder`).
      channels: image channels.

    `__call__(x, train)` returns {'logits', 'mean', 'logvar', 'z'}; training draws z from the
    'latent' RNG stream. `embed(x)` returns the mean, the deterministic embedding.
    """

    image_size: int = 64
    latent_dim: int = 32
    width: int = 16
    levels: int = 3
    blocks: int = 1
    norm: bool = True
    channels: int = 1

    def setup(self):
        _check_size(self.image_size, self.levels)
        self.encoder = ConvEncoder(
            2 * self.latent_dim, self.width, self.levels, self.blocks, self.norm
        )
        self.decoder = ConvDecoder(
            self.image_size, self.channels, self.width, self.levels, self.blocks, self.norm
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, log-variance) of q(z | x), each (B, latent_dim)."""
        h = self.encoder(x)
        return h[:, : self.latent_dim], h[:, self.latent_dim :]

    def decode(self, z: jax.Array) -> jax.Array:
        """Image logits (B, S, S, C) of latent codes (B, latent_dim)."""
        return self.decoder(z)

    def embed(self, x: jax.Array) -> jax.Array:
        """The embedding of frames: the posterior mean, (B, latent_dim)."""
        return self.encode(x)[0]

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        mean, logvar = self.encode(x)
        z = reparameterize(self.make_rng("latent"), mean, logvar) if train else mean
        return {"logits": self.decode(z), "mean": mean, "logvar": logvar, "z": z}


class DenoisingAutoencoder(nn.Module):
    """Stacked convolutional denoising autoencoder (see the module docstring).

    Attributes:
      image_size, latent_dim, width, levels, blocks, norm, channels: as `VAE`.
      noise_std: standard deviation of the additive Gaussian noise (image in [0, 1]).
      mask_prob: share of pixels set to 0 (masking noise).

    `__call__(x, train)` returns {'logits', 'z', 'corrupted'}; training corrupts x with the
    'noise' RNG stream and reconstructs from the corrupted frame. `embed(x)` encodes a clean
    frame.
    """

    image_size: int = 64
    latent_dim: int = 32
    width: int = 16
    levels: int = 3
    blocks: int = 1
    norm: bool = True
    channels: int = 1
    noise_std: float = 0.1
    mask_prob: float = 0.2

    def setup(self):
        _check_size(self.image_size, self.levels)
        self.encoder = ConvEncoder(self.latent_dim, self.width, self.levels, self.blocks, self.norm)
        self.decoder = ConvDecoder(
            self.image_size, self.channels, self.width, self.levels, self.blocks, self.norm
        )

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)

    def embed(self, x: jax.Array) -> jax.Array:
        """The embedding of (clean) frames, (B, latent_dim)."""
        return self.encode(x)

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if train:
            x = corrupt(self.make_rng("noise"), x, self.noise_std, self.mask_prob)
        z = self.encode(x)
        return {"logits": self.decode(z), "z": z, "corrupted": x}


# ============================================================================ losses
def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps with eps ~ N(0, I): differentiable in mean, logvar."""
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) per example, summed over the last axis.

    Closed form: 0.5 * sum(exp(logvar) + mean**2 - 1 - logvar).

    Args:
      mean, logvar: (..., D).

    Returns:
      (...,) nats.
    """
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


def reconstruction_loss(logits: jax.Array, target: jax.Array, kind: str = "bce") -> jax.Array:
    """Per-example reconstruction loss summed over pixels.

    Args:
      logits: (B, ...) decoder logits.
      target: (B, ...) clean image in [0, 1].
      kind: 'bce' (Bernoulli likelihood: sigmoid cross-entropy, the usual VAE choice for
        images in [0, 1]; its minimum is the targets' entropy, not 0) or 'mse' (squared
        error of sigmoid(logits), a Gaussian likelihood up to constants).

    Returns:
      (B,) float32.
    """
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(
            f"config.loss.reconstruction={kind!r} is not one of {', '.join(RECONSTRUCTION_LOSSES)}."
        )
    logits = logits.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if kind == "bce":
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, target)
    else:
        per_pixel = jnp.square(jax.nn.sigmoid(logits) - target)
    return jnp.sum(per_pixel.reshape(per_pixel.shape[0], -1), axis=-1)


def corrupt(rng: jax.Array, x: jax.Array, noise_std: float, mask_prob: float) -> jax.Array:
    """Denoising-autoencoder corruption of images in [0, 1]: masking noise (each pixel set to
    0 with probability `mask_prob`), then additive Gaussian noise, clipped to [0, 1]."""
    mask_rng, noise_rng = jax.random.split(rng)
    keep = jax.random.bernoulli(mask_rng, 1.0 - mask_prob, x.shape)
    noisy = jnp.where(keep, x, 0.0) + noise_std * jax.random.normal(noise_rng, x.shape, x.dtype)
    return jnp.clip(noisy, 0.0, 1.0)
