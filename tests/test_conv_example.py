"""The worked 1-D example of derivations/conv.md, recomputed.

The inputs and the printed values are parsed from the document, so the two
cannot drift apart. Each value is computed from the step formulas of the
derivation in numpy (dilate, pad, flip, correlate), each cotangent also from
its definition as a sum over the outputs that read an entry, and the results
are compared with the library's rule and with `jax.grad` of the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from derivation_docs import worked_example_values

from jax_resnet.ops import conv2d
from jax_resnet.ops.conv import conv2d_reference

CASES = {"padding (1, 1)": "", "padding (1, 0), remainder 1": "R_"}


def _document_values() -> dict[str, np.ndarray]:
    return worked_example_values("conv.md")


def _case(prefix):
    """x, w, stride, (top, bottom), ct_y and the printed results of one case ("" or "R_")."""
    doc = _document_values()
    settings = {"x", "w", "stride", "padding"}
    printed = {
        name[len(prefix) :]: value
        for name, value in doc.items()
        if name.startswith(prefix) and (prefix or not name.startswith("R_")) and name[len(prefix) :] not in settings
    }
    t, b = (int(v) for v in doc[prefix + "padding"])
    return doc["x"], doc["w"], int(doc["stride"]), (t, b), doc[prefix + "ct_y"], printed


def _numpy_steps(x, w, s, pads, ct_y):
    """The derivation's steps, in numpy, for one spatial axis, d = 1, one channel."""
    t, b = pads
    k = len(w)
    x_padded = np.pad(x, (t, b))
    h_out, rho = divmod(len(x_padded) - k, s)
    h_out += 1
    y = np.array([x_padded[s * i : s * i + k] @ w for i in range(h_out)])
    dilated = np.zeros(s * (h_out - 1) + 1)
    dilated[::s] = ct_y
    dilated_padded = np.pad(dilated, (k - 1 - t, k - 1 - b + rho))
    assert len(dilated_padded) == len(x) + k - 1
    w_flipped = w[::-1]
    ct_x = np.array([dilated_padded[a : a + k] @ w_flipped for a in range(len(x))])
    taps = len(x_padded) - (s * (h_out - 1) + 1) + 1
    assert taps == k + rho
    ct_w_full = np.array([x_padded[p : p + s * (h_out - 1) + 1 : s] @ ct_y for p in range(taps)])
    return dict(
        x_padded=x_padded,
        y=y,
        ct_y=ct_y,
        dilated=dilated,
        dilated_padded=dilated_padded,
        w_flipped=w_flipped,
        ct_x=ct_x,
        ct_w_full=ct_w_full,
        ct_w=ct_w_full[:k],
    )


def _numpy_definitions(x, w, s, pads, ct_y):
    """ct_x[a] = Σ ct_y[i] w[p] over s·i + p − t = a; ct_w[p] = Σ_i x̃[s·i + p] ct_y[i]."""
    t, _ = pads
    ct_x, ct_w = np.zeros_like(x), np.zeros_like(w)
    for i in range(len(ct_y)):
        for p in range(len(w)):
            a = s * i + p - t
            if 0 <= a < len(x):
                ct_x[a] += ct_y[i] * w[p]
                ct_w[p] += x[a] * ct_y[i]
    return ct_x, ct_w


def _as_image(x, w):
    """The 1-D example as an NHWC image [1, H, 1, 1] and an HWIO kernel [k, 1, 1, 1]."""
    return jnp.asarray(x).reshape(1, -1, 1, 1), jnp.asarray(w).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("prefix", list(CASES.values()), ids=list(CASES))
def test_conv_worked_example_numbers_match_the_document(prefix):
    x, w, s, pads, ct_y, printed = _case(prefix)
    ours = _numpy_steps(x, w, s, pads, ct_y)
    assert {"y", "dilated_padded", "ct_x", "ct_w_full", "ct_w"} <= set(printed) <= set(ours), sorted(printed)
    for name, value in printed.items():
        np.testing.assert_array_equal(value, ours[name], err_msg=f"{prefix}{name}")
    by_definition = _numpy_definitions(x, w, s, pads, ct_y)
    np.testing.assert_array_equal(ours["ct_x"], by_definition[0])
    np.testing.assert_array_equal(ours["ct_w"], by_definition[1])


def _library(config, x, w, ct_y):
    """y and (ct_x, ct_w) from the rule, and (ct_x, ct_w) from jax.grad of the reference."""
    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, **config), x, w)
    reference = jax.grad(lambda x, w: jnp.sum(conv2d_reference(x, w, **config) * ct_y), argnums=(0, 1))
    return y, vjp(ct_y), reference(x, w)


@pytest.mark.parametrize("prefix", list(CASES.values()), ids=list(CASES))
def test_conv_worked_example_rule_and_autodiff_agree(prefix):
    x, w, s, pads, ct_y, printed = _case(prefix)
    config = dict(stride=(s, 1), padding=(pads, (0, 0)))
    x_img, w_img = _as_image(x, w)
    # One compilation for all three computations: far cheaper on a CPU than op-by-op dispatch.
    y, rule, reference = jax.jit(lambda *a: _library(config, *a))(x_img, w_img, jnp.reshape(ct_y, (1, -1, 1, 1)))
    np.testing.assert_array_equal(np.ravel(y), printed["y"])
    for name, (ct_x, ct_w) in (("rule", rule), ("jax.grad of the reference", reference)):
        np.testing.assert_array_equal(np.ravel(ct_x), printed["ct_x"], err_msg=name)
        np.testing.assert_array_equal(np.ravel(ct_w), printed["ct_w"], err_msg=name)
