"""The optimizers the configs select: AdamW + cosine, and the EchoNet paper's SGD + step decay."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import train
from tests.conftest import REPO, load_config


def test_paper_sgd_decays_tenfold_every_period_and_matches_pytorch_sgd():
    config = load_config(f"{REPO}/configs/echonet.py", arg="paper")
    tx, schedule = train.make_optimizer(config, ("head",))
    period = config.optimizer.lr_step_every
    assert config.optimizer.name == "sgd" and config.train.learning_rate == 1e-4
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(period - 1)) == pytest.approx(1e-4)
    assert float(schedule(period)) == pytest.approx(1e-5)
    assert float(schedule(2 * period + 5)) == pytest.approx(1e-6)
    # PyTorch SGD: g' = g + wd * w; v = momentum * v + g'; w -= lr * v.
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    state = tx.init(params)
    velocity = np.zeros(2)
    w = np.array([1.0, -2.0])
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        velocity = 0.9 * velocity + (np.array([0.5, 0.25]) + 1e-4 * w)
        w = w - 1e-4 * velocity
    np.testing.assert_allclose(params["w"], w, rtol=1e-6)


def test_unknown_optimizer_is_named():
    config = load_config(f"{REPO}/configs/echonet.py", arg="smoke")
    config.optimizer.name = "lamb"
    with pytest.raises(ValueError, match="'lamb'"):
        train.make_optimizer(config, ("head",))
