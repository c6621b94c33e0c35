"""Layers and losses of the original U-GAT-IT release, as Keras 3 layers.

Nothing here knows about U-GAT-IT's networks: these are the building blocks of
the original `ops.py` (taki0112/UGATIT), re-written so that

* every layer creates its variables under the same names as the original's
  `tf.variable_scope`s (a Keras layer's `name` is the scope; a variable's
  `.path` is the original variable name), and
* every computation follows the original's operation order, so that the
  original's checkpoints reproduce its outputs to float32 round-off.

Tensors are NHWC. The original took instance norm, the L2 regulariser and the
data helpers from `tf.contrib`; they are re-implemented here (tensorflow-addons
is end-of-life and Keras' own `SpectralNormalization` differs from the
original's: see `SpectralNormalized`).

The last section holds the evaluation metrics (KID and FID between two sets of
feature vectors), which the original release did not ship.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

# --- Constants of the original release -------------------------------------

WEIGHT_INIT_STDDEV = 0.02   # tf.random_normal_initializer(0, 0.02): every kernel
WEIGHT_DECAY = 1e-4         # contrib l2_regularizer(scale=1e-4): kernels only
NORM_EPSILON = 1e-5         # instance norm, AdaLIN and LIN all pass 1e-5
L2_NORMALIZE_EPSILON = 1e-12  # tf.nn.l2_normalize's default, in the power iteration
RHO_SMOOTHING = 0.1         # AdaLIN with smoothing uses clip(rho - 0.1, 0, 1)

GAN_TYPES = ('lsgan', 'gan', 'hinge', 'wgan', 'wgan-gp', 'wgan-lp', 'dragan')
# DRAGAN perturbs the real batch by 0.5 * std(real) * U[0, 1) (the original's constant).
DRAGAN_NOISE_SCALE = 0.5


# Mixed precision (--mixed_precision): the compute dtypes that are upcast to float32 for the
# statistics of the norms and the spectral norm. float32 and float64 (the exactness tests)
# are left as they are, so their graphs do not change.
LOW_PRECISION = (tf.float16, tf.bfloat16)


def at_least_float32(x):
    """`x` cast to float32 when it is float16 or bfloat16, else `x` itself (no op)."""
    return tf.cast(x, tf.float32) if tf.as_dtype(x.dtype) in LOW_PRECISION else x


def is_mixed(layer):
    """True when `layer` has a mixed dtype policy (variables float32, compute lower)."""
    return layer.compute_dtype != layer.variable_dtype


def weight_initializer():
    """N(0, 0.02²), the original's initialiser for every conv and dense kernel."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=WEIGHT_INIT_STDDEV)


def unit_interval_constraint(x):
    """The constraint of every rho: clip to [0, 1], applied after each optimizer update."""
    return tf.clip_by_value(x, 0.0, 1.0)


# --- Padding and convolution -----------------------------------------------

def conv_padding(kernel, stride, pad):
    """The original's explicit padding (top, bottom, left, right) for a VALID conv.

    When `kernel - stride` is even, `pad` goes on every side. Otherwise `pad`
    goes on top/left and `kernel - stride - pad` on bottom/right: (1, 0, 1, 0)
    for the generator's 3x3 stride-2 convs, (1, 2, 1, 2) for the
    discriminators' 4x4 stride-1 convs (which keeps the map size).
    """
    if pad <= 0:
        return (0, 0, 0, 0)
    if (kernel - stride) % 2 == 0:
        return (pad, pad, pad, pad)
    rest = kernel - stride - pad
    return (pad, rest, pad, rest)


def pad2d(x, padding, pad_type='reflect'):
    """Pads [B, H, W, C] by (top, bottom, left, right) in REFLECT or zero mode."""
    if not any(padding):
        return x
    top, bottom, left, right = padding
    mode = {'reflect': 'REFLECT', 'zero': 'CONSTANT'}[pad_type]
    return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]], mode=mode)


class SpectralNormalized:
    """Mixin: a layer whose `kernel` [..., O] may be divided by its spectral norm.

    Set `self.spectral_norm` in the constructor; with it on, create the kernel,
    then call `_add_u`. This is exactly the original's
    `spectral_norm(w, iteration=1)`, which differs from Keras'
    `SpectralNormalization`: `u` [1, O] is a non-trainable variable drawn from
    N(0, 1); one power iteration from `u` gives v = l2n(u·Wᵀ) and
    u' = l2n(v·W); σ = v·W·u'ᵀ uses the *updated* u'; u' and v are constants
    for the gradient, which flows through W and through σ's dependence on W.

    The layer itself never writes `u`: every call within one update step reads
    the same start-of-step `u` (the original's semantics, spec §3.2), and `u`
    advances one power iteration per update step, when `power_iteration_step`
    commits it.
    """

    spectral_norm = False

    def _add_u(self, out_dim):
        # Under tf.distribute every replica writes the same new `u` (the kernels are mirrored);
        # ONLY_FIRST_REPLICA makes that write legal in replica context and keeps the copies
        # identical by construction. Without a strategy it changes nothing.
        self.u = self.add_weight(
            name='u', shape=(1, out_dim), trainable=False,
            initializer=keras.initializers.RandomNormal(mean=0.0, stddev=1.0),
            aggregation='only_first_replica')

    def _power_iteration(self):
        """(u' [1, O], v [1, rows], W as a [rows, O] matrix); u' and v are constants."""
        w = tf.reshape(self.kernel, [-1, self.kernel.shape[-1]])  # rows in HWI order
        v = tf.math.l2_normalize(tf.matmul(self.u, w, transpose_b=True),
                                 epsilon=L2_NORMALIZE_EPSILON)
        u_new = tf.math.l2_normalize(tf.matmul(v, w), epsilon=L2_NORMALIZE_EPSILON)
        return tf.stop_gradient(u_new), tf.stop_gradient(v), w

    def sigma(self):
        """The spectral-norm estimate σ (a scalar) from the current `u`."""
        u_new, v, w = self._power_iteration()
        return tf.squeeze(tf.matmul(tf.matmul(v, w), u_new, transpose_b=True))

    def next_u(self):
        """`u` after one power iteration from the current `u` and kernel: [1, O]."""
        return self._power_iteration()[0]

    def effective_kernel(self):
        """kernel / σ with spectral norm, else the kernel itself."""
        if not self.spectral_norm:
            return self.kernel
        u_new, v, w = self._power_iteration()
        sigma = tf.matmul(tf.matmul(v, w), u_new, transpose_b=True)  # [1, 1]
        return tf.reshape(w / sigma, tf.shape(self.kernel))


def spectral_norm_layers(*models):
    """Every layer with spectral norm on inside the given Keras layers/models."""
    return [layer for model in models for layer in model._flatten_layers(include_self=True)
            if isinstance(layer, SpectralNormalized) and layer.spectral_norm]


@contextlib.contextmanager
def power_iteration_step(*models):
    """The scope of one update step: on exit, every SN layer's `u` advances once.

    The new `u` is computed on entry, from the start-of-step `u` and kernel
    (before any optimizer update inside the block), and written on exit. All
    discriminator calls inside the block (real, fake, gradient penalty) read
    the same start-of-step `u`, as in the original's graph. Works eagerly and
    inside `tf.function`, whose automatic control dependencies keep the order.
    """
    layers = spectral_norm_layers(*models)
    next_us = [layer.next_u() for layer in layers]
    yield
    for layer, u in zip(layers, next_us):
        layer.u.assign(u)


class Conv(SpectralNormalized, keras.layers.Layer):
    """The original's `conv()`: explicit padding, then a VALID convolution.

    [B, H, W, Cin] -> [B, H', W', filters]. Without spectral norm the
    variables live in a `conv2d/` sub-scope (`tf.layers.conv2d`:
    `conv2d/kernel`, `conv2d/bias`); with it they sit directly in this layer's
    scope, created in the original's order `kernel`, `u`, `bias`.
    """

    def __init__(self, filters, kernel_size, stride=1, pad=0, pad_type='reflect',
                 use_bias=True, spectral_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.stride = filters, kernel_size, stride
        self.padding = conv_padding(kernel_size, stride, pad)
        self.pad_type, self.use_bias, self.spectral_norm = pad_type, use_bias, spectral_norm
        if not spectral_norm:
            self.conv2d = keras.layers.Conv2D(
                filters, kernel_size, strides=stride, padding='valid', use_bias=use_bias,
                kernel_initializer=weight_initializer(), name='conv2d', dtype=self.dtype_policy)
        elif is_mixed(self):
            # Mixed precision: the power iteration and σ read the float32 variables (no
            # autocast); only the convolution runs in the compute dtype (see `call`).
            self.autocast = False

    def build(self, input_shape):
        if self.spectral_norm:
            k = self.kernel_size
            self.kernel = self.add_weight(
                name='kernel', shape=(k, k, input_shape[-1], self.filters),
                initializer=weight_initializer())
            self._add_u(self.filters)
            if self.use_bias:
                self.bias = self.add_weight(name='bias', shape=(self.filters,),
                                            initializer='zeros')

    def call(self, x):
        x = pad2d(x, self.padding, self.pad_type)
        if not self.spectral_norm:
            return self.conv2d(x)
        kernel, bias = self.effective_kernel(), self.bias if self.use_bias else None
        if is_mixed(self):
            x, kernel = tf.cast(x, self.compute_dtype), tf.cast(kernel, self.compute_dtype)
            bias = tf.cast(bias, self.compute_dtype) if self.use_bias else None
        x = tf.nn.conv2d(x, kernel, strides=self.stride, padding='VALID')
        return tf.nn.bias_add(x, bias) if self.use_bias else x


class FullyConnected(keras.layers.Layer):
    """The original's `fully_connected()`: flatten (row-major H, W, C), then dense.

    [B, ...] -> [B, units]. Variables `dense/kernel` [in, units] and
    `dense/bias` [units] (`tf.layers.dense`). A Keras NHWC flatten matches the
    original's row order, so the full model's 1048576-row kernel loads as is.
    """

    def __init__(self, units, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, use_bias=use_bias,
                                        kernel_initializer=weight_initializer(), name='dense',
                                        dtype=self.dtype_policy)
        self.recorded_calls = None   # [(x, x·W)] while `recording_calls` is on

    def build(self, input_shape):
        pass  # the dense sub-layer builds on first call, inside this layer's scope

    def call(self, x):
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        if self.recorded_calls is None:
            return self.dense(x)
        # The kernel's gradient is left to `factored_kernel_gradient`: here it is a constant.
        kernel = tf.stop_gradient(self.dense.kernel)
        x, kernel = tf.cast(x, self.compute_dtype), tf.cast(kernel, self.compute_dtype)
        product = tf.matmul(x, kernel)
        self.recorded_calls.append((x, product))
        if self.dense.use_bias:
            product = tf.nn.bias_add(product, tf.cast(self.dense.bias, self.compute_dtype))
        return product


@contextlib.contextmanager
def recording_calls(layers):
    """While on, each FullyConnected in `layers` treats its kernel as a constant for the
    gradient and records every call's (input X_c, product X_c·W) for
    `factored_kernel_gradient`."""
    for layer in layers:
        layer.recorded_calls = []
    try:
        yield
    finally:
        for layer in layers:
            layer.recorded_calls = None


def factored_kernel_gradient(calls, product_grads, dtype):
    """∂L/∂W = Σ_c X_cᵀ·∂L/∂(X_c·W) over the calls recorded by `recording_calls`, as one
    matrix product of the stacked inputs and gradients ([in, units], in `dtype`: the
    kernel's, float32 also under mixed precision).

    The same sum a gradient tape forms, but where the tape makes one [in, units] matrix per
    call and adds them at the end, this makes one: for the full model's 1,048,576 × 256 MLP
    kernel, called three times per generator in a G update, 2 GiB less held per generator.
    `calls`: a layer's recorded [(X_c, X_c·W)]; `product_grads`: ∂L/∂(X_c·W) per call, in
    the same order (None: the call did not reach the loss).
    """
    inputs, grads = [], []
    for (x, product), grad in zip(calls, product_grads, strict=True):
        inputs.append(tf.cast(x, dtype))
        grads.append(tf.zeros_like(product, dtype) if grad is None else tf.cast(grad, dtype))
    return tf.matmul(tf.concat(inputs, axis=0), tf.concat(grads, axis=0), transpose_a=True)


class CAMClassifier(SpectralNormalized, keras.layers.Layer):
    """The CAM attention of U-GAT-IT: `fully_connected_with_w` used twice.

    One dense unit (`kernel` [C, 1], `u` [1, 1] with spectral norm, `bias`
    [1]) is shared by the global-average-pooled and the global-max-pooled
    branches. Its channel weights are `kernel[:, 0] + bias` (the scalar bias
    is added to every channel; with SN, the normalised kernel).

    call(x [B,H,W,C]) -> (attended [B,H,W,2C] = concat(x·w_gap, x·w_gmp),
                           cam_logit [B,2] = concat(gap_logit, gmp_logit)).
    """

    def __init__(self, spectral_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.spectral_norm = spectral_norm

    def build(self, input_shape):
        self.kernel = self.add_weight(name='kernel', shape=(input_shape[-1], 1),
                                      initializer=weight_initializer())
        if self.spectral_norm:
            self._add_u(1)
        self.bias = self.add_weight(name='bias', shape=(1,), initializer='zeros')

    def call(self, x):
        kernel = self.effective_kernel()
        channel_weights = kernel[:, 0] + self.bias                  # [C]
        gap_logit = tf.matmul(tf.reduce_mean(x, axis=[1, 2]), kernel) + self.bias  # [B, 1]
        gmp_logit = tf.matmul(tf.reduce_max(x, axis=[1, 2]), kernel) + self.bias   # [B, 1]
        attended = tf.concat([x * channel_weights, x * channel_weights], axis=-1)
        return attended, tf.concat([gap_logit, gmp_logit], axis=-1)


# --- Normalisations ---------------------------------------------------------

def _moments(x, axes):
    """Mean and population variance over `axes`, kept for broadcasting (tf.nn.moments)."""
    return tf.nn.moments(x, axes=axes, keepdims=True)


def _instance_layer_mix(x, rho):
    """rho·IN(x) + (1 − rho)·LN(x), both without affine: [B,H,W,C] -> [B,H,W,C]."""
    ins_mean, ins_var = _moments(x, [1, 2])       # per sample and channel
    ln_mean, ln_var = _moments(x, [1, 2, 3])      # per sample
    x_ins = (x - ins_mean) / tf.sqrt(ins_var + NORM_EPSILON)
    x_ln = (x - ln_mean) / tf.sqrt(ln_var + NORM_EPSILON)
    return rho * x_ins + (1 - rho) * x_ln


class Float32Statistics(keras.layers.Layer):
    """Base of the norms: under a mixed dtype policy they compute in float32.

    The input arrives in the compute dtype (float16/bfloat16) and the output leaves in
    it, but the means, variances, the normalisation and the affine map are float32, from
    the float32 variables (no autocast). Without mixed precision this changes nothing.
    """

    def __init__(self, **kwargs):
        policy = keras.dtype_policies.get(kwargs.get('dtype') or keras.config.dtype_policy())
        if policy.compute_dtype != policy.variable_dtype:
            # A full-precision policy without autocast: the variables read as float32 in
            # any scope (also when tf.recompute_grad re-runs the layer outside the model's),
            # and the input is not cast (`call` upcasts it and casts the result back).
            kwargs.update(dtype=policy.variable_dtype, autocast=False)
        super().__init__(**kwargs)


class InstanceNorm(Float32Statistics):
    """contrib `instance_norm(epsilon=1e-5)`: [B,H,W,C] -> [B,H,W,C].

    Variables `beta` [C] (0) then `gamma` [C] (1). Computed through
    `tf.nn.batch_normalization` as the contrib layer does.
    """

    def build(self, input_shape):
        channels = input_shape[-1]
        self.beta = self.add_weight(name='beta', shape=(channels,), initializer='zeros')
        self.gamma = self.add_weight(name='gamma', shape=(channels,), initializer='ones')

    def call(self, x):
        dtype, x = x.dtype, at_least_float32(x)
        mean, var = _moments(x, [1, 2])
        x = tf.nn.batch_normalization(x, mean, var, self.beta, self.gamma, NORM_EPSILON)
        return tf.cast(x, dtype)


class AdaLIN(Float32Statistics):
    """Adaptive instance-layer norm: (ρ·IN(x) + (1−ρ)·LN(x))·γ + β.

    call(x [B,H,W,C], gamma [B,1,1,C], beta [B,1,1,C]) -> [B,H,W,C]; γ and β
    come from the generator's MLP. Variable `rho` [C] starts at 1.0 and is
    clipped to [0, 1] after each update; with `smoothing` the mix uses
    ρ = clip(rho − 0.1, 0, 1) (0.9 at initialisation), so a stored rho below
    0.1 gets no gradient.
    """

    def __init__(self, smoothing=True, **kwargs):
        super().__init__(**kwargs)
        self.smoothing = smoothing

    def build(self, x_shape, gamma_shape=None, beta_shape=None):
        self.rho = self.add_weight(name='rho', shape=(x_shape[-1],), initializer='ones',
                                   constraint=unit_interval_constraint)

    def call(self, x, gamma, beta):
        dtype = x.dtype
        x, gamma, beta = (at_least_float32(t) for t in (x, gamma, beta))
        rho = self.rho
        if self.smoothing:
            rho = tf.clip_by_value(rho - RHO_SMOOTHING, 0.0, 1.0)
        return tf.cast(_instance_layer_mix(x, rho) * gamma + beta, dtype)


class LIN(Float32Statistics):
    """Layer-instance norm of the decoder: (ρ·IN(x) + (1−ρ)·LN(x))·gamma + beta.

    [B,H,W,C] -> [B,H,W,C]. Variables, in the original's order: `rho` [C]
    (0.0, clipped to [0, 1]), `gamma` [C] (1.0), `beta` [C] (0.0).
    """

    def build(self, input_shape):
        channels = input_shape[-1]
        self.rho = self.add_weight(name='rho', shape=(channels,), initializer='zeros',
                                   constraint=unit_interval_constraint)
        self.gamma = self.add_weight(name='gamma', shape=(channels,), initializer='ones')
        self.beta = self.add_weight(name='beta', shape=(channels,), initializer='zeros')

    def call(self, x):
        dtype, x = x.dtype, at_least_float32(x)
        return tf.cast(_instance_layer_mix(x, self.rho) * self.gamma + self.beta, dtype)


# --- Blocks -----------------------------------------------------------------

class ConvNorm(keras.layers.Layer):
    """Reflect-pad 1, 3x3 conv (scope `conv_0`), then a norm: [B,H,W,C] -> [B,H,W,C].

    `call(x, gamma, beta)` passes AdaLIN's γ, β [B,1,1,C] on to the norm.
    """

    def __init__(self, channels, norm, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.conv = Conv(channels, 3, stride=1, pad=1, pad_type='reflect', use_bias=use_bias,
                         name='conv_0')
        self.norm = norm

    def build(self, x_shape, gamma_shape=None, beta_shape=None):
        pass  # sub-layers build on first call, inside this layer's scope

    def call(self, x, gamma=None, beta=None):
        x = self.conv(x)
        return self.norm(x) if gamma is None else self.norm(x, gamma, beta)


class ResidualBlock(keras.layers.Layer):
    """x + res2(relu(res1(x))), with resK = ConvNorm; no activation after the add.

    [B,H,W,C] -> [B,H,W,C]. `make_norm(name)` builds each sub-block's norm:
    instance norm (`resblock`, norm scope `instance_norm`) or AdaLIN
    (`adaptive_ins_layer_resblock`, scope `instance_layer_norm`, called with
    the γ, β given to `call(x, gamma, beta)`).
    """

    def __init__(self, channels, make_norm, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.res1 = ConvNorm(channels, make_norm(), use_bias, name='res1')
        self.res2 = ConvNorm(channels, make_norm(), use_bias, name='res2')

    def build(self, x_shape, gamma_shape=None, beta_shape=None):
        pass  # sub-layers build on first call, inside this layer's scope

    def call(self, x, gamma=None, beta=None):
        y = tf.nn.relu(self.res1(x, gamma, beta))
        return x + self.res2(y, gamma, beta)


def up_sample(x, scale=2, duplicate=False):
    """Nearest-neighbour up-sampling by pixel duplication: [B,H,W,C] -> [B,sH,sW,C].

    The original's `resize_nearest_neighbor` (no align_corners, no half-pixel
    centres) at an integer factor. With `duplicate`, the same values by a broadcast and
    a reshape: XLA on CPU has no kernel for ResizeNearestNeighborGrad (--xla); the
    gradient then sums each s×s block in another order (float round-off).
    """
    if duplicate:
        shape = tf.shape(x)
        tiled = tf.broadcast_to(x[:, :, None, :, None, :],
                                [shape[0], shape[1], scale, shape[2], scale, shape[3]])
        return tf.reshape(tiled, [shape[0], shape[1] * scale, shape[2] * scale, shape[3]])
    shape = tf.shape(x)
    return tf.raw_ops.ResizeNearestNeighbor(
        images=x, size=tf.stack([shape[1] * scale, shape[2] * scale]),
        align_corners=False, half_pixel_centers=False)


# --- Losses -----------------------------------------------------------------

def l1_loss(x, y):
    """mean |x − y| over all elements."""
    return tf.reduce_mean(tf.abs(x - y))


def bce_loss(logits, label):
    """mean sigmoid cross-entropy of `logits` against the constant `label` (0 or 1)."""
    labels = tf.fill(tf.shape(logits), tf.cast(label, logits.dtype))
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def cam_loss(source, non_source):
    """BCE(source, 1) + BCE(non_source, 0): the generator's CAM classifier loss."""
    return bce_loss(source, 1.0) + bce_loss(non_source, 0.0)


def check_gan_type(gan_type):
    if gan_type not in GAN_TYPES:
        raise ValueError(f'unknown gan_type {gan_type!r}: use one of {", ".join(GAN_TYPES)}')


def _is_wasserstein(gan_type):
    return 'wgan' in gan_type


def discriminator_loss(gan_type, real, fake):
    """Σ over the paired critic outputs of the D term for (real r, fake f).

    lsgan: mean((r−1)²) + mean(f²); gan, dragan: BCE(r,1) + BCE(f,0);
    hinge: mean(relu(1−r)) + mean(relu(1+f)); wgan*: −mean(r) + mean(f).
    `real`, `fake`: lists of logit tensors (e.g. [local, global]).
    """
    check_gan_type(gan_type)
    total = 0.0
    for r, f in zip(real, fake, strict=True):
        if _is_wasserstein(gan_type):
            total += -tf.reduce_mean(r) + tf.reduce_mean(f)
        elif gan_type == 'lsgan':
            total += tf.reduce_mean(tf.math.squared_difference(r, 1.0)) + tf.reduce_mean(tf.square(f))
        elif gan_type in ('gan', 'dragan'):
            total += bce_loss(r, 1.0) + bce_loss(f, 0.0)
        else:  # hinge
            total += tf.reduce_mean(tf.nn.relu(1.0 - r)) + tf.reduce_mean(tf.nn.relu(1.0 + f))
    return total


def generator_loss(gan_type, fake):
    """Σ over the critic outputs of the G term for fake f.

    lsgan: mean((f−1)²); gan, dragan: BCE(f,1); hinge and wgan*: −mean(f).
    """
    check_gan_type(gan_type)
    total = 0.0
    for f in fake:
        if gan_type == 'lsgan':
            total += tf.reduce_mean(tf.math.squared_difference(f, 1.0))
        elif gan_type in ('gan', 'dragan'):
            total += bce_loss(f, 1.0)
        else:  # hinge, wgan*
            total += -tf.reduce_mean(f)
    return total


def has_gradient_penalty(gan_type):
    """True for the types whose D loss adds a gradient penalty (wgan-gp, wgan-lp, dragan).

    The original also calls D on interpolates for plain `wgan`, but adds nothing.
    """
    return gan_type in ('wgan-gp', 'wgan-lp', 'dragan')


def gradient_penalty_inputs(gan_type, real, fake, alpha, eps=None):
    """The interpolates x̂ = real + α·(fake − real) at which the penalty is taken.

    For dragan the fake is first replaced by real + 0.5·std(real)·eps, with the
    std over the whole batch tensor. `alpha`: [B,1,1,1] in [0, 1); `eps`: the
    image-shaped U[0, 1) noise (dragan only).
    """
    if gan_type == 'dragan':
        _, variance = tf.nn.moments(real, axes=list(range(real.shape.rank)))
        fake = real + DRAGAN_NOISE_SCALE * tf.sqrt(variance) * eps
    return real + alpha * (fake - real)


def gradient_penalty(gan_type, critic, x_hat, weight):
    """The penalties on ‖∂ΣD_k(x̂)/∂x̂‖₂ per sample, one per critic output D_k.

    `critic(x̂)` returns a list of output tensors (each [B, ...]). For each,
    the gradient norm n is taken per sample over all pixels: wgan-lp gives
    weight·mean(max(0, n−1)²); wgan-gp and dragan give weight·mean((n−1)²).
    Returns the list of penalties (scalars), in the critic's output order.
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_hat)
        outputs = critic(x_hat)
    penalties = []
    for out in outputs:
        grad = tape.gradient(out, x_hat)
        norm = tf.norm(tf.reshape(grad, [tf.shape(grad)[0], -1]), axis=1)
        if gan_type == 'wgan-lp':
            excess = tf.maximum(0.0, norm - 1.0)
        else:
            excess = norm - 1.0
        penalties.append(weight * tf.reduce_mean(tf.square(excess)))
    del tape
    return penalties


def l2_regularization(kernels):
    """1e-4 · Σ ‖w‖²/2 over the given kernels (the contrib l2_regularizer sum)."""
    if not kernels:
        return tf.constant(0.0)
    return tf.add_n([WEIGHT_DECAY * tf.nn.l2_loss(w) for w in kernels])


# --- Optimizer ------------------------------------------------------------------------------

class Adam(keras.optimizers.Adam):
    """Keras' Adam with each variable's update as TensorFlow's fused `ResourceApplyAdam`.

    The same arithmetic as `keras.optimizers.Adam` and as the original's
    `tf.train.AdamOptimizer`, whose kernel this is: m ← m + (g − m)(1 − β1),
    v ← v + (g² − v)(1 − β2), w ← w − lr·√(1 − β2ᵗ)/(1 − β1ᵗ) · m/(√v + ε). Keras
    writes it as seven element-wise ops, each of which allocates a variable-sized
    temporary; the kernel updates in place in one pass over the three tensors,
    which for the critics' large kernels (a 2048×1024×4×4 one at ch 64) saves
    memory and time. Slots, step count, names and constraints are Keras' own.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        handle = lambda var: (var.value if isinstance(var, keras.Variable) else var).handle
        tf.raw_ops.ResourceApplyAdam(
            var=handle(variable), m=handle(self._momentums[index]),
            v=handle(self._velocities[index]),
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


# --- Metrics: KID and FID between two sets of feature vectors ---------------------------
#
# Both take float [N, d] feature sets (here the 2048-d InceptionV3 pool features of
# images), compute in float64 and return Python floats. Neither knows about images.

# KID's block size. TF-GAN's default, 1024, leaves a 100-image test set (selfie2anime's)
# in one block, which gives no standard deviation; 10 is what the U-GAT-IT authors'
# metrics code passes (taki0112/GAN_Metrics-Tensorflow, `max_block_size=10`).
KID_MAX_BLOCK_SIZE = 10
KID_DEGREE = 3               # k(x, y) = (xᵀy / d + KID_COEF)^KID_DEGREE, Bińkowski et al.'s kernel
KID_COEF = 1.0
MIN_PER_BLOCK = 2            # the unbiased within-set means divide by m(m − 1)


def polynomial_kernel(x, y):
    """KID's cubic kernel: x [m, d], y [n, d] → [m, n] of (xᵀy / d + 1)³."""
    dim = tf.cast(tf.shape(x)[1], x.dtype)
    return (tf.matmul(x, y, transpose_b=True) / dim + KID_COEF) ** KID_DEGREE


def unbiased_mmd2(x, y):
    """The unbiased estimate of MMD² with `polynomial_kernel`: x [m, d], y [n, d], m, n ≥ 2.

    mean of k(xᵢ, xⱼ) over i ≠ j + mean of k(yᵢ, yⱼ) over i ≠ j − 2 · mean of k(xᵢ, yⱼ):
    the within-set means leave out the diagonal, which is what removes the bias.
    """
    def off_diagonal_mean(k):
        size = tf.cast(tf.shape(k)[0], k.dtype)
        return (tf.reduce_sum(k) - tf.linalg.trace(k)) / (size * (size - 1))

    return (off_diagonal_mean(polynomial_kernel(x, x)) + off_diagonal_mean(polynomial_kernel(y, y))
            - 2 * tf.reduce_mean(polynomial_kernel(x, y)))


# One graph for every block shape (eagerly, the per-op overhead of ~10 ms a block dominates).
_FEATURES_SPEC = tf.TensorSpec([None, None], tf.float64)
_unbiased_mmd2_graph = tf.function(unbiased_mmd2, input_signature=[_FEATURES_SPEC] * 2,
                                   autograph=False)


def block_sizes(n, n_blocks):
    """`n` split into `n_blocks` sizes that differ by at most one, the larger ones last
    (TF-GAN's split): block_sizes(23, 3) = [7, 8, 8]."""
    base, extra = divmod(n, n_blocks)
    return [base] * (n_blocks - extra) + [base + 1] * extra


def _feature_sets(real, fake):
    """Both sets as float64 tensors [N, d]; ValueError unless they are 2-D with one d and
    at least MIN_PER_BLOCK rows each."""
    real, fake = (tf.convert_to_tensor(a, tf.float64) for a in (real, fake))
    if real.shape.rank != 2 or fake.shape.rank != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'feature sets must be [N, d] with one d, got {real.shape} and {fake.shape}')
    if min(real.shape[0], fake.shape[0]) < MIN_PER_BLOCK:
        raise ValueError(f'each feature set needs at least {MIN_PER_BLOCK} rows, got '
                         f'{real.shape[0]} and {fake.shape[0]}')
    return real, fake


def kernel_inception_distance(real, fake, max_block_size=KID_MAX_BLOCK_SIZE):
    """KID as TF-GAN's `kernel_classifier_distance_and_std` computes it: (mean, std).

    real [N_r, d], fake [N_f, d]. Both sets are cut, in their order, into
    n = ceil(max(N_r, N_f) / max_block_size) contiguous blocks (`block_sizes`); block b
    of one set is paired with block b of the other and gives one `unbiased_mmd2`.
    mean: the average of the n block estimates; std: their standard error,
    sqrt(Σ(e_b − mean)² / (n − 1) / n); NaN with a single block. The split assumes
    both sets are in random order: shuffle sorted data first. Departure from TF-GAN: n is
    capped at min(N_r, N_f) // 2 so that every block holds 2 rows of each set (TF-GAN
    divides by zero there); with the default block size this matters only when one set
    is more than 5 times the other. The paper reports 100 · mean ± 100 · std.
    """
    real, fake = _feature_sets(real, fake)
    n_real, n_fake = real.shape[0], fake.shape[0]
    n_blocks = min(-(-max(n_real, n_fake) // max_block_size),
                   min(n_real, n_fake) // MIN_PER_BLOCK)
    estimates = np.array([
        float(_unbiased_mmd2_graph(r, f)) for r, f in zip(tf.split(real, block_sizes(n_real, n_blocks)),
                                                    tf.split(fake, block_sizes(n_fake, n_blocks)))])
    mean = float(np.mean(estimates))
    if n_blocks == 1:
        return mean, float('nan')
    return mean, float(np.sqrt(np.var(estimates, ddof=1) / n_blocks))


def frechet_distance(real, fake):
    """FID: ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½) of Gaussians fitted to real [N_r, d]
    and fake [N_f, d], with the sample covariances (1 / (N − 1), as TF-GAN and Heusel et al.).

    Tr (Σ_r Σ_f)^½ without a d × d matrix square root: with A, B the centred sets,
    Σ_r Σ_f = AᵀA BᵀB / c (c = (N_r − 1)(N_f − 1)), whose nonzero eigenvalues are the
    squared singular values of A Bᵀ; with the QR factors A = Q_a R_a and B = Q_b R_b
    (orthonormal Q) those are the singular values of R_a R_bᵀ, at most min(N, d) square.
    So the trace is ‖R_a R_bᵀ‖_* / √c, exact, and cheap when N ≪ d (test sets of hundreds
    of images against d = 2048).
    """
    real, fake = _feature_sets(real, fake)
    mean_real, mean_fake = tf.reduce_mean(real, 0), tf.reduce_mean(fake, 0)
    a, b = real - mean_real, fake - mean_fake
    dof_real = tf.cast(tf.shape(a)[0] - 1, tf.float64)
    dof_fake = tf.cast(tf.shape(b)[0] - 1, tf.float64)
    traces = tf.reduce_sum(tf.square(a)) / dof_real + tf.reduce_sum(tf.square(b)) / dof_fake
    r_real, r_fake = tf.linalg.qr(a).r, tf.linalg.qr(b).r
    singular = tf.linalg.svd(tf.matmul(r_real, r_fake, transpose_b=True), compute_uv=False)
    trace_sqrt = tf.reduce_sum(singular) / tf.sqrt(dof_real * dof_fake)
    return float(tf.reduce_sum(tf.square(mean_real - mean_fake)) + traces - 2 * trace_sqrt)
