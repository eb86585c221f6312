"""Frame embedders: the VAE's KL term against its closed form and a Monte Carlo estimate,
reparameterised gradients, the reconstruction losses, and both the VAE and the denoising
autoencoder learning on tiny frames."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.models import vae


def discs(num: int, size: int, seed: int) -> np.ndarray:
    """(num, size, size, 1) frames in [0, 1]: a bright centred disc of random radius on gray."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    frames = np.full((num, size, size, 1), 0.3, np.float32)
    for frame in frames:
        radius = rng.uniform(0.12, 0.45) * size
        frame[..., 0] = np.where(np.hypot(xx - centre, yy - centre) < radius, 0.8, 0.3)
    return frames


def test_gaussian_kl_is_the_closed_form_and_the_monte_carlo_estimate():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 5)).astype(np.float32)
    logvar = rng.normal(scale=0.7, size=(3, 5)).astype(np.float32)
    kl = np.asarray(vae.gaussian_kl(mean, logvar))
    sigma = np.exp(0.5 * logvar.astype(np.float64))
    # KL(N(m, s^2) || N(0, 1)) per dimension: -log s + (s^2 + m^2) / 2 - 1/2.
    expected = np.sum(-np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5, axis=-1)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    assert float(vae.gaussian_kl(jnp.zeros(4), jnp.zeros(4))) == 0.0

    # E_q[log q(z) - log p(z)] over reparameterised samples.
    samples = 200_000
    z = np.asarray(
        vae.reparameterize(
            jax.random.key(0),
            jnp.broadcast_to(mean, (samples,) + mean.shape),
            jnp.broadcast_to(logvar, (samples,) + logvar.shape),
        ),
        np.float64,
    )
    log_q = np.sum(-0.5 * ((z - mean) / sigma) ** 2 - np.log(sigma), axis=-1)
    log_p = np.sum(-0.5 * z**2, axis=-1)
    estimate = log_q - log_p
    error = estimate.std(axis=0) / math.sqrt(samples)
    assert np.all(np.abs(estimate.mean(axis=0) - kl) < 4 * error + 1e-3), (estimate.mean(0), kl)


def test_reparameterised_samples_carry_gradients_to_mean_and_log_variance():
    mean = jnp.array([0.5, -1.0, 2.0])
    logvar = jnp.array([0.0, -1.0, 0.7])

    def expected_square(mean, logvar):
        samples = (50_000,) + mean.shape
        z = vae.reparameterize(
            jax.random.key(1), jnp.broadcast_to(mean, samples), jnp.broadcast_to(logvar, samples)
        )
        return jnp.mean(jnp.sum(z**2, axis=-1))  # E[z^2] = mean^2 + exp(logvar), per dim.

    d_mean, d_logvar = jax.jit(jax.grad(expected_square, argnums=(0, 1)))(mean, logvar)
    np.testing.assert_allclose(d_mean, 2 * mean, atol=0.05)
    np.testing.assert_allclose(d_logvar, jnp.exp(logvar), rtol=0.03)

    model = vae.VAE(image_size=8, latent_dim=2, width=2, levels=1, blocks=0)
    x = jnp.asarray(discs(2, 8, 0))
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)

    def loss(params):
        out = model.apply({"params": params}, x, train=True, rngs={"latent": jax.random.key(2)})
        return jnp.mean(vae.reconstruction_loss(out["logits"], x))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    # The decoder's loss reaches the encoder only through the sampled z.
    assert float(optax.tree.norm(grads["encoder"])) > 0


def test_reconstruction_losses_are_summed_per_example():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    target = rng.uniform(size=(2, 4, 4, 1)).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    np.testing.assert_allclose(
        vae.reconstruction_loss(logits, target, "bce"), bce.sum(axis=(1, 2, 3)), rtol=1e-5
    )
    np.testing.assert_allclose(
        vae.reconstruction_loss(logits, target, "mse"),
        ((p - target) ** 2).sum(axis=(1, 2, 3)),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="config.loss.reconstruction='l1'"):
        vae.reconstruction_loss(logits, target, "l1")
    with pytest.raises(ValueError, match="divide by 2\\*\\*levels"):
        vae.VAE(image_size=12, levels=3).init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))


def _train(model, frames, loss_fn, steps: int):
    """Adam on one fixed batch; returns (variables, losses)."""
    # The 'rbg' generator: its initialisation compiles several times faster on a CPU.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), frames)
    tx = optax.adam(3e-3)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, losses = variables["params"], []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    return {"params": params}, np.array(losses)


def test_vae_reconstruction_loss_falls():
    frames = jnp.asarray(discs(32, 16, 1))
    model = vae.VAE(image_size=16, latent_dim=2, width=4, levels=2, blocks=0, norm=False)

    def loss_fn(params, key):
        out = model.apply({"params": params}, frames, train=True, rngs={"latent": key})
        recon = vae.reconstruction_loss(out["logits"], frames, "bce")
        return jnp.mean(recon + 0.1 * vae.gaussian_kl(out["mean"], out["logvar"]))

    variables, losses = _train(model, frames, loss_fn, 60)
    # The cross-entropy of gray targets is at least their entropy; what is above it must fall.
    p = np.clip(np.asarray(frames, np.float64), 1e-7, 1 - 1e-7)
    floor = float(np.mean(np.sum(-(p * np.log(p) + (1 - p) * np.log(1 - p)), axis=(1, 2, 3))))
    assert losses[-5:].mean() - floor < 0.5 * (losses[:3].mean() - floor), (losses, floor)
    out = jax.jit(model.apply)(variables, frames)
    mse = float(jnp.mean((jax.nn.sigmoid(out["logits"]) - frames) ** 2))
    # Better than the mean frame, which knows nothing of each frame's radius...
    assert mse < 0.75 * float(jnp.mean(jnp.var(frames, axis=0))), mse
    # ...which passes through z.
    assert float(jnp.mean(vae.gaussian_kl(out["mean"], out["logvar"]))) > 1.0


def test_denoising_autoencoder_removes_noise():
    frames = jnp.asarray(discs(32, 16, 2))
    model = vae.DenoisingAutoencoder(
        image_size=16,
        latent_dim=8,
        width=4,
        levels=2,
        blocks=0,
        norm=False,
        noise_std=0.2,
        mask_prob=0.2,
    )

    def loss_fn(params, key):
        out = model.apply({"params": params}, frames, train=True, rngs={"noise": key})
        return jnp.mean(vae.reconstruction_loss(out["logits"], frames, "mse"))

    variables, losses = _train(model, frames, loss_fn, 80)
    assert losses[-5:].mean() < 0.6 * losses[:3].mean(), losses
    noisy = vae.corrupt(jax.random.key(99), frames, 0.2, 0.2)
    denoised = jax.nn.sigmoid(jax.jit(model.apply)(variables, noisy)["logits"])
    error = float(jnp.mean((denoised - frames) ** 2))
    assert error < 0.5 * float(jnp.mean((noisy - frames) ** 2)), error
    # Each frame's own disc is restored, not just the mean frame.
    assert error < 0.75 * float(jnp.mean(jnp.var(frames, axis=0))), error
    embedding = jax.eval_shape(lambda v, x: model.apply(v, x, method="embed"), variables, frames)
    assert embedding.shape == (32, 8)
