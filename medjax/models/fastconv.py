"""Convolution, pooling and batch-norm layers that compute what XLA's own do, faster on CPUs.

Measured on XLA's CPU backend (jaxlib 0.10, one core), the training steps of medjax's video
and segmentation networks lose most time in a few places, each replaced here by an exact
reformulation:

- 3-D convolutions: a factorised kernel runs as a 2-D convolution by folding an axis into
  the batch or the width: a (1, kh, kw) kernel over (N*T, H, W, C), a (kt, 1, 1) kernel over
  (N, T, H*W, C) with a (kt, 1) kernel, a (1, 1, 1) kernel as a strided slice and a matrix
  product (`conv3d`; the R(2+1)D-18 layers run 2-4 times faster, forward and input gradient).
- kernel gradients of wide convolutions (a 3x3, 64 -> 144 channel kernel over 56x56 maps
  takes four times its forward pass): on CPU they are computed tap by tap, one
  (pixels, C)^T @ (pixels, O) matrix product per kernel tap in a loop (`conv2d` with
  ``weight_grad="taps"``); the input gradient stays XLA's transposed convolution. For narrow
  convolutions (16-64 channels) XLA's own kernel gradient is faster: ``weight_grad="xla"``.
- 2x2 max pooling, whose gradient XLA lowers to a reduce-window over index arrays and a
  scatter: a reshape and one element-wise pass (`max_pool_2x2`).
- batch norm + ReLU: a hand-written backward pass of two passes over the map (`BatchNorm`).

The reshapes, the pooling and the batch norm are exact and fine on any backend. The tap-wise
kernel gradient is a CPU choice: ``weight_grad="auto"`` takes it only when
`jax.default_backend()` is ``"cpu"`` at trace time and leaves GPUs and TPUs to XLA's own
(cuDNN's / the TPU's) gradient convolutions. Results equal XLA's up to float rounding
(summation order), in float32 and bfloat16, with the batch sharded over a mesh or not.

`Conv` is a drop-in `flax.linen.Conv` (same ``kernel`` / ``bias`` parameters, shapes,
initialisers and outputs) for 2-D and 3-D convolutions without dilation or groups;
`BatchNorm` has `flax.linen.BatchNorm`'s variables.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["BatchNorm", "Conv", "conv2d", "conv3d", "max_pool_2x2", "WEIGHT_GRADS"]

WEIGHT_GRADS = ("auto", "taps", "xla")

Padding = Union[str, Sequence[tuple[int, int]]]

_DN_2D = ("NHWC", "HWIO", "NHWC")
_DN_3D = ("NDHWC", "DHWIO", "NDHWC")


def _lax_conv2d(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN_2D)


def _tap_weight_grad(x, dy, kernel_shape, strides, padding):
    """Kernel gradient of a 2-D convolution as one (pixels, C)^T @ (pixels, O) product per tap.

    The taps run one after another in a loop, so that only one shifted copy of the input
    exists at a time (unrolled, XLA materialises all of them at once and the step's memory
    doubles). A strided convolution's padded input is first split into its stride phases,
    (sh, sw, N, H / sh, W / sw, C), so that every tap is a contiguous window of one phase.

    Args:
      x: the convolution's NHWC input.
      dy: the gradient of its NHWC output.
      kernel_shape: (kh, kw, C, O).
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)).

    Returns:
      The float32 HWIO kernel gradient.
    """
    kh, kw, c, o = kernel_shape
    sh, sw = strides
    n, ho, wo, _ = dy.shape
    # Rows and columns the taps reach, rounded up to whole stride phases.
    hq = (kh - 1) // sh + ho
    wq = (kw - 1) // sw + wo
    (top, _), (left, _) = padding
    h, w = x.shape[1:3]
    # Negative high padding crops rows and columns that no tap reaches.
    xp = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        ((0, 0, 0), (top, hq * sh - h - top, 0), (left, wq * sw - w - left, 0), (0, 0, 0)),
    )
    phases = xp.reshape(n, hq, sh, wq, sw, c).transpose(2, 4, 0, 1, 3, 5)
    dy_flat = dy.reshape(-1, o)
    taps = jnp.array([(i % sh, j % sw, i // sh, j // sw) for i in range(kh) for j in range(kw)])

    def tap_grad(carry, tap):
        a, b, di, dj = tap[0], tap[1], tap[2], tap[3]
        zero = jnp.zeros((), tap.dtype)
        window = lax.dynamic_slice(phases, (a, b, zero, di, dj, zero), (1, 1, n, ho, wo, c))
        # A 2-D product: XLA's CPU dot with several contracting axes is many times slower.
        grad = lax.dot_general(
            window.reshape(-1, c),
            dy_flat,
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return carry, grad

    _, grads = lax.scan(tap_grad, None, taps)
    return grads.reshape(kh, kw, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_tap_grad(x, kernel, strides, padding):
    return _lax_conv2d(x, kernel, strides, padding)


def _conv2d_tap_grad_fwd(x, kernel, strides, padding):
    return _lax_conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_tap_grad_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_conv2d(x, kernel, strides, padding), x)
    (dx,) = input_vjp(dy)
    dkernel = _tap_weight_grad(x, dy, kernel.shape, strides, padding)
    return dx, dkernel.astype(kernel.dtype)


_conv2d_tap_grad.defvjp(_conv2d_tap_grad_fwd, _conv2d_tap_grad_bwd)


def _subsample(x, strides):
    """Every strides[i]-th element along each axis i (x itself when all strides are 1)."""
    if all(s == 1 for s in strides):
        return x
    return lax.slice(x, (0,) * x.ndim, x.shape, strides)


def _pairs(padding: Padding, x_shape, kernel_shape, strides) -> tuple[tuple[int, int], ...]:
    """Explicit (low, high) padding pairs for string or explicit `padding`."""
    if isinstance(padding, str):
        return tuple(
            lax.padtype_to_pads(x_shape[1:-1], kernel_shape[:-2], strides, padding.upper())
        )
    pairs = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pairs) != len(strides) or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"padding {padding!r} must be 'SAME', 'VALID' or one (low, high) pair per spatial "
            f"axis ({len(strides)} here)"
        )
    return pairs


def _check_shapes(name: str, x, kernel, layouts: tuple[str, str]) -> None:
    """Ranks (4 for 2-D, 5 for 3-D) and input channels of a convolution's operands."""
    expected = 4 if name == "conv2d" else 5
    if x.ndim != expected or kernel.ndim != expected:
        raise ValueError(
            f"{name} expects {layouts[0]} and {layouts[1]}, got shapes {x.shape} and {kernel.shape}"
        )
    if x.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"{name} input has {x.shape[-1]} channels but the kernel {kernel.shape} expects "
            f"{kernel.shape[-2]}"
        )


def conv2d(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int] = (1, 1),
    padding: Padding = "SAME",
    *,
    weight_grad: str = "auto",
) -> jnp.ndarray:
    """A 2-D NHWC convolution, `lax.conv_general_dilated` with an optional tap-wise kernel grad.

    Args:
      x: input (N, H, W, C).
      kernel: HWIO kernel (kh, kw, C, O), the same dtype as `x`.
      strides: (sh, sw).
      padding: "SAME", "VALID" or ((top, bottom), (left, right)).
      weight_grad: "taps" computes the kernel gradient as one matrix product per kernel tap
        (fast on CPU for wide convolutions), "xla" leaves it to XLA, "auto" is "taps" when
        the default backend is the CPU and "xla" elsewhere.

    Returns:
      The output (N, Ho, Wo, O), as `lax.conv_general_dilated` computes it.

    Raises:
      ValueError: for a non-4-D input or kernel, mismatched channels, or an unknown
        `weight_grad` or malformed `padding`.
    """
    _check_shapes("conv2d", x, kernel, ("an NHWC input", "an HWIO kernel"))
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"Unknown weight_grad {weight_grad!r}; expected one of {WEIGHT_GRADS}")
    strides = tuple(int(s) for s in strides)
    pads = _pairs(padding, x.shape, kernel.shape, strides)
    if weight_grad == "auto":
        weight_grad = "taps" if jax.default_backend() == "cpu" else "xla"
    if weight_grad == "taps":
        return _conv2d_tap_grad(x, kernel, strides, pads)
    return _lax_conv2d(x, kernel, strides, pads)


def conv3d(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int] = (1, 1, 1),
    padding: Padding = "SAME",
    *,
    weight_grad: str = "auto",
) -> jnp.ndarray:
    """A 3-D NTHWC convolution; factorised kernels run as 2-D convolutions or matrix products.

    A (1, kh, kw) kernel is a 2-D convolution over (N*T', H, W, C) (T' the frames its
    temporal stride keeps), a (kt, 1, 1) kernel one over (N, T, H'*W', C) with a (kt, 1)
    kernel (H', W' kept by its spatial strides), a (1, 1, 1) kernel a strided slice and a
    matrix product; other kernels go to `lax.conv_general_dilated`.

    Args:
      x: input (N, T, H, W, C).
      kernel: (kt, kh, kw, C, O), the same dtype as `x`.
      strides: (st, sh, sw).
      padding: "SAME", "VALID" or one (low, high) pair per axis (T, H, W).
      weight_grad: as in `conv2d`.

    Returns:
      The output (N, To, Ho, Wo, O), as `lax.conv_general_dilated` computes it.

    Raises:
      ValueError: for a non-5-D input or kernel or mismatched channels.
    """
    _check_shapes("conv3d", x, kernel, ("an NTHWC input", "a THWIO kernel"))
    strides = tuple(int(s) for s in strides)
    pads = _pairs(padding, x.shape, kernel.shape, strides)
    kt, kh, kw = kernel.shape[:3]
    st, sh, sw = strides
    (pt0, pt1), (ph0, ph1), (pw0, pw1) = pads

    if kt == 1 and pt0 == pt1 == 0 and kh * kw > 1:
        x = _subsample(x, (1, st, 1, 1, 1))
        n, t, h, w, c = x.shape
        y = conv2d(
            x.reshape(n * t, h, w, c),
            kernel[0],
            (sh, sw),
            pads[1:],
            weight_grad=weight_grad,
        )
        return y.reshape(n, t, *y.shape[1:])
    if kh == kw == 1 and ph0 == ph1 == pw0 == pw1 == 0 and kt > 1:
        x = _subsample(x, (1, 1, sh, sw, 1))
        n, t, h, w, c = x.shape
        y = conv2d(
            x.reshape(n, t, h * w, c),
            kernel[:, 0],
            (st, 1),
            (pads[0], (0, 0)),
            weight_grad=weight_grad,
        )
        return y.reshape(n, y.shape[1], h, w, y.shape[-1])
    if kt == kh == kw == 1 and not any(sum(p) for p in pads):
        x = _subsample(x, (1, st, sh, sw, 1))
        n, t, h, w, c = x.shape
        y = x.reshape(-1, c) @ kernel.reshape(c, -1)
        return y.reshape(n, t, h, w, -1)
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN_3D)


class Conv(nn.Module):
    """`flax.linen.Conv` for 2-D (NHWC) and 3-D (NTHWC) inputs, computed with `conv2d` / `conv3d`.

    Same parameters as `nn.Conv` (``kernel`` of shape ``kernel_size + (C, features)``,
    ``bias`` of shape ``(features,)``), drawn by the same initialisers from the same keys, and
    the same outputs; no dilation or feature groups.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw) or (kt, kh, kw).
      strides: one stride per spatial axis (default 1).
      padding: "SAME", "VALID" or one (low, high) pair per spatial axis.
      use_bias: add a learned bias.
      dtype: computation dtype (inputs, kernel and bias are cast to it); None keeps the
        promoted dtype of the input and the parameters, as `nn.Conv`.
      param_dtype: parameter dtype.
      kernel_init: kernel initialiser (`nn.Conv`'s default: LeCun normal).
      bias_init: bias initialiser.
      weight_grad: as in `conv2d`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Union[None, Sequence[int]] = None
    padding: Padding = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    weight_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Applies the convolution.

        Args:
          x: (N, H, W, C) for a 2-D kernel, (N, T, H, W, C) for a 3-D one.

        Returns:
          (N, ..., features) in the computation dtype.

        Raises:
          ValueError: when the input rank does not match ``kernel_size``.
        """
        spatial = len(self.kernel_size)
        if spatial not in (2, 3) or x.ndim != spatial + 2:
            raise ValueError(
                f"Conv {self.name!r}: kernel_size {tuple(self.kernel_size)} needs a "
                f"{spatial + 2}-D input (2-D or 3-D kernels only), got shape {x.shape}"
            )
        strides = tuple(self.strides) if self.strides is not None else (1,) * spatial
        kernel = self.param(
            "kernel",
            self.kernel_init,
            tuple(self.kernel_size) + (x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        conv = conv2d if spatial == 2 else conv3d
        y = conv(x, kernel, strides, self.padding, weight_grad=self.weight_grad)
        if bias is not None:
            y = y + bias
        return y


@jax.custom_vjp
def _max_pool_2x2(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
    y = _max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(residuals, dy):
    x, y = residuals
    n, h, w, c = x.shape
    windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
    is_max = windows == y[:, :, None, :, None, :]
    # The gradient goes to the first maximum of each window in row-major order, as XLA's
    # select-and-scatter gives it; later ties get none.
    first = jnp.stack(
        [
            is_max[:, :, 0, :, 0],
            is_max[:, :, 0, :, 1] & ~is_max[:, :, 0, :, 0],
            is_max[:, :, 1, :, 0] & ~(is_max[:, :, 0, :, 0] | is_max[:, :, 0, :, 1]),
            is_max[:, :, 1, :, 1]
            & ~(is_max[:, :, 0, :, 0] | is_max[:, :, 0, :, 1] | is_max[:, :, 1, :, 0]),
        ],
        axis=-1,
    ).reshape(n, h // 2, w // 2, c, 2, 2)
    dx = jnp.where(first, dy[..., None, None], jnp.zeros((), dy.dtype))
    return (dx.transpose(0, 1, 4, 2, 5, 3).reshape(n, h, w, c),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max pooling with stride 2 over an NHWC map, by a reshape instead of a reduce-window.

    Equals `flax.linen.max_pool(x, (2, 2), strides=(2, 2))` (padding "VALID": an odd last
    row or column is dropped), gradient included: each window's gradient goes to its first
    maximum, as XLA's select-and-scatter does. XLA's CPU backend lowers that select-and-scatter
    to a variadic reduce-window with index arrays and a scatter, several times slower than
    this reshape and one element-wise pass.

    Args:
      x: (N, H, W, C).

    Returns:
      (N, H // 2, W // 2, C).

    Raises:
      ValueError: for a non-4-D input.
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool_2x2 expects an NHWC input, got shape {x.shape}")
    n, h, w, c = x.shape
    return _max_pool_2x2(x[:, : h - h % 2, : w - w % 2])


def _batch_norm_forward(x, scale, bias, epsilon, relu):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(axes)
    # E[x^2] - E[x]^2, clipped at 0, as flax's BatchNorm (use_fast_variance).
    var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
    inv = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    if relu:
        y = jnp.maximum(y, 0)
    return y, mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, relu):
    y, mean, var, _ = _batch_norm_forward(x, scale, bias, epsilon, relu)
    return y, mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon, relu):
    x, scale, bias = x.value, scale.value, bias.value
    y, mean, var, inv = _batch_norm_forward(x, scale, bias, epsilon, relu)
    return (y, mean, var), (x, scale, bias, mean, var, inv)


def _batch_norm_train_bwd(epsilon, relu, residuals, cotangents):
    x, scale, bias, mean, var, inv = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    xhat = (x - mean) * inv
    if isinstance(dy, SymbolicZero):
        g = jnp.zeros_like(xhat)
    else:
        g = dy.astype(xhat.dtype)
    if relu:
        # Recomputed from x rather than kept from the forward pass: one map less in memory.
        g = jnp.where(xhat * scale + bias > 0, g, 0)
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    dx = (scale * inv) * (g - dbias / count - xhat * (dscale / count))
    # The batch statistics are outputs too (for the running averages); their cotangents are
    # symbolic zeros unless something differentiates through them.
    if not isinstance(dmean, SymbolicZero):
        dx = dx + dmean / count
    if not isinstance(dvar, SymbolicZero):
        dx = dx + jnp.where(var > 0, dvar, 0) * (2.0 / count) * (x - mean)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd, symbolic_zeros=True)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` over the last axis, optionally with the ReLU that follows it,
    with a hand-written backward pass.

    Same variables as `nn.BatchNorm` (``params``: ``scale``, ``bias``; ``batch_stats``:
    ``mean``, ``var``), same statistics (float32 E[x^2] - E[x]^2 clipped at 0), same running
    averages and outputs. In training its backward pass is two passes over the map (the two
    per-channel sums, then the input gradient), with the ReLU mask recomputed from the saved
    input, where XLA's differentiation of `nn.BatchNorm` + ReLU makes several more passes and
    keeps more maps alive.

    Attributes:
      use_running_average: normalise with the running statistics (evaluation) instead of the
        batch's (training, where the running averages are updated).
      momentum: running average decay (0.9 is PyTorch's momentum 0.1).
      epsilon: added to the variance.
      relu: apply a ReLU to the output.
      dtype: computation dtype of the output (None: promoted from the input and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    relu: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Normalises `x` (..., C) per channel.

        Args:
          x: the input map, channels last.

        Returns:
          The normalised (and rectified) map, in ``dtype``.
        """
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones_init(), features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), features, self.param_dtype)
        scale32, bias32 = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
        if self.use_running_average:
            y = (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale32) + bias32
            if self.relu:
                y = jnp.maximum(y, 0)
        else:
            y, mean, var = _batch_norm_train(x, scale32, bias32, self.epsilon, self.relu)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        return jnp.asarray(y, dtype)
