"""U-GAT-IT networks and the model class, faithful to the original TF release.

Code (paper) names, once: the original's `generate_a2b` runs in scope
`generator_B` (it *produces* domain B) and `generate_b2a` in `generator_A`;
`discriminator_A` judges domain A (real A and fake B→A). Here the Python
attributes say the direction (`gen_a2b`, `disc_a`) and the Keras names keep
the original scopes, so every variable's `.path` is the original's variable
name (`generator_B/conv_0/conv2d/kernel`, `discriminator_A/global/conv_last/u`).
"""

import dataclasses
import glob
import math
import os
import re

import keras
import tensorflow as tf
from absl import logging

import ops
from utils import UserError

# --- Constants of the architecture -------------------------------------------

LEAKY_SLOPE = 0.2        # the discriminators pass 0.2 to lrelu
N_DOWNSAMPLE = 2         # the generator's stride-2 convs (so img_size % 4 == 0)
MIN_GLOBAL_MAP = 3       # D_logit reflect-pads 2 px bottom/right: the map must be >= 3
LOCAL_DEPTH_OFFSET = 2   # the local D has 2 fewer stride-2 convs than the global one
RGB_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the original `main.py`, with its defaults (spec §1)."""
    phase: str = 'train'
    light: bool = False
    dataset: str = 'selfie2anime'
    epoch: int = 100
    iteration: int = 10000
    batch_size: int = 1
    print_freq: int = 1000
    save_freq: int = 1000
    decay_flag: bool = True
    decay_epoch: int = 50
    lr: float = 0.0001
    GP_ld: int = 10
    adv_weight: int = 1
    cycle_weight: int = 10
    identity_weight: int = 10
    cam_weight: int = 1000
    gan_type: str = 'lsgan'
    smoothing: bool = True
    ch: int = 64
    n_res: int = 4
    n_dis: int = 6
    n_critic: int = 1
    sn: bool = True
    img_size: int = 256
    img_ch: int = 3
    augment_flag: bool = True
    checkpoint_dir: str = 'checkpoint'
    result_dir: str = 'results'
    log_dir: str = 'logs'
    sample_dir: str = 'samples'

    @property
    def model_name(self):
        return 'UGATIT_light' if self.light else 'UGATIT'

    @property
    def model_dir(self):
        """The original's run-folder name, e.g. `UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing`."""
        return (f'{self.model_name}_{self.dataset}_{self.gan_type}_{self.n_res}resblock_'
                f'{self.n_dis}dis_{self.n_critic}_{self.adv_weight}_{self.cycle_weight}_'
                f'{self.identity_weight}_{self.cam_weight}'
                f'{"_sn" if self.sn else ""}{"_smoothing" if self.smoothing else ""}')

    def validate(self):
        """Raises `UserError` (one line, naming the flag to change) for a config that cannot build."""
        for name in ('ch', 'n_res', 'n_dis', 'img_size', 'img_ch', 'batch_size'):
            if getattr(self, name) < 1:
                raise UserError(f'--{name} must be at least 1, got {getattr(self, name)}')
        if self.gan_type not in ops.GAN_TYPES:
            raise UserError(f'--gan_type {self.gan_type!r} is unknown: use one of '
                            f'{", ".join(ops.GAN_TYPES)}')
        factor = 2 ** N_DOWNSAMPLE
        if self.img_size % factor:
            raise UserError(f'--img_size must be divisible by {factor}, got {self.img_size}: '
                            f'try --img_size {self.img_size // factor * factor or factor}')
        side = global_map_side(self.img_size, self.n_dis)
        if side < MIN_GLOBAL_MAP:
            fits = [n for n in range(1, self.n_dis) if global_map_side(self.img_size, n) >= MIN_GLOBAL_MAP]
            fix = f'use --n_dis {fits[-1]} or less, or ' if fits else 'use '
            raise UserError(
                f'--img_size {self.img_size} is too small for --n_dis {self.n_dis}: the global '
                f'discriminator\'s last map would be {side} px and must be at least '
                f'{MIN_GLOBAL_MAP}; {fix}--img_size {min_img_size(self.n_dis)} or more')


def global_downsamplings(n_dis):
    """Stride-2 convs of the global discriminator (conv_0 always exists)."""
    return max(1, n_dis - 1)


def local_downsamplings(n_dis):
    """Stride-2 convs of the local discriminator (conv_0 always exists)."""
    return max(1, n_dis - 1 - LOCAL_DEPTH_OFFSET)


def global_map_side(img_size, n_dis):
    """Side of the global discriminator's last map (each 4/2/1 conv floors H/2)."""
    return img_size // 2 ** global_downsamplings(n_dis)


def min_img_size(n_dis):
    """The smallest valid img_size for `n_dis` (a multiple of 4 with a >= 3 px global map)."""
    factor = 2 ** N_DOWNSAMPLE
    size = MIN_GLOBAL_MAP * 2 ** global_downsamplings(n_dis)
    return -(-size // factor) * factor


# --- Networks -------------------------------------------------------------------

class GammaBetaMLP(keras.layers.Layer):
    """The `MLP` giving AdaLIN's γ and β: [B, h, w, C] -> ([B,1,1,m], [B,1,1,m]).

    light: global average pooling first (input [B, C]); full: the whole map
    flattened row-major (input [B, h·w·C]). Then linear_0 + ReLU, linear_1 +
    ReLU, and the two heads `gamma`, `beta`. The width m is the bottleneck
    width 4·ch (the original used ch·n_res, equal only at n_res = 4).
    """

    def __init__(self, width, light, **kwargs):
        super().__init__(**kwargs)
        self.light = light
        self.hidden = [ops.FullyConnected(width, name=f'linear_{i}') for i in range(2)]
        self.gamma = ops.FullyConnected(width, name='gamma')
        self.beta = ops.FullyConnected(width, name='beta')

    def call(self, x):
        if self.light:
            x = tf.reduce_mean(x, axis=[1, 2])
        for layer in self.hidden:
            x = tf.nn.relu(layer(x))
        gamma, beta = self.gamma(x), self.beta(x)
        return gamma[:, None, None, :], beta[:, None, None, :]


def attend(cam, conv_1x1, activation, x):
    """The CAM block shared by G and D: x [B,h,w,C] -> (features [B,h,w,C'], cam_logit [B,2], heatmap [B,h,w])."""
    attended, cam_logit = cam(x)
    features = activation(conv_1x1(attended))
    return features, cam_logit, tf.reduce_sum(features, axis=-1)


class Generator(keras.Model):
    """ResNet generator with CAM attention and AdaLIN: [B,S,S,img_ch] -> [B,S,S,out_ch].

    `call(x)` returns (image in [-1, 1], cam_logit [B, 2], heatmap [B, S/4, S/4]);
    `forward(x)` returns every named activation (the reference data's keys).
    """

    def __init__(self, ch=64, n_res=4, light=False, smoothing=True, out_ch=RGB_CHANNELS,
                 **kwargs):
        super().__init__(**kwargs)
        width = ch * 2 ** N_DOWNSAMPLE
        self.stem = ops.Conv(ch, 7, stride=1, pad=3, name='conv')
        self.stem_norm = ops.InstanceNorm(name='ins_norm')
        self.down = [ops.Conv(ch * 2 ** (i + 1), 3, stride=2, pad=1, name=f'conv_{i}')
                     for i in range(N_DOWNSAMPLE)]
        self.down_norm = [ops.InstanceNorm(name=f'ins_norm_{i}') for i in range(N_DOWNSAMPLE)]
        self.encoder_blocks = [
            ops.ResidualBlock(width, lambda: ops.InstanceNorm(name='instance_norm'),
                              name=f'resblock_{i}') for i in range(n_res)]
        self.cam = ops.CAMClassifier(name='CAM_logit')
        self.conv_1x1 = ops.Conv(width, 1, stride=1, name='conv_1x1')
        self.mlp = GammaBetaMLP(width, light, name='MLP')
        self.decoder_blocks = [
            ops.ResidualBlock(width, lambda: ops.AdaLIN(smoothing, name='instance_layer_norm'),
                              name=f'adaptive_resblock{i}') for i in range(n_res)]
        self.up = [ops.Conv(width // 2 ** (i + 1), 3, stride=1, pad=1, name=f'up_conv_{i}')
                   for i in range(N_DOWNSAMPLE)]
        self.up_norm = [ops.LIN(name=f'layer_ins_norm_{i}') for i in range(N_DOWNSAMPLE)]
        self.to_image = ops.Conv(out_ch, 7, stride=1, pad=3, name='G_logit')

    def forward(self, x):
        """All named activations: stem, down{i}, res{k}, cam_logit, cam_gap_logit,
        cam_gmp_logit, cam_features, heatmap, gamma, beta, adares{k}, up{i}, fake."""
        out = {}
        x = out['stem'] = tf.nn.relu(self.stem_norm(self.stem(x)))
        for i, (conv, norm) in enumerate(zip(self.down, self.down_norm)):
            x = out[f'down{i}'] = tf.nn.relu(norm(conv(x)))
        for k, block in enumerate(self.encoder_blocks):
            x = out[f'res{k}'] = block(x)
        x, out['cam_logit'], out['heatmap'] = attend(self.cam, self.conv_1x1, tf.nn.relu, x)
        out['cam_gap_logit'], out['cam_gmp_logit'] = tf.split(out['cam_logit'], 2, axis=-1)
        out['cam_features'] = x
        gamma, beta = out['gamma'], out['beta'] = self.mlp(x)
        for k, block in enumerate(self.decoder_blocks):
            x = out[f'adares{k}'] = block(x, gamma, beta)
        for i, (conv, norm) in enumerate(zip(self.up, self.up_norm)):
            x = out[f'up{i}'] = tf.nn.relu(norm(conv(ops.up_sample(x))))
        out['fake'] = tf.tanh(self.to_image(x))
        return out

    def call(self, x):
        out = self.forward(x)
        return out['fake'], out['cam_logit'], out['heatmap']


class Discriminator(keras.layers.Layer):
    """PatchGAN critic with CAM attention, used as both `local` and `global`.

    [B,S,S,C] -> (logit [B, S/2^n, S/2^n, 1], cam_logit [B, 2], heatmap).
    `n_downsample` stride-2 4×4 convs (conv_0 … conv_{n−1}, channels ch·2^i),
    `conv_last` (4×4 s1, ch·2^n), the CAM block, `D_logit` (4×4 s1 → 1).
    Every conv but `conv_1x1` is spectrally normalised when `sn`.
    """

    def __init__(self, ch, n_downsample, sn=True, **kwargs):
        super().__init__(**kwargs)
        self.down = [ops.Conv(ch * 2 ** i, 4, stride=2, pad=1, spectral_norm=sn, name=f'conv_{i}')
                     for i in range(n_downsample)]
        channels = ch * 2 ** n_downsample
        self.conv_last = ops.Conv(channels, 4, stride=1, pad=1, spectral_norm=sn, name='conv_last')
        self.cam = ops.CAMClassifier(spectral_norm=sn, name='CAM_logit')
        self.conv_1x1 = ops.Conv(channels, 1, stride=1, name='conv_1x1')
        self.to_logit = ops.Conv(1, 4, stride=1, pad=1, spectral_norm=sn, name='D_logit')

    @staticmethod
    def _lrelu(x):
        return tf.nn.leaky_relu(x, LEAKY_SLOPE)

    def forward(self, x):
        """Named activations: features, cam_features, cam_logit, heatmap, logit."""
        for conv in self.down:
            x = self._lrelu(conv(x))
        x = features = self._lrelu(self.conv_last(x))
        x, cam_logit, heatmap = attend(self.cam, self.conv_1x1, self._lrelu, x)
        return {'features': features, 'cam_features': x, 'cam_logit': cam_logit,
                'heatmap': heatmap, 'logit': self.to_logit(x)}

    def call(self, x):
        out = self.forward(x)
        return out['logit'], out['cam_logit'], out['heatmap']


class MultiScaleDiscriminator(keras.Model):
    """The local (shallow) and global (deep) critics of one domain.

    call(x) -> ([local_logit, global_logit], [local_cam_logit, global_cam_logit]).
    """

    def __init__(self, ch, n_dis, sn=True, **kwargs):
        super().__init__(**kwargs)
        # The original builds `local` first, then `global`.
        self.local = Discriminator(ch, local_downsamplings(n_dis), sn, name='local')
        self.global_ = Discriminator(ch, global_downsamplings(n_dis), sn, name='global')

    @property
    def critics(self):
        return {'local': self.local, 'global': self.global_}

    def call(self, x):
        local_logit, local_cam, _ = self.local(x)
        global_logit, global_cam, _ = self.global_(x)
        return [local_logit, global_logit], [local_cam, global_cam]


# --- Checkpoints of the original release ------------------------------------------

OPTIMIZER_KEY = re.compile(r'(/Adam(_1)?$|^beta[12]_power(_\d+)?$)')


def resolve_checkpoint(path):
    """The checkpoint prefix for `path`: a prefix, one of its files, or a folder (its latest)."""
    if os.path.isdir(path):
        state = tf.train.get_checkpoint_state(path)
        candidates = []
        if state and state.model_checkpoint_path:
            # The state file may hold absolute paths from another machine.
            candidates += [state.model_checkpoint_path,
                           os.path.join(path, os.path.basename(state.model_checkpoint_path))]
        indexed = sorted(glob.glob(os.path.join(glob.escape(path), '*.index')),
                         key=lambda p: checkpoint_step(p[:-len('.index')]))
        candidates += [p[:-len('.index')] for p in reversed(indexed)]
        for prefix in candidates:
            if os.path.exists(prefix + '.index'):
                return prefix
        raise UserError(f'no checkpoint in {path}: train first, or point to a checkpoint folder '
                        'or file')
    prefix = re.sub(r'\.(index|meta|data-\d+-of-\d+)$', '', path)
    if not os.path.exists(prefix + '.index'):
        raise UserError(f'no checkpoint at {path}: expected {prefix}.index')
    return prefix


def checkpoint_step(prefix):
    """The counter the original puts after the last '-' of a checkpoint name (0 if none)."""
    match = re.search(r'-(\d+)$', prefix)
    return int(match.group(1)) if match else 0


def infer_config(shapes):
    """The network flags a checkpoint was written with, from its variable shapes.

    Returns a dict with the keys it can tell (light, ch, img_size, n_res,
    img_ch, n_dis, sn) from `shapes` (name -> shape list).
    """
    found = {}
    gen = next((g for g in ('generator_B', 'generator_A')
                if f'{g}/conv/conv2d/kernel' in shapes), None)
    if gen:
        stem = shapes[f'{gen}/conv/conv2d/kernel']
        found['img_ch'], found['ch'] = stem[2], stem[3]
        found['n_res'] = len({m.group(1) for name in shapes
                              for m in [re.match(rf'{gen}/resblock_(\d+)/', name)] if m})
        rows = shapes.get(f'{gen}/MLP/linear_0/dense/kernel', [0])[0]
        width = found['ch'] * 2 ** N_DOWNSAMPLE
        found['light'] = rows == width
        if not found['light'] and rows % width == 0:
            found['img_size'] = math.isqrt(rows // width) * 2 ** N_DOWNSAMPLE
    disc = next((d for d in ('discriminator_A', 'discriminator_B')
                 if any(name.startswith(d + '/global/') for name in shapes)), None)
    if disc:
        n_global = len({m.group(1) for name in shapes
                        for m in [re.match(rf'{disc}/global/conv_(\d+)/', name)] if m})
        found['n_dis'] = n_global + 1
        found['sn'] = f'{disc}/global/conv_0/u' in shapes
    return found


def _flag_value(value):
    return str(value) if not isinstance(value, bool) else ('True' if value else 'False')


# --- The model ----------------------------------------------------------------------

class UGATIT:
    """Two generators, two local+global discriminator pairs, and U-GAT-IT's losses."""

    def __init__(self, config):
        config.validate()
        self.config = c = config
        out_ch = c.img_ch  # the original hard-codes 3, the only value it can train with
        self.gen_a2b = Generator(c.ch, c.n_res, c.light, c.smoothing, out_ch, name='generator_B')
        self.gen_b2a = Generator(c.ch, c.n_res, c.light, c.smoothing, out_ch, name='generator_A')
        self.disc_a = MultiScaleDiscriminator(c.ch, c.n_dis, c.sn, name='discriminator_A')
        self.disc_b = MultiScaleDiscriminator(c.ch, c.n_dis, c.sn, name='discriminator_B')
        self.build_model()

    @property
    def generators(self):
        return [self.gen_a2b, self.gen_b2a]

    @property
    def discriminators(self):
        return [self.disc_a, self.disc_b]

    @property
    def networks(self):
        return self.generators + self.discriminators

    def build_model(self):
        """Creates every variable by one call of each network on a zero batch."""
        c = self.config
        image = tf.zeros([1, c.img_size, c.img_size, c.img_ch])
        for net in self.networks:
            net(image)

    # -- variables --

    def variables_by_name(self, networks=None):
        """{original variable name: variable} for the given networks (default: all four)."""
        return {v.path: v for net in (networks or self.networks) for v in net.weights}

    def regularization_loss(self, networks):
        """The original's `regularization_loss`: 1e-4·Σ‖w‖²/2 over the networks' kernels."""
        kernels = [v for net in networks for v in net.trainable_weights
                   if v.path.endswith('kernel')]
        return ops.l2_regularization(kernels)

    # -- losses --

    def _critic_outputs(self, disc, x):
        logits, cam_logits = disc(x)
        return logits + cam_logits

    def _discriminator_term(self, disc, real, fake, alpha=None, eps=None):
        """D_ad for one domain: GAN terms on (real, fake) logits and CAM logits, plus GPs."""
        c = self.config
        real_logit, real_cam = disc(real)
        fake_logit, fake_cam = disc(fake)
        loss = (ops.discriminator_loss(c.gan_type, real_logit, fake_logit)
                + ops.discriminator_loss(c.gan_type, real_cam, fake_cam))
        if ops.has_gradient_penalty(c.gan_type):
            if alpha is None:
                alpha = tf.random.uniform([tf.shape(real)[0], 1, 1, 1])
            if eps is None and c.gan_type == 'dragan':
                eps = tf.random.uniform(tf.shape(real))
            x_hat = ops.gradient_penalty_inputs(c.gan_type, real, fake, alpha, eps)
            # One call on the interpolates: GP on the two patch logits, GP_CAM on the two CAM logits.
            loss += tf.add_n(ops.gradient_penalty(
                c.gan_type, lambda x: self._critic_outputs(disc, x), x_hat, float(c.GP_ld)))
        return loss

    def discriminator_losses(self, real_a, real_b, gp_noise=None):
        """The D side of the original's `build_model`, as a dict of its summary terms.

        `gp_noise` may give the gradient penalties' random tensors (`gp_alpha_A`,
        `gp_alpha_B` [B,1,1,1], `dragan_eps_A`, `dragan_eps_B` image-shaped);
        missing ones are drawn from U[0, 1).
        """
        c, noise = self.config, gp_noise or {}
        fake_a2b, _, _ = self.gen_a2b(real_a)
        fake_b2a, _, _ = self.gen_b2a(real_b)
        losses = {}
        for domain, disc, real, fake in (('A', self.disc_a, real_a, fake_b2a),
                                         ('B', self.disc_b, real_b, fake_a2b)):
            losses[f'D_{domain}_loss'] = c.adv_weight * self._discriminator_term(
                disc, real, fake, noise.get(f'gp_alpha_{domain}'), noise.get(f'dragan_eps_{domain}'))
        losses['reg_loss_discriminator'] = self.regularization_loss(self.discriminators)
        losses['Discriminator_loss'] = (losses['D_A_loss'] + losses['D_B_loss']
                                        + losses['reg_loss_discriminator'])
        return losses

    def _generator_terms(self, gen, gen_back, disc, real_src, real_tgt):
        """The four weighted terms of one generator `gen` (src → tgt) and its fake.

        gan: its fake judged by the target domain's critics; cycle: the source
        reconstructed by `gen_back`; identity: `gen` on a target image; cam:
        `gen`'s classifier says "source" on the source and not on the target.
        """
        c = self.config
        fake, cam_src, _ = gen(real_src)
        rec, _, _ = gen_back(fake)
        idt, cam_tgt, _ = gen(real_tgt)
        fake_logit, fake_cam = disc(fake)
        terms = {
            'gan': c.adv_weight * (ops.generator_loss(c.gan_type, fake_logit)
                                   + ops.generator_loss(c.gan_type, fake_cam)),
            'cycle': c.cycle_weight * ops.l1_loss(rec, real_src),
            'identity': c.identity_weight * ops.l1_loss(idt, real_tgt),
            'cam': c.cam_weight * ops.cam_loss(cam_src, cam_tgt),
        }
        return terms, fake

    def generator_losses(self, real_a, real_b):
        """The G side of the original's `build_model`: (dict of its summary terms, fakes).

        `G_A_*` are generator_A's (B→A) terms: its fake judged by D_A, the cycle
        B→A→B against real B, identity on real A, its CAM loss. `G_B_*` mirror
        them. Fakes: {'fake_A': G_A(real B), 'fake_B': G_B(real A)}.
        """
        losses, fakes = {}, {}
        for domain, gen, gen_back, disc, real_src, real_tgt in (
                ('A', self.gen_b2a, self.gen_a2b, self.disc_a, real_b, real_a),
                ('B', self.gen_a2b, self.gen_b2a, self.disc_b, real_a, real_b)):
            terms, fakes[f'fake_{domain}'] = self._generator_terms(
                gen, gen_back, disc, real_src, real_tgt)
            for name, value in terms.items():
                losses[f'G_{domain}_{name}'] = value
            losses[f'G_{domain}_loss'] = tf.add_n(list(terms.values()))
        losses['reg_loss_generator'] = self.regularization_loss(self.generators)
        losses['Generator_loss'] = (losses['G_A_loss'] + losses['G_B_loss']
                                    + losses['reg_loss_generator'])
        return losses, fakes

    # -- checkpoints --

    def load_checkpoint(self, path, networks=None):
        """Fills the networks by name from a checkpoint in the original's format.

        `path`: a folder (its latest checkpoint), a prefix or one of its files;
        `networks`: which networks to fill (default: all four; the test phase
        needs only the generators). Returns (prefix, unused keys). A missing
        key or a shape mismatch raises `UserError` naming the flag to change.
        """
        prefix = resolve_checkpoint(path)
        try:
            reader = tf.train.load_checkpoint(prefix)
        except (tf.errors.OpError, ValueError) as err:
            raise UserError(f'cannot read checkpoint {prefix} ({type(err).__name__}): it is '
                            'corrupt or half-written; use another one') from err
        shapes = reader.get_variable_to_shape_map()
        wanted = self.variables_by_name(networks)
        problems = [name for name, var in wanted.items()
                    if name not in shapes or list(shapes[name]) != list(var.shape)]
        if problems:
            raise UserError(self._mismatch_message(prefix, shapes, problems[0], wanted))
        for name, var in wanted.items():
            var.assign(reader.get_tensor(name))
        ours = self.variables_by_name()
        unused = sorted(name for name in shapes
                        if name not in ours and not OPTIMIZER_KEY.search(name))
        if unused:
            logging.warning('checkpoint %s: %d keys not used: %s', prefix, len(unused),
                            ', '.join(unused))
        return prefix, unused

    def _mismatch_message(self, prefix, shapes, first_problem, wanted):
        """One line saying which flag differs between the checkpoint and this model."""
        found = infer_config(shapes)
        ours = dataclasses.asdict(self.config)
        differing = [k for k in ('light', 'ch', 'img_size', 'n_res', 'n_dis', 'sn', 'img_ch')
                     if k in found and found[k] != ours[k]]
        if 'img_size' in differing and found.get('light', ours['light']):
            differing.remove('img_size')  # the light model works at any size
        if differing:
            fix = ' '.join(f'--{k} {_flag_value(found[k])}' for k in differing)
            detail = ''
            if 'light' in differing:
                gen = 'generator_B/MLP/linear_0/dense/kernel'
                shape = '×'.join(map(str, shapes.get(gen, [])))
                detail = (f' (it is a {"light" if found["light"] else "full"} model: its '
                          f'MLP/linear_0 kernel is {shape})')
            return f'checkpoint {prefix} does not match this configuration{detail}: run with {fix}'
        if first_problem not in shapes:
            return (f'checkpoint {prefix} has no variable {first_problem}: it was not written '
                    'by U-GAT-IT with these flags')
        return (f'checkpoint {prefix}: {first_problem} is '
                f'{"×".join(map(str, shapes[first_problem]))}, this model expects '
                f'{"×".join(map(str, wanted[first_problem].shape))}')
