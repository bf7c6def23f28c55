"""Bad input to the dense, loss and activation rules: errors that name the op,
the argument, what was expected and what came, raised at trace time."""

import jax
import jax.numpy as jnp
import pytest

from jax_resnet import ops

F = jnp.float32


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.relu(jnp.arange(3)), TypeError, "relu: argument `x` must have a floating dtype.*int"),
        (lambda: ops.leaky_relu(jnp.ones(3), "0.1"), TypeError, "leaky_relu: argument `negative_slope`"),
        (
            lambda: ops.dense(jnp.ones((2, 3)), jnp.ones((4, 5)), jnp.ones(5)),
            ValueError,
            r"dense: argument `w` must have shape \(3, 5\).*got \(4, 5\)",
        ),
        (
            lambda: ops.dense(jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.ones(4)),
            ValueError,
            r"dense: argument `b` must have shape \(5,\)",
        ),
        (
            lambda: ops.dense(jnp.ones((2, 3)), jnp.ones(3), jnp.ones(3)),
            ValueError,
            "dense: argument `w` must have rank 2",
        ),
        (
            lambda: ops.dense(jnp.ones((2, 3), F), jnp.ones((3, 5), jnp.float64), jnp.ones(5, F)),
            TypeError,
            "dense: arguments must share one dtype",
        ),
        (
            lambda: ops.mse_loss(jnp.ones((2, 3)), jnp.ones((2, 4))),
            ValueError,
            "mse_loss: argument `y` must have shape",
        ),
        (
            lambda: ops.softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones(2)),
            TypeError,
            "softmax_cross_entropy: argument `labels` must be an integer",
        ),
        (
            lambda: ops.softmax_cross_entropy(jnp.ones((2, 3)), jnp.array([0, 1, 2])),
            ValueError,
            "`labels` must have shape",
        ),
        (
            lambda: ops.softmax_cross_entropy(jnp.ones((2, 3)), jnp.array([0, 3])),
            ValueError,
            r"`labels` must lie in \[0, 3\)",
        ),
        (lambda: ops.softmax_cross_entropy(jnp.ones((2, 3)), jnp.array([0, 1]), 1.0), ValueError, "`label_smoothing`"),
        (lambda: ops.softmax_cross_entropy(jnp.ones(3), jnp.array([0])), ValueError, "`logits` must have rank 2"),
    ],
)
def test_errors_name_op_argument_expected_and_got(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="dense: argument `w`"):
        jax.jit(ops.dense).lower(jnp.ones((2, 3)), jnp.ones((4, 5)), jnp.ones(5))


def test_labels_captured_as_constants_work_under_jit():
    labels = jnp.array([0, 2])
    loss = jax.jit(lambda z: ops.softmax_cross_entropy(z, labels))(jnp.zeros((2, 3)))
    assert float(loss) == pytest.approx(float(jnp.log(3.0)))


def test_large_logits_stay_finite():
    logits = jnp.array([[1000.0, -1000.0, 0.0]], F)
    loss, grad = jax.value_and_grad(ops.softmax_cross_entropy)(logits, jnp.array([1]))
    assert jnp.isfinite(loss) and float(loss) == pytest.approx(2000.0)
    assert jnp.isfinite(grad).all()
