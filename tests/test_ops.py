"""Unit tests of ops.py against NumPy oracles written from the spec (§2, §3, §8).

Every expected value is computed here in float64 NumPy from the spec's formulas,
never from ops.py's own output. Shapes are tiny so the file runs in seconds.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import ops

# --- NumPy oracles (from the spec) ----------------------------------------------

EPS = 1e-5  # §3.4: every norm epsilon

# §3.1: (kernel, stride, pad) -> (top, bottom, left, right), the spec's table.
SPEC_PADDING = {
    (7, 1, 3): (3, 3, 3, 3),
    (3, 2, 1): (1, 0, 1, 0),
    (3, 1, 1): (1, 1, 1, 1),
    (4, 2, 1): (1, 1, 1, 1),
    (4, 1, 1): (1, 2, 1, 2),
    (1, 1, 0): (0, 0, 0, 0),
}
CONV_CASES = sorted(SPEC_PADDING)


def np_pad(x, padding, mode='reflect'):
    """np.pad of NHWC `x` by (top, bottom, left, right)."""
    t, b, l, r = padding
    return np.pad(x, [(0, 0), (t, b), (l, r), (0, 0)],
                  mode='reflect' if mode == 'reflect' else 'constant')


def np_patches(xp, k, s):
    """[B, H, W, C] (already padded) -> VALID patches [B, Ho, Wo, k, k, C]."""
    b, h, w, c = xp.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    out = np.empty((b, ho, wo, k, k, c))
    for i in range(k):
        for j in range(k):
            out[:, :, :, i, j, :] = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
    return out


def np_conv(x, w, stride, padding, bias=None, mode='reflect'):
    """Explicit padding, then a direct VALID cross-correlation with w [k, k, Cin, Cout]."""
    p = np_patches(np_pad(np.float64(x), padding, mode), w.shape[0], stride)
    y = np.einsum('byxijc,ijco->byxo', p, np.float64(w))
    return y if bias is None else y + bias


def np_l2n(x):
    """§3.2: x / sqrt(max(Σx², 1e-12)) over the whole tensor."""
    return x / np.sqrt(max(np.sum(x ** 2), 1e-12))


def np_power_iteration(w, u):
    """§3.2, one iteration: returns (u' [1,O], v [1,rows], σ, Wm [rows,O])."""
    wm = np.float64(w).reshape(-1, w.shape[-1])   # C order: rows in HWI order
    v = np_l2n(np.float64(u) @ wm.T)
    u_new = np_l2n(v @ wm)
    sigma = (v @ wm @ u_new.T).item()
    return u_new, v, sigma, wm


def np_sn_kernel(w, u):
    """§3.2: reshape(Wm / σ, W.shape)."""
    _, _, sigma, wm = np_power_iteration(w, u)
    return (wm / sigma).reshape(w.shape)


def np_instance_normalize(x):
    """(x − μ_I)/sqrt(σ²_I + eps), moments per sample and channel over (H, W)."""
    x = np.float64(x)
    mu, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    return (x - mu) / np.sqrt(var + EPS)


def np_layer_normalize(x):
    """(x − μ_L)/sqrt(σ²_L + eps), moments per sample over (H, W, C)."""
    x = np.float64(x)
    mu, var = x.mean(axis=(1, 2, 3), keepdims=True), x.var(axis=(1, 2, 3), keepdims=True)
    return (x - mu) / np.sqrt(var + EPS)


def np_lin(x, rho, gamma, beta):
    """(ρ·x_I + (1−ρ)·x_L)·γ + β (AdaLIN and LIN, ρ being the value actually used)."""
    return (rho * np_instance_normalize(x) + (1 - rho) * np_layer_normalize(x)) * gamma + beta


def np_sigmoid_xent(z, t):
    """Stable sigmoid cross-entropy: max(z,0) − z·t + log(1+exp(−|z|))."""
    z = np.float64(z)
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def np_bce(z, t):
    return np_sigmoid_xent(z, t).mean()


def np_d_term(gan_type, r, f):
    """§8 table, D term for one (real, fake) pair."""
    r, f = np.float64(r), np.float64(f)
    if 'wgan' in gan_type:
        return -r.mean() + f.mean()
    if gan_type == 'lsgan':
        return ((r - 1) ** 2).mean() + (f ** 2).mean()
    if gan_type in ('gan', 'dragan'):
        return np_bce(r, 1) + np_bce(f, 0)
    assert gan_type == 'hinge'
    return np.maximum(1 - r, 0).mean() + np.maximum(1 + f, 0).mean()


def np_g_term(gan_type, f):
    """§8 table, G term for one fake output."""
    f = np.float64(f)
    if gan_type == 'lsgan':
        return ((f - 1) ** 2).mean()
    if gan_type in ('gan', 'dragan'):
        return np_bce(f, 1)
    return -f.mean()


def f32(a):
    return np.asarray(a, dtype=np.float32)


def by_path(layer):
    return {v.path: v for v in layer.weights}


def randomize(layer, rng, skip=()):
    """Assign N(0, 1) values to every weight of a built layer (except names in `skip`)."""
    for v in layer.weights:
        if v.path.split('/')[-1] not in skip:
            v.assign(f32(rng.normal(size=v.shape)))


def built_sn_conv(rng, filters=3, k=3, stride=1, pad=1, cin=2, hw=(5, 6), name='conv_0'):
    """A built SN Conv with N(0,1) kernel, u and bias."""
    layer = ops.Conv(filters, k, stride=stride, pad=pad, spectral_norm=True, name=name)
    layer(tf.zeros((1,) + hw + (cin,)))
    randomize(layer, rng)
    return layer


# --- §2 initialisation -----------------------------------------------------------

def test_weight_initializer_is_normal_0_02():
    """weight_initializer draws N(0, 0.02²)."""
    keras.utils.set_random_seed(0)
    w = ops.weight_initializer()((100, 100)).numpy()
    assert abs(w.mean()) < 0.001
    assert w.std() == pytest.approx(0.02, rel=0.05)


def test_initial_values_of_every_layer():
    """§2: kernels N(0, .02²), biases 0, u N(0, 1), IN β 0/γ 1, AdaLIN ρ 1, LIN ρ 0/γ 1/β 0."""
    keras.utils.set_random_seed(0)
    conv = ops.Conv(256, 1, spectral_norm=True, name='c_sn')
    conv(tf.zeros([1, 2, 2, 16]))
    assert conv.kernel.numpy().std() == pytest.approx(0.02, rel=0.1)
    assert conv.u.numpy().std() == pytest.approx(1.0, rel=0.15)
    np.testing.assert_array_equal(conv.bias.numpy(), 0)
    plain = ops.Conv(64, 3, pad=1, name='c')
    plain(tf.zeros([1, 3, 3, 8]))
    w = by_path(plain)
    assert w['c/conv2d/kernel'].numpy().std() == pytest.approx(0.02, rel=0.1)
    np.testing.assert_array_equal(w['c/conv2d/bias'].numpy(), 0)
    cam = ops.CAMClassifier(name='cam')
    cam(tf.zeros([1, 2, 2, 3]))
    np.testing.assert_array_equal(cam.bias.numpy(), 0)
    fc = ops.FullyConnected(4, name='fc')
    fc(tf.zeros([1, 2, 2, 3]))
    np.testing.assert_array_equal(by_path(fc)['fc/dense/bias'].numpy(), 0)
    inorm = ops.InstanceNorm()
    inorm(tf.zeros([1, 2, 2, 3]))
    np.testing.assert_array_equal(inorm.beta.numpy(), 0)
    np.testing.assert_array_equal(inorm.gamma.numpy(), 1)
    adalin = ops.AdaLIN()
    adalin(tf.zeros([1, 2, 2, 3]), tf.ones([1, 1, 1, 3]), tf.zeros([1, 1, 1, 3]))
    np.testing.assert_array_equal(adalin.rho.numpy(), 1)
    lin = ops.LIN()
    lin(tf.zeros([1, 2, 2, 3]))
    np.testing.assert_array_equal(lin.rho.numpy(), 0)
    np.testing.assert_array_equal(lin.gamma.numpy(), 1)
    np.testing.assert_array_equal(lin.beta.numpy(), 0)


def test_unit_interval_constraint_clips_to_0_1():
    """unit_interval_constraint is clip(x, 0, 1)."""
    x = f32([-2.0, -0.0, 0.3, 1.0, 1.7])
    np.testing.assert_array_equal(ops.unit_interval_constraint(tf.constant(x)).numpy(),
                                  f32([0.0, 0.0, 0.3, 1.0, 1.0]))


# --- §3.1 padding and convolution ------------------------------------------------

@pytest.mark.parametrize('kernel,stride,pad', CONV_CASES)
def test_conv_padding_spec_table(kernel, stride, pad):
    """conv_padding reproduces every row of the spec's padding table."""
    assert tuple(ops.conv_padding(kernel, stride, pad)) == SPEC_PADDING[(kernel, stride, pad)]


@pytest.mark.parametrize('padding', [(1, 0, 1, 0), (1, 2, 1, 2), (3, 3, 3, 3), (0, 2, 1, 0)])
@pytest.mark.parametrize('pad_type', ['reflect', 'zero'])
def test_pad2d_matches_numpy(padding, pad_type):
    """pad2d equals np.pad(mode='reflect') / zero padding on (top, bottom, left, right)."""
    x = f32(np.random.default_rng(0).normal(size=(2, 4, 5, 3)))
    got = ops.pad2d(tf.constant(x), padding, pad_type).numpy()
    np.testing.assert_array_equal(got, np_pad(x, padding, pad_type))


def test_pad2d_without_padding_is_identity():
    """pad2d with (0, 0, 0, 0) returns the input unchanged."""
    x = tf.constant(f32(np.random.default_rng(1).normal(size=(1, 3, 2, 2))))
    np.testing.assert_array_equal(ops.pad2d(x, (0, 0, 0, 0)).numpy(), x.numpy())


@pytest.mark.parametrize('hw', [(5, 7), (6, 4)])
@pytest.mark.parametrize('sn', [False, True])
@pytest.mark.parametrize('kernel,stride,pad', CONV_CASES)
def test_conv_matches_numpy_conv(kernel, stride, pad, sn, hw):
    """Conv = spec padding + VALID conv (+ bias), with W/σ under SN: shape and values."""
    rng = np.random.default_rng(kernel * 100 + stride * 10 + pad)
    x = f32(rng.normal(size=(2,) + hw + (3,)))
    layer = ops.Conv(4, kernel, stride=stride, pad=pad, spectral_norm=sn, name='conv')
    layer(tf.constant(x))
    randomize(layer, rng)
    w = by_path(layer)
    if sn:
        kern = np_sn_kernel(layer.kernel.numpy(), layer.u.numpy())
        bias = layer.bias.numpy()
    else:
        kern, bias = w['conv/conv2d/kernel'].numpy(), w['conv/conv2d/bias'].numpy()
    t, b, l, r = SPEC_PADDING[(kernel, stride, pad)]
    expected_shape = (2, (hw[0] + t + b - kernel) // stride + 1,
                      (hw[1] + l + r - kernel) // stride + 1, 4)
    got = layer(tf.constant(x)).numpy()
    assert got.shape == expected_shape
    if (kernel, stride) in ((7, 1), (3, 1), (4, 1), (1, 1)):
        assert got.shape[1:3] == hw  # these convs keep the map size
    np.testing.assert_allclose(got, np_conv(x, kern, stride, (t, b, l, r), bias),
                               rtol=1e-5, atol=1e-5)


def test_conv_zero_pad_type_matches_numpy():
    """Conv with pad_type='zero' pads with zeros before the VALID conv."""
    rng = np.random.default_rng(2)
    x = f32(rng.normal(size=(1, 4, 5, 2)) + 3.0)   # offset so zero vs reflect differ
    layer = ops.Conv(3, 3, stride=1, pad=1, pad_type='zero', name='conv')
    layer(tf.constant(x))
    randomize(layer, rng)
    w = by_path(layer)
    expected = np_conv(x, w['conv/conv2d/kernel'].numpy(), 1, (1, 1, 1, 1),
                       w['conv/conv2d/bias'].numpy(), mode='zero')
    np.testing.assert_allclose(layer(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_conv_variables_without_sn():
    """Without SN: `<scope>/conv2d/kernel` [k,k,Cin,Cout] and `<scope>/conv2d/bias` [Cout], trainable."""
    layer = ops.Conv(5, 3, stride=2, pad=1, name='conv_0')
    layer(tf.zeros([1, 6, 6, 2]))
    w = by_path(layer)
    assert set(w) == {'conv_0/conv2d/kernel', 'conv_0/conv2d/bias'}
    assert tuple(w['conv_0/conv2d/kernel'].shape) == (3, 3, 2, 5)
    assert tuple(w['conv_0/conv2d/bias'].shape) == (5,)
    assert all(v.trainable for v in layer.weights)
    nobias = ops.Conv(5, 3, use_bias=False, name='conv_1')
    nobias(tf.zeros([1, 4, 4, 2]))
    assert [v.path for v in nobias.weights] == ['conv_1/conv2d/kernel']


def test_conv_variables_with_sn():
    """With SN: `kernel`, non-trainable `u` [1, O] and `bias` sit directly in the scope."""
    layer = ops.Conv(5, 4, stride=2, pad=1, spectral_norm=True, name='conv_0')
    layer(tf.zeros([1, 6, 6, 2]))
    w = by_path(layer)
    assert set(w) == {'conv_0/kernel', 'conv_0/u', 'conv_0/bias'}
    assert tuple(w['conv_0/kernel'].shape) == (4, 4, 2, 5)
    assert tuple(w['conv_0/u'].shape) == (1, 5)
    assert tuple(w['conv_0/bias'].shape) == (5,)
    assert not w['conv_0/u'].trainable
    assert {v.path for v in layer.trainable_weights} == {'conv_0/kernel', 'conv_0/bias'}
    nobias = ops.Conv(5, 3, use_bias=False, spectral_norm=True, name='conv_1')
    nobias(tf.zeros([1, 4, 4, 2]))
    assert {v.path for v in nobias.weights} == {'conv_1/kernel', 'conv_1/u'}


# --- §3.2 spectral norm ----------------------------------------------------------

def test_sigma_next_u_and_effective_kernel_match_one_power_iteration():
    """σ = v·Wm·u'ᵀ with v = l2n(u·Wmᵀ), u' = l2n(v·Wm); effective kernel = W/σ; next_u = u'."""
    layer = built_sn_conv(np.random.default_rng(3), filters=4, k=3, cin=2)
    k0, u0 = layer.kernel.numpy(), layer.u.numpy()
    u_new, _, sigma, _ = np_power_iteration(k0, u0)
    assert float(layer.sigma()) == pytest.approx(sigma, rel=1e-5)
    np.testing.assert_allclose(layer.next_u().numpy(), u_new, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.effective_kernel().numpy(), k0 / sigma, rtol=1e-5, atol=1e-6)
    # One iteration from a random u is not yet the largest singular value.
    assert sigma < np.linalg.svd(k0.reshape(-1, 4), compute_uv=False)[0] * (1 - 1e-4)
    np.testing.assert_array_equal(layer.u.numpy(), u0)  # none of these writes u


def test_effective_kernel_without_sn_is_the_kernel():
    """effective_kernel() is the raw kernel when spectral norm is off."""
    cam = ops.CAMClassifier(spectral_norm=False)
    cam(tf.zeros([1, 2, 2, 3]))
    np.testing.assert_array_equal(cam.effective_kernel().numpy(), cam.kernel.numpy())


def test_power_iteration_converges_to_largest_singular_value():
    """After many committed steps σ → s_max(reshape(W, [-1, O])) and s_max(W/σ) → 1."""
    rng = np.random.default_rng(4)
    layer = built_sn_conv(rng, filters=4, k=2, cin=3)
    s = np.linalg.svd(layer.kernel.numpy().reshape(-1, 4).astype(np.float64), compute_uv=False)
    assert s[1] / s[0] < 0.9  # a spectral gap, so 100 iterations converge far below 1e-3
    for _ in range(100):
        with ops.power_iteration_step(layer):
            pass
    assert float(layer.sigma()) == pytest.approx(s[0], rel=1e-3)
    normalised = layer.effective_kernel().numpy().reshape(-1, 4)
    assert np.linalg.svd(normalised, compute_uv=False)[0] == pytest.approx(1.0, rel=1e-3)


def test_layer_call_never_writes_u():
    """Calling an SN layer (Conv, CAM) leaves u as it was, so repeated calls agree exactly."""
    rng = np.random.default_rng(5)
    layer = built_sn_conv(rng)
    cam = ops.CAMClassifier(spectral_norm=True)
    x = tf.constant(f32(rng.normal(size=(2, 5, 6, 2))))
    cam(x)
    u0, cu0 = layer.u.numpy(), cam.u.numpy()
    y0 = layer(x).numpy()
    for _ in range(3):
        np.testing.assert_array_equal(layer(x).numpy(), y0)
        cam(x)
    np.testing.assert_array_equal(layer.u.numpy(), u0)
    np.testing.assert_array_equal(cam.u.numpy(), cu0)


def test_power_iteration_step_commits_u_once_on_exit():
    """u is unchanged inside the block and, on exit, is one iteration from the start-of-step u and kernel."""
    rng = np.random.default_rng(6)
    layer = built_sn_conv(rng, filters=3, cin=2)
    x = f32(rng.normal(size=(1, 5, 6, 2)))
    k0, u0, bias = layer.kernel.numpy(), layer.u.numpy(), layer.bias.numpy()
    k1 = f32(rng.normal(size=k0.shape))
    u_one = np_power_iteration(k0, u0)[0]
    u_two = np_power_iteration(k0, u_one)[0]
    with ops.power_iteration_step(layer):
        y_a = layer(tf.constant(x)).numpy()
        y_b = layer(tf.constant(x)).numpy()
        layer.kernel.assign(k1)          # e.g. an optimizer update inside the step
        y_c = layer(tf.constant(x)).numpy()
        np.testing.assert_array_equal(layer.u.numpy(), u0)
    np.testing.assert_array_equal(y_a, y_b)
    np.testing.assert_allclose(y_a, np_conv(x, np_sn_kernel(k0, u0), 1, (1, 1, 1, 1), bias),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_c, np_conv(x, np_sn_kernel(k1, u0), 1, (1, 1, 1, 1), bias),
                               rtol=1e-5, atol=1e-5)
    u_after = layer.u.numpy()
    np.testing.assert_allclose(u_after, u_one, rtol=1e-5, atol=1e-6)
    # Not two iterations, and not computed from the kernel changed inside the block.
    assert np.abs(u_after - u_two).max() > 1e-3
    assert np.abs(u_after - np_power_iteration(k1, u0)[0]).max() > 1e-2


def test_power_iteration_step_inside_tf_function():
    """In a tf.function the block reads the start-of-step u and commits u' from the entry kernel."""
    rng = np.random.default_rng(7)
    layer = built_sn_conv(rng, filters=3, cin=2)
    x = f32(rng.normal(size=(1, 5, 6, 2)))
    delta = f32(rng.normal(size=layer.kernel.shape))

    @tf.function
    def step(inp):
        with ops.power_iteration_step(layer):
            y = layer(inp)
            layer.kernel.assign_add(delta)
            y_after_update = layer(inp)
        return y, y_after_update

    bias = layer.bias.numpy()
    for _ in range(2):  # the second call checks the traced step reads the new state
        k0, u0 = layer.kernel.numpy(), layer.u.numpy()
        y, y2 = step(tf.constant(x))
        np.testing.assert_allclose(y.numpy(), np_conv(x, np_sn_kernel(k0, u0), 1, (1, 1, 1, 1), bias),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y2.numpy(),
                                   np_conv(x, np_sn_kernel(k0 + delta, u0), 1, (1, 1, 1, 1), bias),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.kernel.numpy(), k0 + delta, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(layer.u.numpy(), np_power_iteration(k0, u0)[0],
                                   rtol=1e-5, atol=1e-6)


class _Holder(keras.layers.Layer):
    """A container of an SN conv, a plain conv and an SN CAM classifier."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sn_conv = ops.Conv(3, 3, pad=1, spectral_norm=True, name='sn_conv')
        self.conv = ops.Conv(3, 3, pad=1, name='conv')
        self.cam = ops.CAMClassifier(spectral_norm=True, name='cam')

    def call(self, x):
        return self.cam(self.conv(self.sn_conv(x)))


def test_spectral_norm_layers_and_step_cover_every_sn_layer():
    """spectral_norm_layers finds exactly the SN layers; power_iteration_step advances each u."""
    rng = np.random.default_rng(8)
    holder = _Holder()
    holder(tf.constant(f32(rng.normal(size=(1, 4, 4, 2)))))
    found = ops.spectral_norm_layers(holder)
    assert {id(l) for l in found} == {id(holder.sn_conv), id(holder.cam)}
    assert len(found) == 2
    assert [id(l) for l in ops.spectral_norm_layers(holder.cam)] == [id(holder.cam)]
    assert ops.spectral_norm_layers(holder.conv) == []
    randomize(holder.sn_conv, rng)
    expected = {id(l): np_power_iteration(l.kernel.numpy(), l.u.numpy())[0] for l in found}
    plain_kernel = holder.conv.conv2d.kernel.numpy()
    with ops.power_iteration_step(holder):
        pass
    for l in found:
        np.testing.assert_allclose(l.u.numpy(), expected[id(l)], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(holder.conv.conv2d.kernel.numpy(), plain_kernel)


def test_sn_gradient_treats_u_v_as_constants_but_not_sigma():
    """∂L/∂W through the SN conv = G/σ − ⟨G,Wm⟩/σ²·vᵀu' (u', v constant), checked by finite differences."""
    rng = np.random.default_rng(9)
    layer = built_sn_conv(rng, filters=3, k=3, cin=2, hw=(4, 5))
    x = f32(rng.normal(size=(2, 4, 5, 2)))
    r = rng.normal(size=(2, 4, 5, 3))
    k0, u0 = np.float64(layer.kernel.numpy()), layer.u.numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(x)) * f32(r))
    grad = tape.gradient(loss, layer.kernel).numpy().reshape(-1, 3)

    u_new, v, sigma, wm = np_power_iteration(k0, u0)
    patches = np_patches(np_pad(np.float64(x), (1, 1, 1, 1)), 3, 1)
    g = np.einsum('byxijc,byxo->ijco', patches, r).reshape(-1, 3)  # ∂L/∂(W/σ)
    formula = g / sigma - np.sum(g * wm) / sigma ** 2 * (v.T @ u_new)

    def frozen_loss(w):  # L(W) with u', v frozen at their values for k0
        s = (v @ w.reshape(-1, 3) @ u_new.T).item()
        return np.sum(np_conv(x, w / s, 1, (1, 1, 1, 1)) * r)

    fd = np.zeros_like(k0)
    h = 1e-6
    for idx in np.ndindex(k0.shape):
        e = np.zeros_like(k0)
        e[idx] = h
        fd[idx] = (frozen_loss(k0 + e) - frozen_loss(k0 - e)) / (2 * h)
    np.testing.assert_allclose(formula, fd.reshape(-1, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, formula, rtol=1e-4, atol=1e-4 * np.abs(formula).max())
    # Treating σ as a constant would give g/σ: measurably different.
    assert np.abs(grad - g / sigma).max() > 0.05 * np.abs(g / sigma).max()


# --- §3.3 dense layers ----------------------------------------------------------

def test_fully_connected_flattens_hwc_and_matches_numpy():
    """FullyConnected: row-major (H, W, C) flatten, then x·kernel + bias; `dense/kernel` [in, units]."""
    rng = np.random.default_rng(10)
    x = f32(rng.normal(size=(2, 3, 2, 4)))
    fc = ops.FullyConnected(5, name='fc')
    fc(tf.constant(x))
    randomize(fc, rng)
    w = by_path(fc)
    assert set(w) == {'fc/dense/kernel', 'fc/dense/bias'}
    assert tuple(w['fc/dense/kernel'].shape) == (24, 5)
    expected = x.reshape(2, -1) @ np.float64(w['fc/dense/kernel'].numpy()) + w['fc/dense/bias'].numpy()
    np.testing.assert_allclose(fc(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('sn', [False, True])
def test_cam_classifier_matches_numpy(sn):
    """CAM: logits [GAP·w+b, GMP·w+b]; attended = concat(x·(w[:,0]+b)) twice; w = kernel/‖kernel‖ under SN."""
    rng = np.random.default_rng(11)
    x = f32(rng.normal(size=(2, 3, 4, 5)))
    cam = ops.CAMClassifier(spectral_norm=sn, name='CAM_logit')
    cam(tf.constant(x))
    randomize(cam, rng)
    kernel, b = np.float64(cam.kernel.numpy()), np.float64(cam.bias.numpy())
    # O = 1: one power iteration is exact, σ = ‖w‖₂ (spec §3.2).
    w = kernel / np.linalg.norm(kernel) if sn else kernel
    if sn:
        np.testing.assert_allclose(w, np_sn_kernel(kernel, cam.u.numpy()), rtol=1e-12)
    attended, logits = cam(tf.constant(x))
    gap = x.mean(axis=(1, 2)) @ w + b
    gmp = x.max(axis=(1, 2)) @ w + b
    np.testing.assert_allclose(logits.numpy(), np.concatenate([gap, gmp], axis=-1),
                               rtol=1e-5, atol=1e-5)
    channel_w = w[:, 0] + b
    np.testing.assert_allclose(attended.numpy(),
                               np.concatenate([x * channel_w, x * channel_w], axis=-1),
                               rtol=1e-5, atol=1e-6)
    assert attended.shape == (2, 3, 4, 10) and logits.shape == (2, 2)


@pytest.mark.parametrize('sn', [False, True])
def test_cam_classifier_variables(sn):
    """CAM variables: `kernel` [C,1], (`u` [1,1], non-trainable, under SN), `bias` [1]."""
    cam = ops.CAMClassifier(spectral_norm=sn, name='CAM_logit')
    cam(tf.zeros([1, 2, 2, 6]))
    w = by_path(cam)
    expected = {'CAM_logit/kernel': (6, 1), 'CAM_logit/bias': (1,)}
    if sn:
        expected['CAM_logit/u'] = (1, 1)
    assert {p: tuple(v.shape) for p, v in w.items()} == expected
    if sn:
        assert not w['CAM_logit/u'].trainable


# --- §3.4 normalisations ---------------------------------------------------------

@pytest.mark.parametrize('offset,scale', [(0.0, 1.0), (100.0, 1.0), (-3.0, 0.1),
                                          (5.0, 10.0), (-50.0, 20.0), (0.0, 1e-3)])
def test_instance_norm_normalises_per_sample_and_channel(offset, scale):
    """IN output: per (sample, channel) mean 0 and population variance σ²/(σ²+1e-5) over (H, W)."""
    rng = np.random.default_rng(12)
    x = f32(offset + scale * rng.normal(size=(2, 5, 3, 4)))
    layer = ops.InstanceNorm()
    y = np.float64(layer(tf.constant(x)).numpy())
    var_in = np.float64(x).var(axis=(1, 2))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.var(axis=(1, 2)), var_in / (var_in + EPS), rtol=1e-3)
    if scale >= 0.1:
        np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, rtol=1e-2)
    np.testing.assert_allclose(y, np_instance_normalize(x), atol=1e-4)


def test_instance_norm_affine_and_variable_order():
    """IN = γ·(x−μ_I)/sqrt(σ²_I+1e-5) + β; variables `beta` then `gamma`, both [C]."""
    rng = np.random.default_rng(13)
    x = f32(rng.normal(size=(2, 3, 4, 3)) * 2 + 1)
    layer = ops.InstanceNorm(name='instance_norm')
    layer(tf.constant(x))
    assert [v.path for v in layer.weights] == ['instance_norm/beta', 'instance_norm/gamma']
    assert all(tuple(v.shape) == (3,) for v in layer.weights)
    randomize(layer, rng)
    expected = np_instance_normalize(x) * layer.gamma.numpy() + layer.beta.numpy()
    np.testing.assert_allclose(layer(tf.constant(x)).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('smoothing,rho,used', [
    (False, 1.0, 1.0),          # pure IN
    (True, 1.0, 0.9),           # the initial value: clip(1 − 0.1) = 0.9
    (True, 0.05, 0.0),          # below 0.1: pure LN
    (True, 0.0, 0.0),
    (False, 0.0, 0.0),          # pure LN
    (False, 0.3, 0.3),
    (True, 0.6, 0.5),
])
def test_adalin_mix(smoothing, rho, used):
    """AdaLIN = (ρ·IN + (1−ρ)·LN)·γ + β with ρ = clip(rho − 0.1, 0, 1) when smoothing, else rho."""
    rng = np.random.default_rng(14)
    x = f32(rng.normal(size=(2, 3, 5, 4)) * rng.uniform(0.5, 3, size=(1, 1, 1, 4))
            + rng.normal(size=(1, 1, 1, 4)) * 2)   # channels with different moments
    gamma = f32(rng.normal(size=(2, 1, 1, 4)))
    beta = f32(rng.normal(size=(2, 1, 1, 4)))
    layer = ops.AdaLIN(smoothing=smoothing, name='instance_layer_norm')
    layer(tf.constant(x), tf.constant(gamma), tf.constant(beta))
    assert [v.path for v in layer.weights] == ['instance_layer_norm/rho']
    layer.rho.assign(f32(np.full(4, rho)))
    got = layer(tf.constant(x), tf.constant(gamma), tf.constant(beta)).numpy()
    np.testing.assert_allclose(got, np_lin(x, used, gamma, beta), rtol=1e-4, atol=1e-4)
    if used in (0.0, 1.0):  # the pure cases, spelled out
        pure = np_instance_normalize(x) if used == 1.0 else np_layer_normalize(x)
        np.testing.assert_allclose(got, pure * gamma + beta, rtol=1e-4, atol=1e-4)


def test_adalin_per_channel_rho_and_zero_gradient_below_smoothing():
    """Per-channel ρ = clip(rho − 0.1, 0, 1); a stored rho < 0.1 gets exactly zero gradient."""
    rng = np.random.default_rng(15)
    x = f32(rng.normal(size=(2, 4, 3, 3)) * f32([[[[1.0, 3.0, 0.5]]]]) + f32([0.0, 2.0, -1.0]))
    gamma, beta = f32(rng.normal(size=(2, 1, 1, 3))), f32(rng.normal(size=(2, 1, 1, 3)))
    layer = ops.AdaLIN()
    layer(tf.constant(x), tf.constant(gamma), tf.constant(beta))
    layer.rho.assign(f32([1.0, 0.05, 0.6]))
    r = f32(rng.normal(size=x.shape))
    with tf.GradientTape() as tape:
        out = layer(tf.constant(x), tf.constant(gamma), tf.constant(beta))
        loss = tf.reduce_sum(out * r)
    np.testing.assert_allclose(out.numpy(), np_lin(x, np.array([0.9, 0.0, 0.5]), gamma, beta),
                               rtol=1e-4, atol=1e-4)
    g = tape.gradient(loss, layer.rho).numpy()
    # ∂L/∂ρ_c = Σ r·(x_I − x_L)·γ for channels inside the clip's linear range.
    d = np.sum(r * (np_instance_normalize(x) - np_layer_normalize(x)) * gamma, axis=(0, 1, 2))
    assert g[1] == 0.0
    np.testing.assert_allclose(g[[0, 2]], d[[0, 2]], rtol=1e-3)
    assert abs(g[0]) > 1e-3 and abs(g[2]) > 1e-3


@pytest.mark.parametrize('make', ['adalin', 'lin'])
def test_rho_constraint_clips_after_optimizer_update(make):
    """The rho constraint clips to [0, 1] after an optimizer step (values pushed out of range)."""
    x = tf.constant(f32(np.random.default_rng(16).normal(size=(1, 2, 2, 3))))
    if make == 'adalin':
        layer = ops.AdaLIN()
        layer(x, tf.ones([1, 1, 1, 3]), tf.zeros([1, 1, 1, 3]))
    else:
        layer = ops.LIN()
        layer(x)
    layer.rho.assign(f32([0.5, 0.5, 0.5]))
    keras.optimizers.SGD(learning_rate=1.0).apply_gradients(
        [(tf.constant(f32([-2.0, 2.0, 0.25])), layer.rho)])
    np.testing.assert_allclose(layer.rho.numpy(), f32([1.0, 0.0, 0.25]), atol=1e-7)


def test_lin_starts_as_layer_norm_with_variables_rho_gamma_beta():
    """LIN: variables `rho` (0), `gamma` (1), `beta` (0) in that order, so at init it is pure LN."""
    rng = np.random.default_rng(17)
    x = f32(rng.normal(size=(2, 3, 4, 3)) * f32([1.0, 4.0, 0.3]) + f32([1.0, -2.0, 5.0]))
    layer = ops.LIN(name='layer_ins_norm_0')
    y = layer(tf.constant(x)).numpy()
    assert [v.path for v in layer.weights] == ['layer_ins_norm_0/rho', 'layer_ins_norm_0/gamma',
                                               'layer_ins_norm_0/beta']
    assert all(tuple(v.shape) == (3,) for v in layer.weights)
    np.testing.assert_allclose(y, np_layer_normalize(x), rtol=1e-4, atol=1e-4)
    # Per-sample LN moments, not per channel: channels keep distinct means.
    assert np.ptp(y.mean(axis=(1, 2)), axis=-1).min() > 0.5


def test_lin_mix_matches_numpy():
    """LIN = (rho·IN + (1−rho)·LN)·gamma + beta, without smoothing."""
    rng = np.random.default_rng(18)
    x = f32(rng.normal(size=(2, 3, 4, 3)) * f32([1.0, 4.0, 0.3]) + f32([1.0, -2.0, 5.0]))
    layer = ops.LIN()
    layer(tf.constant(x))
    rho, gamma, beta = f32([0.05, 0.5, 1.0]), f32(rng.normal(size=3)), f32(rng.normal(size=3))
    layer.rho.assign(rho)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    np.testing.assert_allclose(layer(tf.constant(x)).numpy(), np_lin(x, rho, gamma, beta),
                               rtol=1e-4, atol=1e-4)


# --- Blocks ---------------------------------------------------------------------

def test_residual_block_variable_names():
    """resblock variables: res{1,2}/conv_0/conv2d/{kernel,bias} and res{1,2}/<norm scope>/..."""
    block = ops.ResidualBlock(3, lambda: ops.InstanceNorm(name='instance_norm'), name='resblock_0')
    block(tf.zeros([1, 4, 4, 3]))
    assert {v.path for v in block.weights} == {
        f'resblock_0/res{i}/{n}' for i in (1, 2)
        for n in ('conv_0/conv2d/kernel', 'conv_0/conv2d/bias',
                  'instance_norm/beta', 'instance_norm/gamma')}
    ada = ops.ResidualBlock(3, lambda: ops.AdaLIN(name='instance_layer_norm'),
                            use_bias=False, name='adaptive_resblock0')
    ada(tf.zeros([1, 4, 4, 3]), tf.ones([1, 1, 1, 3]), tf.zeros([1, 1, 1, 3]))
    assert {v.path for v in ada.weights} == {
        f'adaptive_resblock0/res{i}/{n}' for i in (1, 2)
        for n in ('conv_0/conv2d/kernel', 'instance_layer_norm/rho')}


def test_residual_block_with_instance_norm_matches_numpy():
    """ResidualBlock = x + IN(conv(relu(IN(conv(x))))), reflect pad 1, no activation after the add."""
    rng = np.random.default_rng(19)
    x = f32(rng.normal(size=(2, 4, 5, 3)) * 2)
    block = ops.ResidualBlock(3, lambda: ops.InstanceNorm(name='instance_norm'), name='rb')
    block(tf.constant(x))
    randomize(block, rng)
    w = {p.split('/', 1)[1]: np.float64(v.numpy()) for p, v in by_path(block).items()}

    def conv_norm(h, i):
        h = np_conv(h, w[f'res{i}/conv_0/conv2d/kernel'], 1, (1, 1, 1, 1),
                    w[f'res{i}/conv_0/conv2d/bias'])
        return (np_instance_normalize(h) * w[f'res{i}/instance_norm/gamma']
                + w[f'res{i}/instance_norm/beta'])

    expected = x + conv_norm(np.maximum(conv_norm(x, 1), 0), 2)
    got = block(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert got.min() < -0.5  # no relu after the add


def test_residual_block_with_adalin_matches_numpy():
    """Adaptive resblock: both AdaLINs get the same γ, β; conv without bias when use_bias=False."""
    rng = np.random.default_rng(20)
    x = f32(rng.normal(size=(2, 4, 4, 3)))
    gamma, beta = f32(rng.normal(size=(2, 1, 1, 3))), f32(rng.normal(size=(2, 1, 1, 3)))
    block = ops.ResidualBlock(3, lambda: ops.AdaLIN(name='instance_layer_norm'),
                              use_bias=False, name='rb')
    block(tf.constant(x), tf.constant(gamma), tf.constant(beta))
    randomize(block, rng, skip=('rho',))
    rhos = {1: f32([0.0, 0.5, 1.0]), 2: f32([0.3, 0.95, 0.08])}
    for i, rho in rhos.items():
        getattr(block, f'res{i}').norm.rho.assign(rho)
    w = {p.split('/', 1)[1]: np.float64(v.numpy()) for p, v in by_path(block).items()}

    def conv_norm(h, i):
        h = np_conv(h, w[f'res{i}/conv_0/conv2d/kernel'], 1, (1, 1, 1, 1))
        return np_lin(h, np.clip(rhos[i] - 0.1, 0, 1), gamma, beta)

    expected = x + conv_norm(np.maximum(conv_norm(x, 1), 0), 2)
    got = block(tf.constant(x), tf.constant(gamma), tf.constant(beta)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape,scale', [((2, 3, 5, 2), 2), ((1, 1, 1, 3), 2), ((1, 2, 3, 1), 3)])
def test_up_sample_duplicates_pixels(shape, scale):
    """up_sample = np.repeat along H and W (exact pixel duplication)."""
    x = f32(np.random.default_rng(21).normal(size=shape))
    expected = np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)
    np.testing.assert_array_equal(ops.up_sample(tf.constant(x), scale).numpy(), expected)


def test_up_sample_gradient_sums_each_block():
    """The gradient of up_sample (×2) sums the upstream gradient over each 2×2 block."""
    rng = np.random.default_rng(22)
    x = tf.constant(f32(rng.normal(size=(1, 2, 3, 2))))
    r = f32(rng.normal(size=(1, 4, 6, 2)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(ops.up_sample(x) * r)
    expected = r.reshape(1, 2, 2, 3, 2, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), expected, rtol=1e-6, atol=1e-6)


# --- §8 losses -------------------------------------------------------------------

def test_l1_loss():
    """l1_loss = mean |x − y| over all elements."""
    rng = np.random.default_rng(23)
    x, y = f32(rng.normal(size=(2, 3, 4, 3))), f32(rng.normal(size=(2, 3, 4, 3)))
    assert float(ops.l1_loss(tf.constant(x), tf.constant(y))) == pytest.approx(
        np.abs(np.float64(x) - y).mean(), rel=1e-6)


@pytest.mark.parametrize('label', [0.0, 1.0, 1])
def test_bce_loss_matches_stable_sigmoid_cross_entropy(label):
    """bce_loss = mean sigmoid cross-entropy against a constant label, stable at |z| = 80."""
    z = f32(np.concatenate([np.random.default_rng(24).normal(size=10) * 3, [-80.0, 80.0]]))
    got = float(ops.bce_loss(tf.constant(z.reshape(2, 6)), label))
    assert np.isfinite(got)
    assert got == pytest.approx(np_bce(z, float(label)), rel=1e-5)


def test_cam_loss():
    """cam_loss = BCE(source, 1) + BCE(non_source, 0)."""
    rng = np.random.default_rng(25)
    s, n = f32(rng.normal(size=(3, 2)) * 2), f32(rng.normal(size=(3, 2)) * 2)
    assert float(ops.cam_loss(tf.constant(s), tf.constant(n))) == pytest.approx(
        np_bce(s, 1) + np_bce(n, 0), rel=1e-5)


def _critic_outputs(rng):
    """Two (real, fake) pairs shaped like a patch logit and a CAM logit, crossing ±1."""
    real = [f32(rng.normal(size=(2, 4, 4, 1)) * 2), f32(rng.normal(size=(2, 2)) * 2)]
    fake = [f32(rng.normal(size=(2, 4, 4, 1)) * 2 - 0.5), f32(rng.normal(size=(2, 2)) * 2)]
    return real, fake


@pytest.mark.parametrize('gan_type', ops.GAN_TYPES)
def test_discriminator_loss(gan_type):
    """discriminator_loss = Σ over output pairs of the spec's D term for the gan_type."""
    real, fake = _critic_outputs(np.random.default_rng(26))
    got = float(ops.discriminator_loss(gan_type, [tf.constant(a) for a in real],
                                       [tf.constant(a) for a in fake]))
    expected = sum(np_d_term(gan_type, r, f) for r, f in zip(real, fake))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('gan_type', ops.GAN_TYPES)
def test_generator_loss(gan_type):
    """generator_loss = Σ over outputs of the spec's G term for the gan_type."""
    _, fake = _critic_outputs(np.random.default_rng(27))
    got = float(ops.generator_loss(gan_type, [tf.constant(a) for a in fake]))
    assert got == pytest.approx(sum(np_g_term(gan_type, f) for f in fake), rel=1e-5)


def test_gan_types_and_unknown_type_raises():
    """GAN_TYPES is the spec's list; an unknown gan_type raises ValueError in every loss."""
    assert set(ops.GAN_TYPES) == {'lsgan', 'gan', 'hinge', 'wgan', 'wgan-gp', 'wgan-lp', 'dragan'}
    x = [tf.zeros([1, 2])]
    for bad in ('wgan_gp', 'LSGAN', 'ragan', ''):
        with pytest.raises(ValueError):
            ops.check_gan_type(bad)
        with pytest.raises(ValueError):
            ops.discriminator_loss(bad, x, x)
        with pytest.raises(ValueError):
            ops.generator_loss(bad, x)


def test_has_gradient_penalty():
    """Only wgan-gp, wgan-lp and dragan add a gradient penalty (plain wgan does not)."""
    assert {t for t in ops.GAN_TYPES if ops.has_gradient_penalty(t)} == {'wgan-gp', 'wgan-lp', 'dragan'}


@pytest.mark.parametrize('gan_type', ['wgan-gp', 'wgan-lp', 'wgan'])
def test_gradient_penalty_inputs_interpolate(gan_type):
    """x̂ = real + α·(fake − real) with α [B,1,1,1]."""
    rng = np.random.default_rng(28)
    real, fake = f32(rng.normal(size=(3, 2, 2, 2))), f32(rng.normal(size=(3, 2, 2, 2)))
    alpha = f32(rng.uniform(size=(3, 1, 1, 1)))
    got = ops.gradient_penalty_inputs(gan_type, tf.constant(real), tf.constant(fake),
                                      tf.constant(alpha)).numpy()
    np.testing.assert_allclose(got, real + alpha * (np.float64(fake) - real), rtol=1e-6, atol=1e-6)


def test_gradient_penalty_inputs_dragan():
    """dragan: fake := real + 0.5·std(real)·eps (population std over the whole tensor), then interpolate."""
    rng = np.random.default_rng(29)
    real = f32(rng.normal(size=(2, 3, 3, 2)) * f32([1.0, 5.0]).reshape(2, 1, 1, 1) + 2.0)
    fake = f32(rng.normal(size=real.shape) * 100)   # ignored by dragan
    alpha = f32(rng.uniform(size=(2, 1, 1, 1)))
    eps = f32(rng.uniform(size=real.shape))
    got = ops.gradient_penalty_inputs('dragan', tf.constant(real), tf.constant(fake),
                                      tf.constant(alpha), tf.constant(eps)).numpy()
    std = np.float64(real).std()   # ddof=0, all axes
    expected = real + alpha * (0.5 * std * np.float64(eps))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Neither the sample std nor a per-sample std.
    sample_std = np.float64(real).std(ddof=1)
    assert np.abs(got - (real + alpha * 0.5 * sample_std * eps)).max() > 1e-4
    per_sample = np.float64(real).std(axis=(1, 2, 3), keepdims=True)
    assert np.abs(got - (real + alpha * 0.5 * per_sample * eps)).max() > 1e-2


@pytest.mark.parametrize('gan_type', ['wgan-gp', 'wgan-lp', 'dragan'])
def test_gradient_penalty_with_analytic_critic(gan_type):
    """GP per output: λ·mean((n−1)²) (gp, dragan) or λ·mean(max(0, n−1)²) (lp), n = ‖∂ΣD/∂x̂‖ per sample."""
    rng = np.random.default_rng(30)
    shape = (4, 2, 2, 2)
    x_hat = f32(rng.normal(size=shape))
    a1 = f32(rng.normal(size=shape[1:]))
    a1 /= np.linalg.norm(a1)                         # ‖a1‖ = 1
    q = 0.4
    x_hat[0] = -a1                                   # sample 0: n = ‖(1 − q)·a1‖ = 0.6 < 1
    a2 = f32(rng.normal(size=shape[1:]))
    a3 = f32(rng.normal(size=shape[1:]))
    c = 0.4 / np.linalg.norm(a2 + a3)
    a2, a3 = a2 * c, a3 * c                          # ‖a2 + a3‖ = 0.4

    def critic(x):
        patch = a1 * x + 0.5 * q * tf.square(x)      # [B,H,W,C]: ∂/∂x = a1 + q·x
        cam = tf.stack([tf.reduce_sum(a2 * x, axis=[1, 2, 3]),
                        tf.reduce_sum(a3 * x, axis=[1, 2, 3])], axis=1)  # [B,2]: ∂ = a2 + a3
        return [patch, cam]

    lam = 10.0
    got = [float(p) for p in ops.gradient_penalty(gan_type, critic, tf.constant(x_hat), lam)]
    n_patch = np.linalg.norm((a1 + q * np.float64(x_hat)).reshape(4, -1), axis=1)
    n_cam = np.full(4, np.linalg.norm(np.float64(a2) + a3))
    assert (n_patch < 1).any() and (n_patch > 1).any() and (n_cam < 1).all()

    def penalty(n):
        excess = np.maximum(0.0, n - 1) if gan_type == 'wgan-lp' else n - 1
        return lam * np.mean(excess ** 2)

    assert len(got) == 2
    assert got[0] == pytest.approx(penalty(n_patch), rel=1e-4)
    assert got[1] == pytest.approx(penalty(n_cam), rel=1e-4, abs=1e-6)
    if gan_type == 'wgan-lp':
        assert got[1] == 0.0
    else:
        assert got[1] > 1.0


def test_l2_regularization():
    """l2_regularization = 1e-4 · Σ sum(w²)/2 over the given kernels."""
    rng = np.random.default_rng(31)
    kernels = [f32(rng.normal(size=s)) for s in [(3, 3, 2, 4), (5, 1), (4,)]]
    got = float(ops.l2_regularization([tf.Variable(k) for k in kernels]))
    assert got == pytest.approx(1e-4 * sum(np.sum(np.float64(k) ** 2) / 2 for k in kernels), rel=1e-6)


# --- Optimizer --------------------------------------------------------------------

def numpy_adam(w, grads, lrs, beta1=0.5, beta2=0.999, eps=1e-8):
    """The spec's Adam (tf.train.AdamOptimizer), step by step in float64."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = m + (g - m) * (1 - beta1)
        v = v + (g * g - v) * (1 - beta2)
        w = w - lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m / (np.sqrt(v) + eps)
    return w, m, v


@pytest.mark.parametrize('compiled', [False, True])
def test_fused_adam_matches_the_adam_update(compiled):
    """ops.Adam (one ResourceApplyAdam per variable) gives Adam's update: the NumPy oracle's
    weights and slots, and Keras' own Adam's, over steps with a changing learning rate;
    the unit-interval constraint still applies after the update."""
    rng = np.random.default_rng(0)
    shapes = [(4, 4, 3, 8), (8,), (1, 1, 1, 5)]
    initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
    initial[2] = np.full(shapes[2], 0.999, np.float32)  # rho-like: the update pushes it past 1
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
    for g in grads:
        g[2] = np.full(shapes[2], -1.0, np.float32)
    lrs = [1e-2, 1e-2, 5e-3]

    def run(optimizer):
        weights = [keras.Variable(w, name=f'w{i}') for i, w in enumerate(initial[:2])]
        weights.append(keras.Variable(initial[2], name='rho'))
        weights[2].constraint = ops.unit_interval_constraint  # as AdaLIN's add_weight sets it
        optimizer.build(weights)

        def step(g, lr):
            optimizer.learning_rate = lr
            optimizer.apply(g, weights)
        step = tf.function(step, autograph=False) if compiled else step
        for g, lr in zip(grads, lrs):
            step([tf.constant(x) for x in g], tf.constant(lr))
        return weights, optimizer

    adam = lambda cls: cls(learning_rate=1e-2, beta_1=0.5, beta_2=0.999, epsilon=1e-8)
    fused, fused_opt = run(adam(ops.Adam))
    plain, _ = run(adam(keras.optimizers.Adam))
    assert int(fused_opt.iterations.numpy()) == len(lrs)
    for i in range(2):
        w, m, v = numpy_adam(initial[i].astype(np.float64), [g[i] for g in grads], lrs)
        np.testing.assert_allclose(fused[i].numpy(), w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(fused_opt._momentums[i].numpy(), m, rtol=1e-5, atol=1e-7)
        # 1 − β2 = 0.001 is inexact in float32: v is 1e-5-relative off the float64 oracle
        np.testing.assert_allclose(fused_opt._velocities[i].numpy(), v, rtol=5e-5, atol=1e-9)
        # Keras computes lr·√(1 − β2ᵗ)/(1 − β1ᵗ) in another order: a few float32 ulps apart
        np.testing.assert_allclose(fused[i].numpy(), plain[i].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(fused[2].numpy(), 1.0)  # pushed past 1, then clipped
    np.testing.assert_array_equal(plain[2].numpy(), 1.0)


# --- Metrics: KID and FID against NumPy/SciPy oracles -------------------------------------

def np_cubic_kernel(x, y):
    """Bińkowski et al.'s kernel, elementwise: k(x, y) = (x·y / d + 1)³."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def np_mmd2(x, y, unbiased=True):
    """MMD² with the cubic kernel; unbiased: the within-set means skip i = j (boolean masks)."""
    k_xx, k_yy = np_cubic_kernel(x, x), np_cubic_kernel(y, y)
    if unbiased:
        within = k_xx[~np.eye(len(x), dtype=bool)].mean() + k_yy[~np.eye(len(y), dtype=bool)].mean()
    else:
        within = k_xx.mean() + k_yy.mean()
    return within - 2 * np_cubic_kernel(x, y).mean()


def np_fid_sqrtm(x, y):
    """FID with SciPy's general matrix square root of Σ_x Σ_y (full-rank covariances)."""
    from scipy import linalg
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(sx @ sy).real
    return np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx + sy - 2 * root)


def np_fid_symmetric(x, y):
    """FID through Tr (Σ_x^½ Σ_y Σ_x^½)^½ with symmetric eigendecompositions (any rank)."""
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(sx)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_x @ sy @ root_x)
    inner[inner < 1e-10 * inner.max()] = 0  # round-off of the zero eigenvalues (rank < d)
    return (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy)
            - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def exact_moments_sample(rng, n, mean, cov):
    """n points whose sample mean and sample covariance (1/(n−1)) are exactly `mean`, `cov`."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov = I
    return mean + z @ np.linalg.cholesky(cov).T


@pytest.mark.parametrize('n, n_blocks, sizes', [
    (23, 3, [7, 8, 8]), (27, 3, [9, 9, 9]), (100, 10, [10] * 10), (5, 2, [2, 3]), (4, 1, [4])])
def test_block_sizes_put_the_larger_blocks_last(n, n_blocks, sizes):
    """TF-GAN's split: n // n_blocks each, the last n % n_blocks blocks one more."""
    assert ops.block_sizes(n, n_blocks) == sizes


def test_kid_blocks_mean_and_standard_error():
    """23 real and 27 fake rows, blocks of at most 10: 3 blocks, real [0:7] [7:15] [15:23]
    paired with fake [0:9] [9:18] [18:27]; mean of the 3 estimates and their standard error."""
    rng = np.random.default_rng(40)
    real, fake = rng.normal(size=(23, 5)), rng.normal(0.3, 1.2, size=(27, 5))
    estimates = [np_mmd2(real[0:7], fake[0:9]), np_mmd2(real[7:15], fake[9:18]),
                 np_mmd2(real[15:23], fake[18:27])]
    mean, std = ops.kernel_inception_distance(real, fake, max_block_size=10)
    assert mean == pytest.approx(np.mean(estimates), rel=1e-10)
    assert std == pytest.approx(np.std(estimates, ddof=1) / np.sqrt(3), rel=1e-10)
    assert ops.KID_MAX_BLOCK_SIZE == 10  # the README documents this block size


def test_kid_single_block_has_no_std():
    """Sets within one block: the mean is the one unbiased estimate, the std NaN (as TF-GAN)."""
    rng = np.random.default_rng(41)
    real, fake = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
    mean, std = ops.kernel_inception_distance(real, fake, max_block_size=10)
    assert mean == pytest.approx(np_mmd2(real, fake), rel=1e-10)
    assert np.isnan(std)


def test_kid_caps_the_blocks_at_two_rows_of_the_smaller_set():
    """100 real and 5 fake rows: 2 blocks (not 10), real 50 + 50 paired with fake 2 + 3."""
    rng = np.random.default_rng(42)
    real, fake = rng.normal(size=(100, 3)), rng.normal(size=(5, 3))
    estimates = [np_mmd2(real[:50], fake[:2]), np_mmd2(real[50:], fake[2:])]
    mean, std = ops.kernel_inception_distance(real, fake, max_block_size=10)
    assert mean == pytest.approx(np.mean(estimates), rel=1e-10)
    assert std == pytest.approx(np.std(estimates, ddof=1) / np.sqrt(2), rel=1e-10)


def test_kid_is_unbiased_against_the_analytic_mmd():
    """1-D N(0, σ²) against N(μ, σ²), σ = μ = 0.5: k(x, y) = 1 + 3xy + 3x²y² + x³y³, so
    MMD² = 3(ΔE x)² + 3(ΔE x²)² + (ΔE x³)² = 3μ² + 3μ⁴ + (μ³ + 3μσ²)² = 1.1875.
    Over 400 blocks of 10 the mean is within 4 standard errors of it, where the biased
    (diagonal-including) estimator is not; two samples of one distribution give ≈ 0."""
    rng = np.random.default_rng(43)
    sigma = mu = 0.5
    x, y = rng.normal(0, sigma, (4000, 1)), rng.normal(mu, sigma, (4000, 1))
    x2 = rng.normal(0, sigma, (4000, 1))
    analytic = 3 * mu ** 2 + 3 * mu ** 4 + (mu ** 3 + 3 * mu * sigma ** 2) ** 2
    assert analytic == pytest.approx(1.1875)
    mean, std = ops.kernel_inception_distance(x, y, max_block_size=10)
    assert 0 < std < 0.1 * analytic
    assert abs(mean - analytic) < 4 * std
    biased = np.mean([np_mmd2(x[i:i + 10], y[i:i + 10], unbiased=False) for i in range(0, 4000, 10)])
    assert abs(biased - analytic) > 4 * std  # the check can tell the two estimators apart
    same_mean, same_std = ops.kernel_inception_distance(x, x2, max_block_size=10)
    assert abs(same_mean) < 4 * same_std and same_std < 0.1 * analytic


def test_kid_of_a_set_against_itself_is_the_closed_form():
    """X against itself: 2/(m − 1) · (mean k − mean of the diagonal), for one block of m = 10.
    Not 0: the unbiased estimator drops the diagonal from the within-set means only; it is
    two samples of one distribution that give ≈ 0 on average (test above)."""
    rng = np.random.default_rng(44)
    x = rng.normal(size=(10, 8))
    k = np_cubic_kernel(x, x)
    mean, _ = ops.kernel_inception_distance(x, x, max_block_size=10)
    assert mean == pytest.approx(2 / 9 * (k.mean() - np.diag(k).mean()), rel=1e-10)


def test_fid_of_identical_sets_is_zero():
    """FID(X, X) = 0 with fewer rows than dimensions (rank-deficient covariance) and more."""
    rng = np.random.default_rng(45)
    for shape in ((12, 40), (60, 5)):
        x = rng.normal(2.0, 3.0, size=shape)
        assert abs(ops.frechet_distance(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))


def test_fid_of_two_gaussians_is_the_analytic_value():
    """Samples with exact moments μ_i, Σ_i = R diag(λ_i) Rᵀ (one rotation R, so Σ_1, Σ_2
    commute): FID = ‖μ_1 − μ_2‖² + Σ_k (√λ_1k − √λ_2k)²."""
    rng = np.random.default_rng(46)
    d = 6
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam1, lam2 = np.array([1, 2, 3, 4, 5, 6.0]), np.array([6, 1, 0.5, 4, 2, 9.0])
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    x = exact_moments_sample(rng, 50, mu1, rotation @ np.diag(lam1) @ rotation.T)
    y = exact_moments_sample(rng, 70, mu2, rotation @ np.diag(lam2) @ rotation.T)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(lam1) - np.sqrt(lam2)) ** 2)
    assert ops.frechet_distance(x, y) == pytest.approx(analytic, rel=1e-9)


def test_fid_matches_scipy_sqrtm_with_full_rank_covariances():
    """Non-commuting covariances, more rows than dimensions: SciPy's sqrtm formula."""
    rng = np.random.default_rng(47)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(55, 6)) @ rng.normal(size=(6, 6)) + 0.7
    assert ops.frechet_distance(x, y) == pytest.approx(np_fid_sqrtm(x, y), rel=1e-8)


def test_fid_matches_the_symmetric_formula_with_fewer_rows_than_dimensions():
    """12 and 15 rows in 40 dimensions (the evaluation's regime: hundreds of images,
    2048 features): the symmetric-square-root formula, with float32 input."""
    rng = np.random.default_rng(48)
    x = rng.normal(size=(12, 40)).astype(np.float32)
    y = (rng.normal(size=(15, 40)) * 1.5 + 0.2).astype(np.float32)
    expected = np_fid_symmetric(np.float64(x), np.float64(y))
    assert ops.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize('real, fake', [
    (np.zeros((5, 3)), np.zeros((5, 4))), (np.zeros((1, 3)), np.zeros((5, 3))),
    (np.zeros(5), np.zeros(5))])
def test_metrics_reject_bad_feature_sets(real, fake):
    """Different widths, fewer than 2 rows, or not [N, d]: ValueError from both metrics."""
    for metric in (ops.kernel_inception_distance, ops.frechet_distance):
        with pytest.raises(ValueError):
            metric(real, fake)
