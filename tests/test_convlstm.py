"""Tests for medjax.models.convlstm: the cell against flax's, peepholes, the scan over time,
quadrant pooling, the ordinal head and helpers, and learning a motion-only toy problem."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medjax import models
from medjax.models.convlstm import (
    ConvLSTMCell,
    ConvLSTMClassifier,
    OrdinalHead,
    ordinal_expected_score,
    ordinal_targets,
    ordinal_to_probs,
    quadrant_mean,
)


def _random_like(tree, seed, scale=0.3):
    """A pytree of the structure of `tree` with normal values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), tree)


def _shapes(module, *args, **kwargs):
    """The variables' shapes and dtypes, without running a random initialisation."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))


def _cell_inputs(features=6, channels=3, seed=0):
    """A non-zero carry and an input for one ConvLSTM step on 7x5 maps."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    carry = (
        jax.random.normal(k1, (2, 7, 5, features)),
        jax.random.normal(k2, (2, 7, 5, features)),
    )
    return carry, jax.random.normal(k3, (2, 7, 5, channels))


def test_cell_without_peepholes_equals_flax_convlstmcell():
    carry, x = _cell_inputs()
    reference = nn.ConvLSTMCell(features=6, kernel_size=(3, 3))
    params = _random_like(_shapes(reference, carry, x), seed=2)
    ours = ConvLSTMCell(features=6, kernel_size=(3, 3), peephole=False)
    assert jax.tree.structure(_shapes(ours, carry, x)) == jax.tree.structure(params)
    (c_ref, h_ref), out_ref = reference.apply(params, carry, x)
    (c, h), out = ours.apply(params, carry, x)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(h_ref)) > 0.05  # Not a degenerate comparison.


def test_peepholes_start_at_zero_and_follow_shi_et_al():
    carry, x = _cell_inputs(seed=3)
    cell = ConvLSTMCell(features=6, kernel_size=(3, 3), peephole=True)
    variables = cell.init(jax.random.key(0), carry, x)
    for name in ("peephole_i", "peephole_f", "peephole_o"):
        assert variables["params"][name].shape == (6,)
        np.testing.assert_array_equal(variables["params"][name], 0.0)
    plain = ConvLSTMCell(features=6, kernel_size=(3, 3), peephole=False)
    conv_params = {k: v for k, v in variables["params"].items() if not k.startswith("peephole")}
    np.testing.assert_allclose(
        cell.apply(variables, carry, x)[1], plain.apply({"params": conv_params}, carry, x)[1]
    )

    params = dict(_random_like(variables["params"], seed=4, scale=0.5))
    (new_c, new_h), _ = cell.apply({"params": params}, carry, x)

    conv = nn.Conv(24, (3, 3), padding="SAME")
    gates = conv.apply({"params": params["ih"]}, x) + conv.apply({"params": params["hh"]}, carry[1])
    i, g, f, o = np.split(np.asarray(gates, np.float64), 4, axis=-1)
    c = np.asarray(carry[0], np.float64)
    w_i, w_f, w_o = (np.asarray(params[k]) for k in ("peephole_i", "peephole_f", "peephole_o"))

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    expected_c = sigmoid(f + w_f * c + 1.0) * c + sigmoid(i + w_i * c) * np.tanh(g)
    expected_h = sigmoid(o + w_o * expected_c) * np.tanh(expected_c)
    np.testing.assert_allclose(new_c, expected_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new_h, expected_h, rtol=1e-4, atol=1e-5)
    without = plain.apply(
        {"params": conv_params | {"ih": params["ih"], "hh": params["hh"]}}, carry, x
    )
    assert float(jnp.max(jnp.abs(without[1] - new_h))) > 1e-2


def test_scan_over_time_equals_a_loop_of_the_cell():
    cell = ConvLSTMCell(features=5, kernel_size=(3, 3), peephole=True)
    frames = jax.random.normal(jax.random.key(0), (2, 6, 8, 8, 3))
    carry = cell.initialize_carry(jax.random.key(1), frames[:, 0].shape)
    params = _random_like(_shapes(cell, carry, frames[:, 0]), seed=5)
    scanned = nn.RNN(cell).apply({"params": {"cell": params["params"]}}, frames)
    outputs = []
    for t in range(frames.shape[1]):
        carry, h = cell.apply(params, carry, frames[:, t])
        outputs.append(h)
    np.testing.assert_allclose(scanned, jnp.stack(outputs, axis=1), rtol=1e-5, atol=1e-5)


def test_quadrant_mean_follows_the_dataset_convention():
    corners = np.array([[1.0, 2.0], [3.0, 4.0]])  # q1 top-left, q2 top-right, q3, q4.
    x = np.kron(corners, np.ones((3, 2)))[None, :, :, None]  # (1, 6, 4, 1)
    np.testing.assert_allclose(quadrant_mean(jnp.asarray(x))[0, :, 0], [1.0, 2.0, 3.0, 4.0])
    # An odd side: the middle row belongs to both halves.
    odd = np.arange(5.0)[None, :, None, None] * np.ones((1, 5, 2, 1))
    np.testing.assert_allclose(quadrant_mean(jnp.asarray(odd))[0, :, 0], [1.0, 1.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="perfect square"):
        quadrant_mean(jnp.asarray(x), num_quadrants=3)


def test_classifier_output_shapes_and_registry():
    clips = jax.random.normal(jax.random.key(0), (2, 5, 16, 16, 1))
    for head, size in (("ordinal", 3), ("softmax", 4)):
        model = ConvLSTMClassifier(width=4, num_layers=2, quadrant_head=head)
        variables = _shapes(model, clips, train=False)
        out = jax.eval_shape(lambda v: model.apply(v, clips, train=False), variables)
        assert out["video_logits"].shape == (2, 4)
        assert out["quadrant_logits"].shape == (2, 4, size)
        assert all(v.dtype == jnp.float32 for v in out.values())
    assert set(variables["params"]) == {"stem", "convlstm1", "convlstm2", "heads"}
    assert variables["params"]["convlstm2"]["ih"]["kernel"].shape == (3, 3, 4, 16)

    config = ml_collections.ConfigDict({"name": "convlstm", "width": 4, "num_layers": 1})
    model = models.build_model(config)
    assert isinstance(model, ConvLSTMClassifier) and model.width == 4
    with pytest.raises(ValueError, match="B, T, H, W, C"):
        model.init(jax.random.key(0), clips[:, 0], train=False)


def test_ordinal_head_and_helpers():
    head = OrdinalHead(num_classes=4)
    x = jax.random.normal(jax.random.key(0), (3, 4, 8))
    variables = head.init(jax.random.key(1), x)
    zero_score = jax.tree.map(jnp.zeros_like, variables)
    zero_score["params"]["thresholds"] = variables["params"]["thresholds"]
    np.testing.assert_allclose(ordinal_to_probs(head.apply(zero_score, x)), 0.25, atol=1e-6)

    # Any parameters give ordered thresholds, hence proper probabilities.
    params = _random_like(variables, seed=1, scale=3.0)
    logits = head.apply(params, x)
    assert logits.shape == (3, 4, 3)
    assert bool(jnp.all(jnp.diff(logits, axis=-1) < 0))
    probs = ordinal_to_probs(logits)
    assert probs.shape == (3, 4, 4) and bool(jnp.all(probs >= 0))
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        ordinal_expected_score(logits), jnp.sum(probs * jnp.arange(4.0), -1), rtol=1e-5
    )

    logit = np.log(np.array([0.9, 0.6, 0.2]) / np.array([0.1, 0.4, 0.8]))
    np.testing.assert_allclose(
        ordinal_to_probs(jnp.asarray(logit)), [0.1, 0.3, 0.4, 0.2], atol=1e-6
    )
    np.testing.assert_allclose(ordinal_expected_score(jnp.asarray(logit)), 1.7, rtol=1e-6)
    np.testing.assert_array_equal(
        ordinal_targets(jnp.array([0, 2, 3, -1]), 4),
        [[0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]],
    )


def _motion_clips(num, frames=8, size=16, seed=0):
    """Clips of one bright 2x2 dot; label 1 if it moves one pixel per frame, 0 if static.

    Every clip draws a trajectory; a static clip shows a random point of it in all frames,
    so single frames of both classes have the same distribution of dot positions.
    """
    rng = np.random.default_rng(seed)
    clips = np.zeros((num, frames, size, size, 1), np.float32)
    labels = np.arange(num) % 2
    last = size - 2  # Top-left corner of a dot touching the border.
    for n in range(num):
        start = rng.integers(0, last + 1, size=2)
        step = np.zeros(2, int)
        axis = rng.integers(2)
        step[axis] = 1 if start[axis] + frames - 1 <= last else -1
        path = start + np.arange(frames)[:, None] * step
        if not labels[n]:
            path = np.repeat(path[rng.integers(frames)][None], frames, axis=0)
        for t, (r, c) in enumerate(path):
            clips[n, t, r : r + 2, c : c + 2, 0] = 1.0
    return jnp.asarray(clips), jnp.asarray(labels)


def test_learns_a_class_that_only_motion_reveals():
    clips, labels = _motion_clips(32, frames=6, size=10)
    model = ConvLSTMClassifier(
        width=4, num_layers=1, stem_stride=1, num_classes=2, quadrant_head="softmax"
    )
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(clips[:2])["params"]
    tx = optax.adam(2e-2)
    opt_state = tx.init(params)

    def loss_fn(params):
        logits = model.apply({"params": params}, clips, train=True)["video_logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(100):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[0] > 0.6
    assert np.mean(losses[-5:]) < 0.1, losses[::10]
    # New clips: the model learned motion, not the training clips.
    test_clips, test_labels = _motion_clips(64, frames=6, size=10, seed=1)
    logits = model.apply({"params": params}, test_clips, train=False)["video_logits"]
    assert float(jnp.mean(jnp.argmax(logits, -1) == test_labels)) >= 0.9
