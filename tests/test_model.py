"""Tests of UGATIT.py at tiny shapes: networks, variables, Config, checkpoint loading.

The expected variable list of any configuration is written out here from the
spec's Appendix A (`expected_variables`), checked against the spec's own table
and parameter counts, and then against the built models. Models are built once
per configuration (`build`, module-scoped, lazy); building dominates the run time.
Checkpoints are written in the original's TF1 name-based format (a graph-mode
`tf.compat.v1.train.Saver`, or `SaveV2` for synthetic variable sets).
"""
import dataclasses
import math
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import ops
import UGATIT as ugatit
import utils
from UGATIT import Config
from utils import UserError

SPEC = os.environ.get('UGATIT_SPEC', '/work/shared/spec/original-spec.md')
INIT_STDDEV = 0.02

# The models of this file, one build each. Keys name the configuration.
CONFIGS = {
    # the spec's variable counts apply (n_dis 6 needs img_size >= 96)
    'spec96': Config(img_size=96, ch=2, n_res=4, n_dis=6),
    'small': Config(img_size=32, ch=3, n_res=1, n_dis=4),
    # the smallest valid size; light, one channel, no spectral norm, no smoothing
    'light8': Config(img_size=8, ch=2, n_res=2, n_dis=2, light=True, img_ch=1, sn=False,
                     smoothing=False),
}
SHAPE_MODELS = sorted(CONFIGS)
# The checkpoint source and the model that tests load into (same config, other seed).
# Only `spec96` must keep its initial values; nothing loads into the others but SCRATCH.
SOURCE, SCRATCH = 'small', 'small_seed2'


@pytest.fixture(scope='module')
def build():
    """build(key) -> the UGATIT model of CONFIGS[key] (seed 1), or of `small` with seed 2."""
    cache = {}

    def get(key):
        if key not in cache:
            base, seed = (SOURCE, 2) if key == SCRATCH else (key, 1)
            keras.utils.set_random_seed(seed)
            cache[key] = ugatit.UGATIT(CONFIGS[base])
        return cache[key]
    return get


def config_of(key):
    return CONFIGS[SOURCE if key == SCRATCH else key]


# --- The spec's variable list, for any configuration ----------------------------------

def expected_variables(c):
    """{name: (shape, trainable)} of all four networks, from the spec's Appendix A pattern.

    Our departures, both documented: the MLP width is 4·ch (the spec: ch·n_res, equal at
    n_res 4), and the stem/G_logit use img_ch (the original hard-codes 3 at G_logit).
    """
    out = {}
    conv = lambda p, k, cin, cout: out.update({
        f'{p}/conv2d/kernel': ((k, k, cin, cout), True), f'{p}/conv2d/bias': ((cout,), True)})
    ch, w = c.ch, 4 * c.ch
    for g in ('generator_B', 'generator_A'):
        conv(f'{g}/conv', 7, c.img_ch, ch)
        out[f'{g}/ins_norm/beta'] = out[f'{g}/ins_norm/gamma'] = ((ch,), True)
        for i in range(2):
            conv(f'{g}/conv_{i}', 3, ch * 2 ** i, ch * 2 ** (i + 1))
            out[f'{g}/ins_norm_{i}/beta'] = out[f'{g}/ins_norm_{i}/gamma'] = ((ch * 2 ** (i + 1),), True)
        for k in range(c.n_res):
            for r in ('res1', 'res2'):
                conv(f'{g}/resblock_{k}/{r}/conv_0', 3, w, w)
                out[f'{g}/resblock_{k}/{r}/instance_norm/beta'] = ((w,), True)
                out[f'{g}/resblock_{k}/{r}/instance_norm/gamma'] = ((w,), True)
        out[f'{g}/CAM_logit/kernel'] = ((w, 1), True)
        out[f'{g}/CAM_logit/bias'] = ((1,), True)
        conv(f'{g}/conv_1x1', 1, 2 * w, w)
        rows = w if c.light else (c.img_size // 4) ** 2 * w
        for layer, fan_in in (('linear_0', rows), ('linear_1', w), ('gamma', w), ('beta', w)):
            out[f'{g}/MLP/{layer}/dense/kernel'] = ((fan_in, w), True)
            out[f'{g}/MLP/{layer}/dense/bias'] = ((w,), True)
        for k in range(c.n_res):
            for r in ('res1', 'res2'):
                conv(f'{g}/adaptive_resblock{k}/{r}/conv_0', 3, w, w)
                out[f'{g}/adaptive_resblock{k}/{r}/instance_layer_norm/rho'] = ((w,), True)
        for i in range(2):
            cin, cout = w // 2 ** i, w // 2 ** (i + 1)
            conv(f'{g}/up_conv_{i}', 3, cin, cout)
            for p in ('rho', 'gamma', 'beta'):
                out[f'{g}/layer_ins_norm_{i}/{p}'] = ((cout,), True)
        conv(f'{g}/G_logit', 7, ch, c.img_ch)

    def sn_conv(p, k, cin, cout):
        if not c.sn:
            return conv(p, k, cin, cout)
        out[f'{p}/kernel'] = ((k, k, cin, cout), True)
        out[f'{p}/u'] = ((1, cout), False)
        out[f'{p}/bias'] = ((cout,), True)

    for d in ('discriminator_A', 'discriminator_B'):
        for part, n in (('local', max(1, c.n_dis - 3)), ('global', max(1, c.n_dis - 1))):
            p, cin = f'{d}/{part}', c.img_ch
            for i in range(n):
                sn_conv(f'{p}/conv_{i}', 4, cin, ch * 2 ** i)
                cin = ch * 2 ** i
            top = ch * 2 ** n
            sn_conv(f'{p}/conv_last', 4, cin, top)
            out[f'{p}/CAM_logit/kernel'] = ((top, 1), True)
            if c.sn:
                out[f'{p}/CAM_logit/u'] = ((1, 1), False)
            out[f'{p}/CAM_logit/bias'] = ((1,), True)
            conv(f'{p}/conv_1x1', 1, 2 * top, top)
            sn_conv(f'{p}/D_logit', 4, top, 1)
    return out


def actual_variables(model):
    return {v.path: (tuple(v.shape), v.trainable) for v in model.variables_by_name().values()}


def size(shape):
    return math.prod(shape)


def count(variables, prefix, trainable=None):
    return sum(size(s) for n, (s, t) in variables.items()
               if n.startswith(prefix) and (trainable is None or t == trainable))


def test_expected_variables_match_spec_appendix_a():
    """Our pattern at the defaults lists exactly the spec's Appendix A names, shapes and flags."""
    if not os.path.exists(SPEC):
        pytest.skip(f'spec not found at {SPEC} (set UGATIT_SPEC)')
    text = open(SPEC, encoding='utf-8').read()
    appendix = text[text.index('## Appendix A'):]
    gen_part, disc_part = appendix.split('### A.2')
    row = re.compile(r'^\| `([^`]+)` \| ([^|]+?) \| (yes|no)[^|]*\|$', re.M)
    full, light = {}, {}
    for part, prefixes in ((gen_part, ('generator_B', 'generator_A')),
                           (disc_part, ('discriminator_A', 'discriminator_B'))):
        rows = row.findall(part)
        assert rows, 'no table rows parsed'
        for name, shape, trainable in rows:
            m = re.match(r'^([\dx]+)(?: \(light: ([\dx]+)\))?$', shape.strip())
            assert m, shape
            for p in prefixes:
                full[f'{p}/{name}'] = (tuple(map(int, m.group(1).split('x'))), trainable == 'yes')
                light_shape = m.group(2) or m.group(1)
                light[f'{p}/{name}'] = (tuple(map(int, light_shape.split('x'))), trainable == 'yes')
    assert len(full) == 276
    assert expected_variables(Config()) == full
    assert expected_variables(Config(light=True)) == light


@pytest.mark.parametrize('cfg, gen, glob_d, glob_u, loc_d, loc_u, total', [
    (Config(), 278_970_308, 53_128_130, 4_034, 3_290_050, 962, 670_776_976),
    (Config(light=True), 10_600_388, 53_128_130, 4_034, 3_290_050, 962, 134_037_136),
    (Config(img_size=96, ch=8), 758_012, 834_938, 506, 52_858, 122, 3_291_616),
    (Config(img_size=96, ch=8, light=True), 169_212, 834_938, 506, 52_858, 122, 2_114_016),
], ids=['default_full', 'default_light', 'full_96_ch8', 'light_96_ch8'])
def test_expected_variables_match_spec_parameter_counts(cfg, gen, glob_d, glob_u, loc_d, loc_u, total):
    """Our pattern reproduces every parameter count of the spec's §17 table."""
    v = expected_variables(cfg)
    for g in ('generator_A/', 'generator_B/'):
        assert count(v, g) == gen
    for d in ('discriminator_A/', 'discriminator_B/'):
        assert count(v, d + 'global/', True) == glob_d
        assert count(v, d + 'global/', False) == glob_u
        assert count(v, d + 'local/', True) == loc_d
        assert count(v, d + 'local/', False) == loc_u
    assert count(v, '', True) == total


# --- 1. Shapes --------------------------------------------------------------------

def random_images(c, batch, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(
        -1, 1, [batch, c.img_size, c.img_size, c.img_ch]).astype('float32'))


@pytest.mark.parametrize('key', SHAPE_MODELS)
def test_generator_shapes_and_batch_independence(build, key):
    """G returns image [B,S,S,img_ch] in [-1,1], cam_logit [B,2], heatmap [B,S/4,S/4], for B = 3 and 1 alike."""
    model, c = build(key), CONFIGS[key]
    s, q = c.img_size, c.img_size // 4
    x = random_images(c, 3)
    for gen in model.generators:
        image, cam_logit, heatmap = gen(x)
        assert image.shape == (3, s, s, c.img_ch)
        assert cam_logit.shape == (3, 2)
        assert heatmap.shape == (3, q, q)
        assert np.all(np.abs(image.numpy()) <= 1.0)
        assert np.std(image.numpy()) > 0
    # No batch size is baked into the graph, and samples do not interact.
    batch = model.gen_a2b(x)
    for i in range(3):
        one = model.gen_a2b(x[i:i + 1])
        assert one[0].shape == (1, s, s, c.img_ch) and one[2].shape == (1, q, q)
        for got, want in zip(one, batch):
            np.testing.assert_allclose(got.numpy()[0], want.numpy()[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('key', SHAPE_MODELS)
def test_generator_forward_keys_and_shapes(build, key):
    """`forward` returns every named activation with the spec's shapes (MLP width 4·ch)."""
    model, c = build(key), CONFIGS[key]
    s, ch, w, b = c.img_size, c.ch, 4 * c.ch, 2
    out = model.gen_b2a.forward(random_images(c, b))
    want = {
        'stem': (b, s, s, ch), 'down0': (b, s // 2, s // 2, 2 * ch), 'down1': (b, s // 4, s // 4, w),
        'cam_logit': (b, 2), 'cam_gap_logit': (b, 1), 'cam_gmp_logit': (b, 1),
        'cam_features': (b, s // 4, s // 4, w), 'heatmap': (b, s // 4, s // 4),
        'gamma': (b, 1, 1, w), 'beta': (b, 1, 1, w),
        'up0': (b, s // 2, s // 2, 2 * ch), 'up1': (b, s, s, ch), 'fake': (b, s, s, c.img_ch),
    }
    for k in range(c.n_res):
        want[f'res{k}'] = want[f'adares{k}'] = (b, s // 4, s // 4, w)
    assert set(out) == set(want)
    assert {k: tuple(v.shape) for k, v in out.items()} == want
    np.testing.assert_allclose(out['heatmap'].numpy(), out['cam_features'].numpy().sum(-1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('key', SHAPE_MODELS)
def test_discriminator_shapes(build, key):
    """D logits: local side S/2^max(1,n_dis−3), global S/2^max(1,n_dis−1); CAM logits [B,2]; any batch."""
    model, c = build(key), CONFIGS[key]
    local_side = c.img_size // 2 ** max(1, c.n_dis - 3)
    global_side = c.img_size // 2 ** max(1, c.n_dis - 1)
    for batch in (1, 3):
        x = random_images(c, batch, seed=batch)
        for disc in model.discriminators:
            (local, glob), (local_cam, global_cam) = disc(x)
            assert local.shape == (batch, local_side, local_side, 1)
            assert glob.shape == (batch, global_side, global_side, 1)
            assert local_cam.shape == global_cam.shape == (batch, 2)
            assert np.all(np.isfinite(glob.numpy()))


def test_discriminator_forward_keys(build):
    """Each critic's `forward` names features, cam_features, cam_logit, heatmap and logit."""
    model, c = build('small'), CONFIGS['small']
    out = model.disc_a.critics['global'].forward(random_images(c, 2))
    assert set(out) == {'features', 'cam_features', 'cam_logit', 'heatmap', 'logit'}
    side, top = c.img_size // 2 ** (c.n_dis - 1), c.ch * 2 ** (c.n_dis - 1)
    assert out['features'].shape == out['cam_features'].shape == (2, side, side, top)
    assert out['heatmap'].shape == (2, side, side)
    assert out['logit'].shape == (2, side, side, 1)


# --- 2. Variables --------------------------------------------------------------------

@pytest.mark.parametrize('key', SHAPE_MODELS)
def test_variables_follow_the_spec_pattern(build, key):
    """Every model's variable names, shapes and trainable flags are exactly the Appendix A pattern."""
    model = build(key)
    got, want = actual_variables(model), expected_variables(CONFIGS[key])
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {n: got[n] for n in want} == want
    # Keras paths are unique: no two variables share a name (a name-based load needs that).
    assert len(got) == sum(len(net.weights) for net in model.networks)


def test_spec_variable_counts(build):
    """At n_res 4 / n_dis 6: 92 per generator, 20 (6 u) per local D, 26 (8 u) per global D."""
    v = actual_variables(build('spec96'))
    n = lambda prefix, trainable=None: sum(1 for k, (_, t) in v.items() if k.startswith(prefix)
                                            and (trainable is None or t == trainable))
    for g in ('generator_A/', 'generator_B/'):
        assert n(g) == 92 and n(g, False) == 0
    for d in ('discriminator_A/', 'discriminator_B/'):
        assert n(d + 'local/') == 20 and n(d + 'local/', False) == 6
        assert n(d + 'global/') == 26 and n(d + 'global/', False) == 8
    assert len(v) == 276 and n('', True) == 248


def test_only_u_is_non_trainable(build):
    """`u` variables, and only they, are non-trainable (and are the networks' non_trainable_weights)."""
    model = build('spec96')
    for net in model.networks:
        assert all(v.path.endswith('/u') for v in net.non_trainable_weights)
        assert not any(v.path.endswith('/u') for v in net.trainable_weights)
    assert sum(len(net.non_trainable_weights) for net in model.discriminators) == 2 * (6 + 8)


def test_sn_false_variable_names(build):
    """--sn False turns each SN conv X/{kernel,u,bias} into X/conv2d/{kernel,bias}; CAM layers lose u."""
    c = CONFIGS['spec96']
    sn_on = build('spec96').disc_a
    keras.utils.set_random_seed(3)
    sn_off = ugatit.MultiScaleDiscriminator(c.ch, c.n_dis, sn=False, name='discriminator_A')
    sn_off(tf.zeros([1, c.img_size, c.img_size, c.img_ch]))
    on = {v.path: tuple(v.shape) for v in sn_on.weights}
    sn_scopes = {n[:-len('/u')] for n in on if n.endswith('/u')}
    assert len(sn_scopes) == 14
    want = {}
    for name, shape in on.items():
        scope, leaf = name.rsplit('/', 1)
        if leaf == 'u':
            continue
        if scope in sn_scopes and not scope.endswith('CAM_logit'):
            name = f'{scope}/conv2d/{leaf}'
        want[name] = shape
    assert {v.path: tuple(v.shape) for v in sn_off.weights} == want
    assert sn_off.non_trainable_weights == []


def test_full_and_light_differ_only_in_mlp_linear_0(build):
    """Full and light generators differ only in MLP/linear_0/dense/kernel: [(S/4)²·4c, 4c] vs [4c, 4c]."""
    c = CONFIGS['spec96']
    full = build('spec96').gen_a2b
    keras.utils.set_random_seed(4)
    light = ugatit.Generator(c.ch, c.n_res, light=True, out_ch=c.img_ch, name='generator_B')
    light(tf.zeros([1, c.img_size, c.img_size, c.img_ch]))
    f = {v.path: tuple(v.shape) for v in full.weights}
    l = {v.path: tuple(v.shape) for v in light.weights}
    assert set(f) == set(l)
    differ = sorted(n for n in f if f[n] != l[n])
    key = 'generator_B/MLP/linear_0/dense/kernel'
    assert differ == [key]
    w = 4 * c.ch
    assert f[key] == ((c.img_size // 4) ** 2 * w, w) and l[key] == (w, w)


def test_initial_values(build):
    """Kernels ~ N(0, 0.02²), u ~ N(0, 1), biases 0, AdaLIN rho 1, LIN rho 0/gamma 1/beta 0, IN gamma 1/beta 0."""
    model = build('spec96')  # no test writes to it
    constant = [  # (pattern, value), first match wins
        (r'/bias$', 0.0),
        (r'/instance_layer_norm/rho$', 1.0),
        (r'/layer_ins_norm_\d/rho$', 0.0),
        (r'/(ins_norm(_\d)?|instance_norm|layer_ins_norm_\d)/gamma$', 1.0),
        (r'/(ins_norm(_\d)?|instance_norm|layer_ins_norm_\d)/beta$', 0.0),
    ]
    kernels, us = [], []
    for name, var in model.variables_by_name().items():
        value = var.numpy()
        if name.endswith('/kernel'):
            kernels.append((name, value))
        elif name.endswith('/u'):
            us.append(value.ravel())
        else:
            want = next((v for p, v in constant if re.search(p, name)), None)
            assert want is not None, f'unclassified variable {name}'
            np.testing.assert_array_equal(value, np.full_like(value, want), err_msg=name)
    checked = 0
    for name, value in kernels:
        n = value.size
        if n < 2000:
            continue
        checked += 1
        # The sample std of n normals has relative s.e. 1/sqrt(2n): allow 6 s.e. (a
        # truncated normal, std 0.88·σ, fails the largest kernels).
        assert abs(value.std() / INIT_STDDEV - 1) < 6 / math.sqrt(2 * n), name
        assert abs(value.mean()) < 6 * INIT_STDDEV / math.sqrt(n), name
    assert checked >= 4
    mlp = dict(kernels)['generator_B/MLP/linear_0/dense/kernel']
    assert np.abs(mlp).max() > 3.5 * INIT_STDDEV  # untruncated tails
    u = np.concatenate(us)
    assert u.size == 2 * 160
    assert abs(u.std() - 1) < 0.25 and abs(u.mean()) < 0.25


# --- 3. n_res other than 4, img_ch 1 --------------------------------------------------------

@pytest.mark.parametrize('key', ['small', 'light8'])
def test_n_res_other_than_4_uses_width_4ch(build, key):
    """n_res 1 and 2 build, and the MLP and AdaLIN use the bottleneck width 4·ch."""
    model, c = build(key), CONFIGS[key]
    assert c.n_res != 4
    assert len(model.gen_a2b.decoder_blocks) == len(model.gen_a2b.encoder_blocks) == c.n_res
    v = model.variables_by_name()
    assert tuple(v['generator_A/MLP/gamma/dense/kernel'].shape) == (4 * c.ch, 4 * c.ch)
    assert tuple(v[f'generator_A/adaptive_resblock{c.n_res - 1}/res2/instance_layer_norm/rho'].shape) == (4 * c.ch,)
    fake, _, _ = model.gen_b2a(random_images(c, 1))
    assert np.all(np.isfinite(fake.numpy()))


def test_img_ch_1_end_to_end(build):
    """With img_ch 1 the generators output one channel and every loss of both sides is finite."""
    model, c = build('light8'), CONFIGS['light8']
    assert c.img_ch == 1
    real_a, real_b = random_images(c, 2, seed=1), random_images(c, 2, seed=2)
    g_losses, fakes = model.generator_losses(real_a, real_b)
    assert fakes['fake_A'].shape == fakes['fake_B'].shape == (2, c.img_size, c.img_size, 1)
    d_losses = model.discriminator_losses(real_a, real_b)
    for name, value in {**g_losses, **d_losses}.items():
        assert value.shape == () and np.isfinite(value.numpy()), name
    assert g_losses['Generator_loss'].numpy() > 0 and d_losses['Discriminator_loss'].numpy() > 0


# --- 4. Config.validate ---------------------------------------------------------------------

def user_error(config):
    with pytest.raises(UserError) as info:
        config.validate()
    message = str(info.value)
    assert message and '\n' not in message
    return message


@pytest.mark.parametrize('img_size, n_dis', [
    (30, 2), (98, 2), (258, 6),
    (6, 2),     # rounding down would suggest 4, too small for any n_dis
    (94, 6),    # rounding down would suggest 92, too small for n_dis 6
])
def test_validate_img_size_not_divisible_by_4(img_size, n_dis):
    """img_size % 4 != 0 names --img_size and suggests a multiple of 4 that validates."""
    message = user_error(Config(img_size=img_size, n_dis=n_dis))
    assert '--img_size' in message and str(img_size) in message and '4' in message
    suggestion = [int(s) for s in re.findall(r'--img_size (\d+)', message)]
    assert suggestion and suggestion[-1] % 4 == 0
    Config(img_size=suggestion[-1], n_dis=n_dis).validate()


@pytest.mark.parametrize('img_size, n_dis, fix_n_dis, fix_img_size', [
    (64, 6, 5, 96), (32, 6, 4, 96), (256, 8, 7, 384), (12, 4, 3, 24), (8, 3, 2, 12), (4, 1, None, 8),
])
def test_validate_img_size_too_small_for_n_dis(img_size, n_dis, fix_n_dis, fix_img_size):
    """Too small for n_dis: names both flags, suggests the largest n_dis and the smallest img_size that work."""
    message = user_error(Config(img_size=img_size, n_dis=n_dis))
    assert f'--img_size {img_size}' in message and f'--n_dis {n_dis}' in message
    assert f'--img_size {fix_img_size}' in message
    if fix_n_dis is None:
        assert len(re.findall(r'--n_dis', message)) == 1
    else:
        assert f'--n_dis {fix_n_dis}' in message
        Config(img_size=img_size, n_dis=fix_n_dis).validate()
        with pytest.raises(UserError):
            Config(img_size=img_size, n_dis=fix_n_dis + 1).validate()
    # The suggested sizes are the smallest valid ones.
    Config(img_size=fix_img_size, n_dis=n_dis).validate()
    with pytest.raises(UserError):
        Config(img_size=fix_img_size - 4, n_dis=n_dis).validate()


@pytest.mark.parametrize('name', ['ch', 'n_res', 'n_dis', 'img_size', 'img_ch', 'batch_size'])
@pytest.mark.parametrize('value', [0, -1])
def test_validate_rejects_non_positive(name, value):
    """Zero or negative sizes raise UserError naming the flag and the value."""
    message = user_error(dataclasses.replace(Config(), **{name: value}))
    assert f'--{name}' in message and str(value) in message


def test_validate_rejects_unknown_gan_type():
    """An unknown gan_type names --gan_type and lists the valid ones."""
    message = user_error(Config(gan_type='wgan_gp'))
    assert '--gan_type' in message and 'wgan_gp' in message
    for name in ops.GAN_TYPES:
        assert name in message


@pytest.mark.parametrize('img_size, n_dis', [(96, 6), (64, 5), (32, 4), (8, 2), (8, 1), (12, 3), (256, 6)])
def test_validate_accepts_edge_cases(img_size, n_dis):
    """The smallest valid sizes for each n_dis, and the defaults, pass."""
    assert Config(img_size=img_size, n_dis=n_dis).validate() is None


def test_constructor_validates():
    """UGATIT(config) refuses an invalid config before building anything."""
    with pytest.raises(UserError, match='--n_dis'):
        ugatit.UGATIT(Config(img_size=64, n_dis=6))


# --- 5. model_dir ---------------------------------------------------------------------------

@pytest.mark.parametrize('changes, want', [
    ({}, 'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing'),
    ({'light': True}, 'UGATIT_light_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing'),
    ({'sn': False}, 'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_smoothing'),
    ({'smoothing': False}, 'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn'),
    ({'light': True, 'sn': False, 'smoothing': False},
     'UGATIT_light_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000'),
    ({'dataset': 'horse2zebra', 'gan_type': 'wgan-gp', 'n_res': 6, 'n_dis': 5, 'n_critic': 5,
      'adv_weight': 2, 'cycle_weight': 3, 'identity_weight': 4, 'cam_weight': 500},
     'UGATIT_horse2zebra_wgan-gp_6resblock_5dis_5_2_3_4_500_sn_smoothing'),
    # img_size, ch, batch_size and lr are not part of the name (as in the original)
    ({'img_size': 128, 'ch': 32, 'batch_size': 4, 'lr': 0.001},
     'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing'),
])
def test_model_dir_matches_original(changes, want):
    """model_dir is the original's run-folder string."""
    assert dataclasses.replace(Config(), **changes).model_dir == want


# --- 6. Checkpoints -------------------------------------------------------------------------

def save_tf1(folder, arrays, counter, model_name='UGATIT'):
    """Writes `arrays` as the original does: a graph-mode tf.compat.v1 Saver; returns the prefix."""
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.Variable(value, name=name) for name, value in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, os.path.join(str(folder), f'{model_name}.model'),
                              global_step=counter)


def save_v2(folder, arrays, counter=1, state=True):
    """Writes a name-based V2 bundle (what Saver writes) with SaveV2, plus the state file."""
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(str(folder), f'UGATIT.model-{counter}')
    names = sorted(arrays)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                      tensors=[tf.constant(arrays[n]) for n in names])
    if state:
        write_state(folder, prefix)
    return prefix


def write_state(folder, path):
    with open(os.path.join(str(folder), 'checkpoint'), 'w') as f:
        f.write(f'model_checkpoint_path: "{path}"\nall_model_checkpoint_paths: "{path}"\n')


def values(model, networks=None):
    return {n: v.numpy() for n, v in model.variables_by_name(networks).items()}


def synthetic_arrays(model, config):
    """Arrays for `config`'s variables: the model's own value where name and shape agree, else zeros.

    So a load that wrongly succeeds leaves the model unchanged for the other tests.
    """
    own = values(model)
    return {n: own[n] if n in own and own[n].shape == s else np.zeros(s, 'float32')
            for n, (s, _) in expected_variables(config).items()}


def assert_same(a, b):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_checkpoint_round_trip(build, tmp_path):
    """A TF1 Saver checkpoint of one model fills another (other seed) exactly: same variables, same outputs."""
    source, target = build(SOURCE), build(SCRATCH)
    c = config_of(SOURCE)
    prefix = save_tf1(tmp_path, values(source), counter=1000)
    for v in target.variables_by_name().values():  # make sure every variable must change
        v.assign(v + 0.5)
    x = random_images(c, 2)
    assert not np.allclose(target.gen_a2b(x)[0].numpy(), source.gen_a2b(x)[0].numpy())
    loaded, unused = target.load_checkpoint(str(tmp_path))
    assert loaded == prefix and unused == []
    assert ugatit.checkpoint_step(loaded) == 1000
    assert_same(values(target), values(source))
    for mine, theirs in zip(target.networks, source.networks):
        for a, b in zip(tf.nest.flatten(mine(x)), tf.nest.flatten(theirs(x))):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_generators_only(build, tmp_path):
    """`networks=model.generators` loads a generator-only checkpoint and leaves the discriminators alone."""
    model = build(SCRATCH)
    rng = np.random.default_rng(5)
    arrays = {n: rng.normal(size=v.shape).astype('float32')
              for n, v in model.variables_by_name(model.generators).items()}
    save_v2(tmp_path, arrays)
    discs = values(model, model.discriminators)
    _, unused = model.load_checkpoint(str(tmp_path), networks=model.generators)
    assert unused == []
    assert_same(values(model, model.generators), arrays)
    assert_same(values(model, model.discriminators), discs)
    # All four networks cannot load from it, and the message says it holds only generators.
    with pytest.raises(UserError, match='only the generators') as info:
        model.load_checkpoint(str(tmp_path))
    assert '\n' not in str(info.value)


def test_unused_keys_exclude_optimizer_slots(build, tmp_path):
    """Extra network keys come back as unused; Adam slots, beta powers and our counter/RNG keys do not."""
    model = build(SOURCE)
    c = config_of(SOURCE)
    arrays = values(model)
    w = 4 * c.ch
    extra = {'generator_B/CAM_logit/dense/kernel': np.zeros((w, 1), 'float32'),
             'generator_B/CAM_logit/dense/bias': np.zeros((1,), 'float32')}
    optimizer = {'beta1_power': np.float32(0.5), 'beta2_power': np.float32(0.999),
                 'beta1_power_1': np.float32(0.5), 'beta2_power_1': np.float32(0.999),
                 # this port's own additions to the original's keys
                 ugatit.COUNTER_KEY: np.int64(3), ugatit.RNG_KEY: np.zeros(3, 'int64')}
    for name in ('generator_B/conv/conv2d/kernel', 'discriminator_A/global/conv_0/kernel',
                 'generator_B/CAM_logit/dense/kernel'):
        optimizer[f'{name}/Adam'] = optimizer[f'{name}/Adam_1'] = np.zeros_like(
            arrays.get(name, extra.get(name)))
    before = values(model)
    save_v2(tmp_path, {**arrays, **extra, **optimizer})
    _, unused = model.load_checkpoint(str(tmp_path))
    assert unused == sorted(extra)
    assert_same(values(model), before)


MISMATCHES = {  # (model key, config changes of the checkpoint, the flag the message must give)
    'light_into_full': (SOURCE, {'light': True}, '--light True'),
    'full_into_light': ('light8', {'light': False}, '--light False'),
    'ch': (SOURCE, {'ch': 2}, '--ch 2'),
    'n_res_fewer': ('light8', {'n_res': 1}, '--n_res 1'),
    'n_dis': (SOURCE, {'n_dis': 3}, '--n_dis 3'),
    'n_dis_more': ('light8', {'n_dis': 3}, '--n_dis 3'),
    'sn': (SOURCE, {'sn': False}, '--sn False'),
    'sn_on': ('light8', {'sn': True}, '--sn True'),
    'img_size': (SOURCE, {'img_size': 16}, '--img_size 16'),
    'img_ch': (SOURCE, {'img_ch': 1}, '--img_ch 1'),
}


@pytest.mark.parametrize('case', sorted(MISMATCHES))
def test_mismatch_names_the_flag(build, tmp_path, case):
    """A checkpoint of another configuration raises UserError giving exactly the differing flag, with its value."""
    key, changes, flag = MISMATCHES[case]
    model = build(key)
    other = dataclasses.replace(config_of(key), **changes)
    save_v2(tmp_path, synthetic_arrays(model, other))
    before = values(model)
    with pytest.raises(UserError) as info:
        model.load_checkpoint(str(tmp_path))
    message = str(info.value)
    assert '\n' not in message
    assert flag in message
    assert set(re.findall(r'--\w+', message)) == {flag.split()[0]}, message
    assert_same(values(model), before)  # nothing was assigned
    if 'light' in changes:  # says which MLP/linear_0 kernel the checkpoint holds
        rows, width = expected_variables(other)['generator_B/MLP/linear_0/dense/kernel'][0]
        assert 'linear_0' in message
        assert re.search(rf'\b{rows}\s*[x×,]\s*{width}\b', message), message


def test_mismatch_n_res_more_in_checkpoint(build, tmp_path):
    """A checkpoint with more res blocks than --n_res raises UserError naming --n_res and its value."""
    model = build(SOURCE)
    other = dataclasses.replace(config_of(SOURCE), n_res=3)
    save_v2(tmp_path, synthetic_arrays(model, other))
    with pytest.raises(UserError, match='--n_res 3'):
        model.load_checkpoint(str(tmp_path))


def test_infer_config_reads_the_flags(build):
    """infer_config recovers light, ch, img_size, n_res, img_ch, n_dis and sn from shapes alone."""
    for key in SHAPE_MODELS:
        c = CONFIGS[key]
        shapes = {n: list(s) for n, (s, _) in expected_variables(c).items()}
        found = ugatit.infer_config(shapes)
        want = {'light': c.light, 'ch': c.ch, 'n_res': c.n_res, 'img_ch': c.img_ch,
                'n_dis': max(2, c.n_dis), 'sn': c.sn}  # n_dis 1 and 2 build the same networks
        if not c.light:
            want['img_size'] = c.img_size
        assert found == want, key


@pytest.fixture
def good_checkpoint(build, tmp_path):
    """A folder with one valid checkpoint of the scratch model (its own values)."""
    model = build(SCRATCH)
    return model, save_v2(tmp_path / 'run', values(model), counter=7)


def corrupt(prefix, part, how):
    path = prefix + ('.index' if part == 'index' else '.data-00000-of-00001')
    data = open(path, 'rb').read()
    if how == 'missing':
        os.remove(path)
        return
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2] if how == 'truncated' else bytes(b ^ 0x5A for b in data))


@pytest.mark.parametrize('part, how', [
    ('index', 'garbage'), ('index', 'truncated'), ('index', 'missing'),
    ('data', 'garbage'), ('data', 'missing'),
    ('data', 'truncated'),
])
def test_corrupt_checkpoint_raises_user_error(good_checkpoint, part, how):
    """A corrupt, truncated or missing index or data file raises a one-line UserError."""
    model, prefix = good_checkpoint
    corrupt(prefix, part, how)
    with pytest.raises(UserError) as info:
        model.load_checkpoint(prefix)
    assert '\n' not in str(info.value) and os.path.basename(prefix) in str(info.value)


def test_no_checkpoint_raises_user_error(build, tmp_path):
    """An empty folder and a missing prefix each raise a one-line UserError naming the path."""
    model = build(SCRATCH)
    for path in (tmp_path, tmp_path / 'UGATIT.model-5'):
        with pytest.raises(UserError) as info:
            model.load_checkpoint(str(path))
        assert '\n' not in str(info.value) and str(path) in str(info.value)


def test_checkpoint_step():
    """checkpoint_step reads the counter after the last '-' (0 without one)."""
    assert ugatit.checkpoint_step('/a/b-1/UGATIT.model-1000000') == 1000000
    assert ugatit.checkpoint_step('UGATIT_light.model-17') == 17
    assert ugatit.checkpoint_step('/a/UGATIT.model') == 0


@pytest.fixture
def three_checkpoints(tmp_path):
    """A folder with UGATIT.model-{9,10,1000000} (copies of one tiny bundle) and no state file."""
    folder = tmp_path / 'UGATIT_selfie2anime'
    first = save_v2(folder, {'x': np.zeros(2, 'float32')}, counter=9, state=False)
    for counter in (10, 1000000):
        for ext in ('.index', '.data-00000-of-00001'):
            shutil.copy(first + ext, str(folder / f'UGATIT.model-{counter}') + ext)
    return folder


def test_resolve_without_state_file_picks_highest_counter(three_checkpoints):
    """Without a `checkpoint` file the highest counter wins (numerically: 1000000 > 10 > 9)."""
    assert ugatit.resolve_checkpoint(str(three_checkpoints)) == str(three_checkpoints / 'UGATIT.model-1000000')


def test_resolve_state_file_from_another_machine(three_checkpoints):
    """A state file with another machine's absolute path resolves to the same name in this folder."""
    write_state(three_checkpoints, '/home/someone/checkpoint/UGATIT_selfie2anime/UGATIT.model-1000000')
    assert ugatit.resolve_checkpoint(str(three_checkpoints)) == str(three_checkpoints / 'UGATIT.model-1000000')


@pytest.mark.parametrize('state', ['/elsewhere/UGATIT.model-77', 'UGATIT.model-77', '{{ not a state file'])
def test_resolve_stale_or_broken_state_file(three_checkpoints, state):
    """A state file naming a checkpoint that is not here, or unparsable, falls back to the highest counter."""
    if state.startswith('{'):
        (three_checkpoints / 'checkpoint').write_text(state)
    else:
        write_state(three_checkpoints, state)
    assert ugatit.resolve_checkpoint(str(three_checkpoints)) == str(three_checkpoints / 'UGATIT.model-1000000')


def test_resolve_file_paths(three_checkpoints):
    """A prefix, its .index, .data or .meta file all resolve to the prefix."""
    prefix = str(three_checkpoints / 'UGATIT.model-10')
    for path in (prefix, prefix + '.index', prefix + '.data-00000-of-00001', prefix + '.meta'):
        assert ugatit.resolve_checkpoint(path) == prefix
    with pytest.raises(UserError, match='UGATIT.model-11'):
        ugatit.resolve_checkpoint(str(three_checkpoints / 'UGATIT.model-11'))


# --- 7. Power iteration ---------------------------------------------------------------------

def np_l2n(x):
    return x / np.sqrt(max(np.sum(x ** 2), 1e-12))


def test_power_iteration_step_advances_every_u_once(build):
    """power_iteration_step(*discriminators) moves every u of both Ds one iteration; nothing else changes."""
    model = build(SCRATCH)
    before = values(model)
    u_names = [n for n in before if n.endswith('/u')]
    assert len(u_names) == sum(1 for _, (s, t) in expected_variables(config_of(SCRATCH)).items() if not t)
    assert {n.split('/')[0] for n in u_names} == {'discriminator_A', 'discriminator_B'}
    with ops.power_iteration_step(*model.discriminators):
        pass
    after = values(model)
    for name in u_names:
        kernel = before[name[:-len('u')] + 'kernel']
        wm = kernel.astype('float64').reshape(-1, kernel.shape[-1])
        want = np_l2n(np_l2n(before[name].astype('float64') @ wm.T) @ wm)
        np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
        if before[name].size > 1:
            assert not np.allclose(after[name], before[name]), name
    for name in before:
        if not name.endswith('/u'):
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


# --- 8. Training state in checkpoints ---------------------------------------------------------

def test_adam_steps_from_beta_powers():
    """The Adam step count comes from beta1_power (exact), else beta2_power, else the fallback."""
    assert ugatit.adam_steps(0.5 ** 4, 0.999 ** 4, fallback=99) == 3
    assert ugatit.adam_steps(0.5, 0.999, fallback=99) == 0
    assert ugatit.adam_steps(0.0, np.float32(0.999 ** 301), fallback=99) == 300  # beta1 underflowed
    assert ugatit.adam_steps(0.0, 0.0, fallback=99) == 99


def train_a_little(model, steps, seed=0):
    """A few eager D and G updates (eager: tracing the compiled steps costs ~30 s)."""
    model.build_optimizers()
    rng = np.random.default_rng(seed)
    c = model.config
    for _ in range(steps):
        batch = [tf.constant(rng.uniform(-1, 1, (1, c.img_size, c.img_size, c.img_ch)), tf.float32)
                 for _ in range(2)]
        model._d_update(*batch, tf.constant(1e-3))
        model._g_update(*batch, tf.constant(1e-3))


def test_resume_from_an_original_format_checkpoint(tmp_path):
    """A checkpoint as the original writes it (no counter key, Adam slots and beta powers)
    resumes: counter from the file name, slots restored, step counts from the beta powers."""
    keras.utils.set_random_seed(3)
    c = Config(img_size=16, ch=2, n_res=1, n_dis=3, light=True)
    source = ugatit.UGATIT(c)
    train_a_little(source, 3)
    state = source.checkpoint_state(counter=4)
    original = {k: v for k, v in state.items() if not k.startswith('ugatit/')}
    prefix = save_v2(tmp_path, original, counter=4)
    os.rename(prefix + '.index', str(tmp_path / 'UGATIT_light.model-4.index'))
    os.rename(prefix + '.data-00000-of-00001', str(tmp_path / 'UGATIT_light.model-4.data-00000-of-00001'))
    write_state(tmp_path, 'UGATIT_light.model-4')
    keras.utils.set_random_seed(4)
    resumed = ugatit.UGATIT(c)
    resumed.build_optimizers()
    assert resumed._restore_for_training(str(tmp_path)) == 4
    assert int(resumed.g_opt.iterations.numpy()) == int(resumed.d_opt.iterations.numpy()) == 3
    assert_same(values(resumed), values(source))
    assert_same({k: v.numpy() for k, v in resumed.optimizer_state_by_name().items()},
                {k: v.numpy() for k, v in source.optimizer_state_by_name().items()})


def test_our_checkpoint_round_trip_and_rotation(tmp_path):
    """save_checkpoint writes the original's names plus counter and RNG state, keeps the
    newest five of ours, never deletes a foreign checkpoint, and resumes everything."""
    keras.utils.set_random_seed(5)
    c = Config(img_size=16, ch=2, n_res=1, n_dis=3, light=True, seed=5)
    source = ugatit.UGATIT(c)
    train_a_little(source, 2)
    foreign = save_v2(tmp_path, values(source), counter=1)  # e.g. a released checkpoint
    for counter in range(2, 9):
        source.save_checkpoint(str(tmp_path), counter)
    kept = sorted(ugatit.checkpoint_step(p[:-len('.index')]) for p in os.listdir(tmp_path)
                  if p.endswith('.index'))
    assert kept == [1, 4, 5, 6, 7, 8] and os.path.exists(foreign + '.index')
    assert ugatit.resolve_checkpoint(str(tmp_path)).endswith('UGATIT_light.model-8')
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp-')]
    reader = tf.train.load_checkpoint(str(tmp_path / 'UGATIT_light.model-8'))
    assert int(reader.get_tensor(ugatit.COUNTER_KEY)) == 8
    assert reader.get_tensor('beta1_power') == np.float32(0.5 ** 3)
    keras.utils.set_random_seed(6)
    resumed = ugatit.UGATIT(dataclasses.replace(c, seed=6))
    resumed.build_optimizers()
    assert resumed._restore_for_training(str(tmp_path)) == 8
    assert_same(values(resumed), values(source))
    np.testing.assert_array_equal(resumed.rng.state.numpy(), source.rng.state.numpy())


def test_init_from_starts_a_new_run(tmp_path):
    """--init_from loads the weights only: the counter starts at 1 and Adam is fresh."""
    keras.utils.set_random_seed(7)
    c = Config(img_size=16, ch=2, n_res=1, n_dis=3, light=True)
    source = ugatit.UGATIT(c)
    train_a_little(source, 2)
    source.save_checkpoint(str(tmp_path / 'old'), 3)
    keras.utils.set_random_seed(8)
    fresh = ugatit.UGATIT(dataclasses.replace(c, init_from=str(tmp_path / 'old')))
    fresh.build_optimizers()
    assert fresh._restore_for_training(str(tmp_path / 'new')) == 1
    assert int(fresh.g_opt.iterations.numpy()) == 0
    assert_same(values(fresh), values(source))


# --- 9. Gradient checkpointing (--recompute) ----------------------------------------------

def test_recompute_gives_the_same_losses_and_gradients(build):
    """--recompute checkpoints the generator blocks: the G step's losses are the same, its
    gradients the same up to float32 round-off of a reordered graph, and the step really
    runs the blocks' forward again (more convolution FLOP in the traced step)."""
    plain = build('small')
    keras.utils.set_random_seed(5)
    recomputing = ugatit.UGATIT(dataclasses.replace(CONFIGS['small'], recompute=True))
    for name, var in recomputing.variables_by_name().items():
        var.assign(plain.variables_by_name()[name])
    c = CONFIGS['small']
    real_a, real_b = random_images(c, 2, seed=1), random_images(c, 2, seed=2)

    def g_loss_and_grads(model):
        @tf.function(autograph=False)
        def step(a, b):
            with tf.GradientTape() as tape:
                losses, _ = model.generator_losses(a, b)
            return losses, tape.gradient(losses['Generator_loss'], model.g_vars)
        return step, step(real_a, real_b)

    plain_step, (losses, grads) = g_loss_and_grads(plain)
    recompute_step, (losses_rc, grads_rc) = g_loss_and_grads(recomputing)
    for name in losses:
        np.testing.assert_allclose(losses_rc[name].numpy(), losses[name].numpy(), rtol=1e-6)
    # Biases in front of an instance norm have a zero gradient in exact arithmetic: theirs is
    # round-off (~1e-9), so the tolerance is relative to the largest gradient of all.
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in grads)
    for var, g, g_rc in zip(plain.g_vars, grads, grads_rc):
        np.testing.assert_allclose(g_rc.numpy(), g.numpy(), rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=var.path)
    flop = lambda step: utils.graph_flops(
        step.get_concrete_function(real_a, real_b).graph, real_a.shape[0])
    assert flop(recompute_step) > 1.2 * flop(plain_step)


# --- 10. XLA and mixed precision (--xla, --mixed_precision) --------------------------------

# Measured on the `small` model (relative to the float32 losses of the same weights and
# inputs, largest over the D and G step's terms): xla 5e-7, float16 4e-5, bfloat16 4e-4.
# The tolerances leave a margin of 10-20 and are still far below any change of the model.
PRECISION_VARIANTS = {
    'xla': ({'xla': True}, 1e-5),
    'float16': ({'mixed_precision': 'float16'}, 1e-3),
    'bfloat16': ({'mixed_precision': 'bfloat16'}, 5e-3),
}
PRECISION_LR = 2e-4   # not Config.lr: the steps must assign it (through the loss-scale wrapper)


def run_steps(model):
    """One D step then one G step at PRECISION_LR: {loss name: float}."""
    c = CONFIGS['small']
    lr = tf.constant(PRECISION_LR)
    d_losses, _ = model.d_step(random_images(c, 2, seed=1), random_images(c, 2, seed=2), lr)
    g_losses, _ = model.g_step(random_images(c, 2, seed=3), random_images(c, 2, seed=4), lr)
    for losses in (d_losses, g_losses):
        assert all(v.dtype == tf.float32 for v in losses.values())
    return {k: float(v) for k, v in {**d_losses, **g_losses}.items()}


@pytest.fixture(scope='module')
def precision_models():
    """models(key) -> (model, losses of run_steps) for 'float32' and PRECISION_VARIANTS, each
    from the same initial weights (seed 5); built and stepped once per module."""
    cache = {}

    def get(key):
        if key not in cache:
            overrides = {} if key == 'float32' else PRECISION_VARIANTS[key][0]
            keras.utils.set_random_seed(5)
            model = ugatit.UGATIT(dataclasses.replace(CONFIGS['small'], **overrides))
            model.build_optimizers()
            if key != 'float32':
                initial = get('float32')[2]
                for name, var in model.variables_by_name().items():
                    var.assign(initial[name])
            start = values(model)
            cache[key] = (model, run_steps(model), start)
        return cache[key]
    return get


@pytest.mark.parametrize('key', sorted(PRECISION_VARIANTS))
def test_xla_and_mixed_precision_steps_match_float32(precision_models, key):
    """Under --xla, --mixed_precision float16 and bfloat16, the D and G steps run, their losses
    are finite and close to float32's from the same weights and inputs; every variable and
    Adam slot stays float32 under the same name; the global dtype policy is untouched after
    the model is built; the learning rate reaches Adam (inside float16's loss-scale wrapper);
    and a mixed model really computes its convolutions in the low precision."""
    reference_model, reference, _ = precision_models('float32')
    model, losses, _ = precision_models(key)
    assert keras.config.dtype_policy().name == keras.config.floatx()
    assert losses.keys() == reference.keys()
    assert all(np.isfinite(v) for v in losses.values()), losses
    rtol = PRECISION_VARIANTS[key][1]
    for name in reference:
        np.testing.assert_allclose(losses[name], reference[name], rtol=rtol, err_msg=name)
    assert list(model.variables_by_name()) == list(reference_model.variables_by_name())
    assert list(model.optimizer_state_by_name()) == list(reference_model.optimizer_state_by_name())
    for name, var in {**model.variables_by_name(), **model.optimizer_state_by_name()}.items():
        assert var.dtype == 'float32', name
    for opt in (model.g_opt, model.d_opt):
        wrapped = isinstance(opt, keras.optimizers.LossScaleOptimizer)
        assert wrapped == (key == 'float16')
        assert np.isclose(float(model.adam(opt).learning_rate), PRECISION_LR)
        if wrapped:  # dynamic loss scaling: an overflowing step is skipped, its scale halved
            assert (int(opt.iterations.numpy()) == 1
                    or float(opt.dynamic_scale.numpy()) == opt.initial_scale / 2)
        else:
            assert int(opt.iterations.numpy()) == 1
    if key in ('float16', 'bfloat16'):
        graph = model.g_step.get_concrete_function().graph
        conv_dtypes = {op.outputs[0].dtype.name for op in graph.get_operations()
                       if op.type == 'Conv2D'}
        assert conv_dtypes == {key, 'float32'}  # float32: the output conv G_logit, D_logit


def test_translate_under_xla_and_mixed_precision(precision_models):
    """The compiled translation returns float32 images and heat-maps close to float32's."""
    c = CONFIGS['small']
    images = random_images(c, 2, seed=9)
    for key in sorted(PRECISION_VARIANTS):
        reference_model = precision_models('float32')[0]
        model = precision_models(key)[0]
        for name, var in reference_model.variables_by_name().items():
            var.assign(values(model)[name])   # both at the variant's weights
        fake, heat = model.translate(images, 'A2B')
        fake_ref, heat_ref = reference_model.translate(images, 'A2B')
        assert fake.dtype == heat.dtype == np.float32
        atol = {'xla': 1e-5, 'float16': 5e-3, 'bfloat16': 5e-2}[key]
        np.testing.assert_allclose(fake, fake_ref, atol=atol, err_msg=key)
        np.testing.assert_allclose(heat, heat_ref, atol=atol * float(np.abs(heat_ref).max()),
                                   err_msg=key)


@pytest.mark.parametrize('saver, loader', [('float16', 'float32'), ('float32', 'bfloat16')])
def test_checkpoints_move_between_precisions(precision_models, tmp_path, saver, loader):
    """A training checkpoint written under mixed precision loads into a float32 model and
    vice versa: the same keys, and every weight, Adam slot and step count restored exactly."""
    source = precision_models(saver)[0]
    prefix = source.save_checkpoint(str(tmp_path), 2)
    keras.utils.set_random_seed(6)
    overrides = {} if loader == 'float32' else {'mixed_precision': loader}
    target = ugatit.UGATIT(dataclasses.replace(CONFIGS['small'], **overrides))
    target.build_optimizers()
    assert set(target.checkpoint_state(2)) == set(source.checkpoint_state(2))
    target.load_checkpoint(prefix, optimizers=True)
    assert_same(values(target), values(source))
    assert_same({n: v.numpy() for n, v in target.optimizer_state_by_name().items()},
                {n: v.numpy() for n, v in source.optimizer_state_by_name().items()})
    for opt, opt_source in ((target.g_opt, source.g_opt), (target.d_opt, source.d_opt)):
        assert int(opt.iterations.numpy()) == int(opt_source.iterations.numpy())


# --- 10. The full model's MLP kernel gradient, formed once per update ---------------------

class TapeGradientUGATIT(ugatit.UGATIT):
    """The model with every kernel's gradient left to the tape (no factored layers)."""
    factored_layers = property(lambda self: [])


def test_factored_mlp_kernel_gradient_gives_the_tapes_update():
    """The full model's G update forms each generator's first MLP kernel gradient as one
    product over its three calls (`ops.factored_kernel_gradient`) instead of the tape's one
    matrix per call: one G step from the same weights and images gives the same variables
    (and losses) as the tape's own gradient."""
    config = dataclasses.replace(CONFIGS['small'], light=False)
    keras.utils.set_random_seed(3)
    factored = ugatit.UGATIT(config)
    plain = TapeGradientUGATIT(config)
    for name, var in plain.variables_by_name().items():
        var.assign(factored.variables_by_name()[name])
    assert len(factored.factored_layers) == 2 and plain.factored_layers == []
    real_a, real_b = random_images(config, 2, seed=4), random_images(config, 2, seed=5)
    lr = tf.constant(1e-3)
    kernel = factored.factored_layers[0].dense.kernel
    assert kernel.path.endswith('MLP/linear_0/dense/kernel')
    initial = kernel.numpy()
    losses = []
    for model in (factored, plain):
        model.build_optimizers()
        losses.append(model.g_step(real_a, real_b, lr)[0])
    for name in losses[0]:
        np.testing.assert_allclose(losses[0][name].numpy(), losses[1][name].numpy(),
                                   rtol=1e-6, err_msg=name)
    plain_vars = plain.variables_by_name()
    for name, var in factored.variables_by_name().items():
        np.testing.assert_allclose(var.numpy(), plain_vars[name].numpy(), rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    assert np.abs(kernel.numpy() - initial).max() > 1e-4   # the update did move it (lr 1e-3)
