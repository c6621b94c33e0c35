"""U-GAT-IT networks and the model class, faithful to the original TF release.

Code (paper) names, once: the original's `generate_a2b` runs in scope
`generator_B` (it *produces* domain B) and `generate_b2a` in `generator_A`;
`discriminator_A` judges domain A (real A and fake B→A). Here the Python
attributes say the direction (`gen_a2b`, `disc_a`) and the Keras names keep
the original scopes, so every variable's `.path` is the original's variable
name (`generator_B/conv_0/conv2d/kernel`, `discriminator_A/global/conv_last/u`).
"""

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import ops
import utils
from utils import UserError

# --- Constants of the architecture -------------------------------------------

LEAKY_SLOPE = 0.2        # the discriminators pass 0.2 to lrelu
N_DOWNSAMPLE = 2         # the generator's stride-2 convs (so img_size % 4 == 0)
MIN_GLOBAL_MAP = 3       # D_logit reflect-pads 2 px bottom/right: the map must be >= 3
LOCAL_DEPTH_OFFSET = 2   # the local D has 2 fewer stride-2 convs than the global one
RGB_CHANNELS = 3

# TF1's AdamOptimizer(lr, beta1=0.5, beta2=0.999) with its default epsilon 1e-8 (Keras': 1e-7).
ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.5, 0.999, 1e-8
MAX_TO_KEEP = 5                       # tf.train.Saver's default
MAX_SEED = 2 ** 32                    # keras.utils.set_random_seed takes a NumPy seed
MAX_FLOAT32 = float(np.finfo(np.float32).max)  # a larger --lr would be infinite in the steps
DEMO_DATASET = 'demo'                 # --dataset demo: made on first use (utils.make_demo_dataset)
DIRECTIONS = ('A2B', 'B2A')           # --direction; also the test and export folder names
INPUT_FOLDER = 'custom_{direction}'   # --input's default output: result_dir/model_dir/custom_A2B
EXPORT_FOLDER = 'export'              # --phase export: checkpoint_dir/model_dir/export/{A2B,B2A}
# Per direction, the test images it translates and the real images of its target domain.
TEST_SPLITS = {'A2B': ('testA', 'testB'), 'B2A': ('testB', 'testA')}
METRICS_FILE = 'metrics.json'         # --phase eval: result_dir/model_dir/metrics.json
KID_SCALE = 100                       # the paper reports KID × 100
KID_ORDER_SEED = 0                    # the fixed shuffle before KID's blocks (see kid_and_fid)
# Our additions to the original's checkpoint keys (the original ignores them).
COUNTER_KEY = 'ugatit/counter'
RNG_KEY = 'ugatit/rng_state'
BENCHMARK_SEED = 0                    # generated images of --phase benchmark
BENCHMARK_PIPELINE_FILES = 64         # noise JPEGs timed through the input pipeline
BENCHMARK_PIPELINE_BATCHES = 50
# --distribute: one device (today's path), tf.distribute.MirroredStrategy on this machine's
# devices, or tf.distribute.MultiWorkerMirroredStrategy over the machines of TF_CONFIG.
DISTRIBUTE_MODES = ('none', 'mirrored', 'multi_worker')
DISTRIBUTED_PHASES = {'mirrored': ('train', 'benchmark'), 'multi_worker': ('train',)}
TF_CONFIG_ENV = 'TF_CONFIG'
WORKER_TASK_TYPES = ('chief', 'worker')   # the TF_CONFIG task types that train
N_DOMAINS = 2                             # A and B: one input stream each
WORKER_SCRATCH = 'worker-{task_id}'       # a non-chief worker's throw-away checkpoint folder
# --mixed_precision: the Keras dtype policy of the networks (variables stay float32).
MIXED_PRECISION_POLICIES = {'none': None, 'float16': 'mixed_float16',
                            'bfloat16': 'mixed_bfloat16'}


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
    # Settings the original does not have.
    dataset_dir: str = 'dataset'   # the original hard-codes ./dataset
    seed: Optional[int] = None     # data order, augmentation, initialisation, GP noise
    init_from: str = ''            # start a new run from these weights
    checkpoint: str = ''           # test: this checkpoint instead of the newest in model_dir
    input: str = ''                # test: translate this image file or folder instead of testA/testB
    direction: str = 'A2B'         # --input: which generator
    output: str = ''               # --input: where the results go (default: see input_output_dir)
    crop_face: bool = False        # --input: crop a square around the largest face first
    eval_freq: int = 0             # train: KID and FID every N steps of an epoch (0: never)
    inception_weights: str = ''    # eval: InceptionV3 weights file (default: Keras' ImageNet file)
    benchmark_steps: int = 5       # --phase benchmark: timed runs of each step
    benchmark_json: str = ''       # --phase benchmark: also write the figures here
    distribute: str = 'none'       # none, mirrored or multi_worker (tf.distribute)
    gpus: str = ''                 # --distribute mirrored: GPU indices such as "0,1" (default: all)
    recompute: bool = False        # train, benchmark: gradient checkpointing of the generator blocks
    xla: bool = False              # jit_compile the training steps and the translation (XLA)
    mixed_precision: str = 'none'  # none, float16 or bfloat16 compute (variables stay float32)

    @property
    def model_name(self):
        return 'UGATIT_light' if self.light else 'UGATIT'

    @property
    def input_output_dir(self):
        """Where `--input` results go: --output, else result_dir/model_dir/custom_<direction>."""
        return self.output or os.path.join(self.result_dir, self.model_dir,
                                           INPUT_FOLDER.format(direction=self.direction))

    @property
    def export_dir(self):
        """Where `--phase export` writes: checkpoint_dir/model_dir/export."""
        return os.path.join(self.checkpoint_dir, self.model_dir, EXPORT_FOLDER)

    @property
    def model_dir(self):
        """The original's run-folder name, e.g. `UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing`."""
        return (f'{self.model_name}_{self.dataset}_{self.gan_type}_{self.n_res}resblock_'
                f'{self.n_dis}dis_{self.n_critic}_{self.adv_weight}_{self.cycle_weight}_'
                f'{self.identity_weight}_{self.cam_weight}'
                f'{"_sn" if self.sn else ""}{"_smoothing" if self.smoothing else ""}')

    def validate(self):
        """Raises `UserError` (one line, naming the flag to change) for a config that cannot build."""
        for name in ('ch', 'n_res', 'n_dis', 'img_size', 'img_ch', 'batch_size', 'epoch',
                     'iteration', 'print_freq', 'save_freq', 'n_critic', 'benchmark_steps'):
            if getattr(self, name) < 1:
                raise UserError(f'--{name} must be at least 1, got {getattr(self, name)}')
        if self.img_ch not in (1, RGB_CHANNELS):
            raise UserError(f'--img_ch must be 1 or 3, got {self.img_ch}')
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise UserError(f'--seed must be in [0, 2**32), got {self.seed}')
        if not 0 < self.lr <= MAX_FLOAT32:  # NaN fails too
            raise UserError(f'--lr must be a positive float32 number, got {self.lr}')
        if self.decay_epoch < 0:
            raise UserError(f'--decay_epoch must be at least 0, got {self.decay_epoch}')
        if self.eval_freq < 0:
            raise UserError(f'--eval_freq must be at least 0 (0 turns it off), got '
                            f'{self.eval_freq}')
        if self.direction not in DIRECTIONS:
            raise UserError(f'--direction must be {" or ".join(DIRECTIONS)}, got {self.direction!r}')
        if self.input and self.phase != 'test':
            raise UserError(f'--input works with --phase test, not {self.phase}: add --phase test')
        for name in ('output', 'crop_face'):
            if getattr(self, name) and not self.input:
                raise UserError(f'--{name} works only with --input: add --input PATH (an image '
                                'file or a folder)')
        self._validate_distribute()
        if self.mixed_precision not in MIXED_PRECISION_POLICIES:
            raise UserError(f'--mixed_precision must be one of '
                            f'{", ".join(MIXED_PRECISION_POLICIES)}, got {self.mixed_precision!r}')
        if self.gan_type not in ops.GAN_TYPES:
            raise UserError(f'--gan_type {self.gan_type!r} is unknown: use one of '
                            f'{", ".join(ops.GAN_TYPES)}')
        factor = 2 ** N_DOWNSAMPLE
        if self.img_size % factor:
            fix = max(-(-self.img_size // factor) * factor, min_img_size(self.n_dis))
            raise UserError(f'--img_size must be divisible by {factor}, got {self.img_size}: '
                            f'try --img_size {fix}')
        side = global_map_side(self.img_size, self.n_dis)
        if side < MIN_GLOBAL_MAP:
            fits = [n for n in range(1, self.n_dis) if global_map_side(self.img_size, n) >= MIN_GLOBAL_MAP]
            fix = f'use --n_dis {fits[-1]} or less, or ' if fits else 'use '
            raise UserError(
                f'--img_size {self.img_size} is too small for --n_dis {self.n_dis}: the global '
                f'discriminator\'s last map would be {side} px and must be at least '
                f'{MIN_GLOBAL_MAP}; {fix}--img_size {min_img_size(self.n_dis)} or more')

    def _validate_distribute(self):
        """--distribute, --gpus and (for multi_worker) the TF_CONFIG environment variable."""
        if self.distribute not in DISTRIBUTE_MODES:
            raise UserError(f'--distribute must be one of {", ".join(DISTRIBUTE_MODES)}, got '
                            f'{self.distribute!r}')
        phases = DISTRIBUTED_PHASES.get(self.distribute)
        if phases and self.phase not in phases:
            raise UserError(f'--distribute {self.distribute} works with --phase '
                            f'{" or ".join(phases)}, not {self.phase}: drop --distribute')
        if self.gpus and self.distribute != 'mirrored':
            raise UserError('--gpus works only with --distribute mirrored')
        if self.gpus:
            indices = self.gpus.split(',')
            if not all(i.isdigit() for i in indices) or len(set(map(int, indices))) < len(indices):
                raise UserError(f'--gpus must list distinct GPU indices such as 0,1, got '
                                f'{self.gpus!r}')
        if self.distribute == 'multi_worker':
            tf_config_task()


@contextlib.contextmanager
def dtype_policy_scope(mixed_precision):
    """Layers made inside take the Keras dtype policy of `--mixed_precision` (`none`: the
    global policy, untouched); the global policy is restored on exit, so the setting
    never leaks into models made later in the process."""
    policy = MIXED_PRECISION_POLICIES[mixed_precision]
    if policy is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def tf_config_task():
    """(task type, index) of this process in the TF_CONFIG environment variable; UserError
    when it is missing or does not describe a worker of its cluster."""
    raw = os.environ.get(TF_CONFIG_ENV)
    hint = ('see "Several GPUs or machines" in README.md for an example')
    if not raw:
        raise UserError(f'--distribute multi_worker reads the cluster from the {TF_CONFIG_ENV} '
                        f'environment variable, which is not set: {hint}')
    try:
        spec = json.loads(raw)
        cluster, task_type, index = spec['cluster'], spec['task']['type'], spec['task']['index']
        hosts = cluster[task_type]
        if not isinstance(index, int) or not 0 <= index < len(hosts):
            raise IndexError(index)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f'{TF_CONFIG_ENV} must be JSON with "cluster" (job: [host:port, ...]) and '
                        f'"task" ({{"type", "index"}} of a listed host) ({type(err).__name__}: '
                        f'{err}): {hint}') from err
    if task_type not in WORKER_TASK_TYPES:
        raise UserError(f'{TF_CONFIG_ENV} task type {task_type!r} does not train: use '
                        f'{" or ".join(WORKER_TASK_TYPES)} (MultiWorkerMirroredStrategy)')
    return task_type, index


def mirrored_devices(gpus=''):
    """The devices of --distribute mirrored: the visible GPUs named by `gpus` ("0,1"), else
    every visible GPU, else every logical CPU device (one, unless split as the tests do)."""
    visible = [d.name for d in tf.config.list_logical_devices('GPU')]
    if gpus:
        indices = [int(i) for i in gpus.split(',')]
        missing = [i for i in indices if i >= len(visible)]
        if missing:
            raise UserError(f'--gpus {gpus}: no GPU {missing[0]} (this process sees '
                            f'{len(visible)} GPU{"s" if len(visible) != 1 else ""}; '
                            f'CUDA_VISIBLE_DEVICES renumbers them from 0)')
        return [visible[i] for i in indices]
    return visible or [d.name for d in tf.config.list_logical_devices('CPU')]


def make_strategy(config):
    """The tf.distribute strategy of `config.distribute`; for none the default strategy
    (one device, no replica logic: exactly the single-device path)."""
    if config.distribute == 'mirrored':
        devices = mirrored_devices(config.gpus)
        if len(devices) == 1:
            logging.warning('--distribute mirrored on one device (%s): it trains like '
                            '--distribute none, with extra overhead', devices[0])
        return tf.distribute.MirroredStrategy(devices)
    if config.distribute == 'multi_worker':
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


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

    def build(self, input_shape):
        pass  # sub-layers build on first call, inside this layer's scope

    def call(self, x):
        if self.light:
            x = tf.reduce_mean(x, axis=[1, 2])
        for layer in self.hidden:
            x = tf.nn.relu(layer(x))
        gamma, beta = self.gamma(x), self.beta(x)
        return gamma[:, None, None, :], beta[:, None, None, :]


def attend(cam, conv_1x1, activation, x):
    """The CAM block shared by G and D: x [B,h,w,C] -> (features [B,h,w,C'], cam_logit [B,2], heatmap [B,h,w]).

    Under mixed precision the classifier runs in full precision (its layer's policy)
    and the heat-map is summed in it too; the features stay in the compute dtype.
    """
    attended, cam_logit = cam(x)
    features = activation(conv_1x1(attended))
    heat = features if features.dtype == cam_logit.dtype else tf.cast(features, cam_logit.dtype)
    return features, cam_logit, tf.reduce_sum(heat, axis=-1)


def to_compute_dtype(layer, x):
    """The network entry: `x` in `layer`'s compute dtype (no op without mixed precision)."""
    return x if x.dtype == layer.compute_dtype else tf.cast(x, layer.compute_dtype)


class Generator(keras.Model):
    """ResNet generator with CAM attention and AdaLIN: [B,S,S,img_ch] -> [B,S,S,out_ch].

    `call(x)` returns (image in [-1, 1], cam_logit [B, 2], heatmap [B, S/4, S/4]);
    `forward(x)` returns every named activation (the reference data's keys).
    With `recompute`, the stem, each down-sampling stage, each residual block and
    each up-sampling stage is a gradient checkpoint (`tf.recompute_grad`): the
    backward pass keeps only the blocks' inputs and runs each block's forward
    again, trading about one more generator forward per update for most of the
    activation memory. The computation is the same, so are the results.
    """

    def __init__(self, ch=64, n_res=4, light=False, smoothing=True, out_ch=RGB_CHANNELS,
                 recompute=False, xla=False, **kwargs):
        super().__init__(**kwargs)
        self.recompute, self.xla = recompute, xla
        # Under a mixed policy the CAM classifier and the output conv keep full precision.
        full = self.dtype_policy.variable_dtype
        width = ch * 2 ** N_DOWNSAMPLE
        self.stem = ops.Conv(ch, 7, stride=1, pad=3, name='conv')
        self.stem_norm = ops.InstanceNorm(name='ins_norm')
        self.down = [ops.Conv(ch * 2 ** (i + 1), 3, stride=2, pad=1, name=f'conv_{i}')
                     for i in range(N_DOWNSAMPLE)]
        self.down_norm = [ops.InstanceNorm(name=f'ins_norm_{i}') for i in range(N_DOWNSAMPLE)]
        self.encoder_blocks = [
            ops.ResidualBlock(width, lambda: ops.InstanceNorm(name='instance_norm'),
                              name=f'resblock_{i}') for i in range(n_res)]
        self.cam = ops.CAMClassifier(name='CAM_logit', dtype=full)
        self.conv_1x1 = ops.Conv(width, 1, stride=1, name='conv_1x1')
        self.mlp = GammaBetaMLP(width, light, name='MLP')
        self.decoder_blocks = [
            ops.ResidualBlock(width, lambda: ops.AdaLIN(smoothing, name='instance_layer_norm'),
                              name=f'adaptive_resblock{i}') for i in range(n_res)]
        self.up = [ops.Conv(width // 2 ** (i + 1), 3, stride=1, pad=1, name=f'up_conv_{i}')
                   for i in range(N_DOWNSAMPLE)]
        self.up_norm = [ops.LIN(name=f'layer_ins_norm_{i}') for i in range(N_DOWNSAMPLE)]
        self.to_image = ops.Conv(out_ch, 7, stride=1, pad=3, name='G_logit', dtype=full)

    def build(self, input_shape):
        pass  # sub-layers build on first call, inside this model's scope

    def _segment(self, fn):
        """`fn` as a gradient checkpoint under `recompute`, else `fn` itself."""
        return tf.recompute_grad(fn) if self.recompute else fn

    def forward(self, x):
        """All named activations: stem, down{i}, res{k}, cam_logit, cam_gap_logit,
        cam_gmp_logit, cam_features, heatmap, gamma, beta, adares{k}, up{i}, fake."""
        out = {}
        x = to_compute_dtype(self, x)
        conv_norm_relu = lambda conv, norm: self._segment(lambda x: tf.nn.relu(norm(conv(x))))
        x = out['stem'] = conv_norm_relu(self.stem, self.stem_norm)(x)
        for i, (conv, norm) in enumerate(zip(self.down, self.down_norm)):
            x = out[f'down{i}'] = conv_norm_relu(conv, norm)(x)
        for k, block in enumerate(self.encoder_blocks):
            x = out[f'res{k}'] = self._segment(block)(x)
        x, out['cam_logit'], out['heatmap'] = attend(self.cam, self.conv_1x1, tf.nn.relu, x)
        out['cam_gap_logit'], out['cam_gmp_logit'] = tf.split(out['cam_logit'], 2, axis=-1)
        out['cam_features'] = x
        gamma, beta = out['gamma'], out['beta'] = self.mlp(x)
        for k, block in enumerate(self.decoder_blocks):
            x = out[f'adares{k}'] = self._segment(block)(x, gamma, beta)
        for i, (conv, norm) in enumerate(zip(self.up, self.up_norm)):
            up_conv = lambda x, conv=conv: conv(ops.up_sample(x, duplicate=self.xla))
            x = out[f'up{i}'] = conv_norm_relu(up_conv, norm)(x)
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
        full = self.dtype_policy.variable_dtype  # the CAM classifier and D_logit (see Generator)
        self.down = [ops.Conv(ch * 2 ** i, 4, stride=2, pad=1, spectral_norm=sn, name=f'conv_{i}')
                     for i in range(n_downsample)]
        channels = ch * 2 ** n_downsample
        self.conv_last = ops.Conv(channels, 4, stride=1, pad=1, spectral_norm=sn, name='conv_last')
        self.cam = ops.CAMClassifier(spectral_norm=sn, name='CAM_logit', dtype=full)
        self.conv_1x1 = ops.Conv(channels, 1, stride=1, name='conv_1x1')
        self.to_logit = ops.Conv(1, 4, stride=1, pad=1, spectral_norm=sn, name='D_logit',
                                 dtype=full)

    def build(self, input_shape):
        pass  # sub-layers build on first call, inside this layer's scope

    @staticmethod
    def _lrelu(x):
        return tf.nn.leaky_relu(x, LEAKY_SLOPE)

    def forward(self, x):
        """Named activations: features, cam_features, cam_logit, heatmap, logit."""
        x = to_compute_dtype(self, x)
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

    def build(self, input_shape):
        pass  # sub-layers build on first call, inside this model's scope

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
        newest = utils.newest_listed(path)
        candidates = []
        if newest:
            # The state file may hold absolute paths from another machine.
            candidates += [os.path.join(path, newest), os.path.join(path, os.path.basename(newest))]
        # Without a (readable) state file: the newest complete checkpoint, then any index.
        indexed = sorted(glob.glob(os.path.join(glob.escape(path), '*.index')),
                         key=lambda p: checkpoint_step(p[:-len('.index')]))
        candidates += list(reversed(utils.complete_checkpoints(path)))
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


def corrupt_checkpoint(prefix, err):
    """The UserError for a checkpoint that cannot be read."""
    return UserError(f'cannot read checkpoint {prefix}: it is corrupt or half-written '
                     f'({utils.error_text(err)}): move its files ({os.path.basename(prefix)}.*) '
                     'away to fall back to the one before it')


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
        if f'{disc}/global/conv_0/u' in shapes:
            found['sn'] = True
        elif f'{disc}/global/conv_0/conv2d/kernel' in shapes:
            found['sn'] = False
    return found


def adam_steps(beta1_power, beta2_power, fallback):
    """Adam's step count from TF1's beta powers β^(t+1).

    β1 = 0.5 gives exact powers of two until float32 underflows (~150 steps);
    then β2's power serves (~1e5 steps); after that bias correction is 1 in
    float32 and any large count is equivalent, so `fallback` is used.
    """
    for power, beta in ((float(beta1_power), ADAM_BETA1), (float(beta2_power), ADAM_BETA2)):
        if 0 < power < 1:
            return max(0, round(math.log(power) / math.log(beta)) - 1)
    return fallback


def _flag_value(value):
    return str(value) if not isinstance(value, bool) else ('True' if value else 'False')


# --- Evaluation: the paper's KID and FID ---------------------------------------------

def halves(outputs):
    """[x [2B, ...], ...] -> ([x[:B], ...], [x[B:], ...]): a batched call's two parts."""
    pairs = [tf.split(x, 2, axis=0) for x in outputs]
    return [first for first, _ in pairs], [second for _, second in pairs]


def kid_and_fid(real, fake):
    """The paper's figures between real [N_r, 2048] and translated [N_f, 2048] features:
    {'kid_x100_mean', 'kid_x100_std' (None with a single KID block), 'fid', 'n_translated',
    'n_real'}. Each set is first put in a fixed pseudo-random order: KID's blocks assume
    unordered sets (`ops.kernel_inception_distance`), and files come sorted by name.
    """
    order = np.random.default_rng(KID_ORDER_SEED)
    real, fake = order.permutation(real), order.permutation(fake)
    mean, std = ops.kernel_inception_distance(real, fake)
    return {'kid_x100_mean': KID_SCALE * mean,
            'kid_x100_std': KID_SCALE * std if np.isfinite(std) else None,
            'fid': ops.frechet_distance(real, fake),
            'n_translated': len(fake), 'n_real': len(real)}


# --- Export: a SavedModel per direction -------------------------------------------------

SERVING_KEY = 'serving_default'


class ServingModule(tf.Module):
    """One generator behind a serving signature, for `tf.saved_model.save`.

    `serve(images)`: uint8 RGB [N, H, W, 3], any H and W →
    {'translation': uint8 [N, S, S, img_ch], 'attention': float32 [N, S/4, S/4]}
    (S = img_size; attention is the raw CAM heatmap, as `UGATIT.translate` returns it).
    The steps are the test phase's with TF ops: bilinear resize to S × S with half-pixel
    centres and no antialiasing (OpenCV's INTER_LINEAR samples the same points; its 8-bit
    fixed-point arithmetic puts some pixels 1 grey level apart), rounded to 8 bits as
    OpenCV's uint8 result is, grey by `tf.image.rgb_to_grayscale` for img_ch 1, /127.5 − 1
    in float64, the generator, then ((x + 1) / 2 · 255) clipped and truncated as `to_uint8`.
    """

    def __init__(self, generator, img_size, img_ch, direction):
        super().__init__(name=f'ugatit_{direction}')
        self.generator = generator
        self._img_size, self._img_ch = img_size, img_ch

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, RGB_CHANNELS], tf.uint8,
                                                name='images')])
    def serve(self, images):
        size = self._img_size
        x = tf.image.resize(tf.cast(images, tf.float32), [size, size], method='bilinear',
                            antialias=False)
        x = tf.clip_by_value(tf.round(x), 0, 255)
        if self._img_ch == 1:
            x = tf.round(tf.image.rgb_to_grayscale(x))
        x = tf.cast(tf.cast(x, tf.float64) / utils.PIXEL_HALF_RANGE - 1, keras.config.floatx())
        fake, _, heatmap = self.generator(x)
        fake = tf.cast(fake, tf.float32)
        translation = tf.cast(tf.clip_by_value((fake + 1) / 2 * 255, 0, 255), tf.uint8)
        return {'translation': translation, 'attention': tf.cast(heatmap, tf.float32)}


# --- The model ----------------------------------------------------------------------

class UGATIT:
    """Two generators, two local+global discriminator pairs, and U-GAT-IT's losses."""

    def __init__(self, config):
        config.validate()
        self.config = c = config
        # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
        self.strategy = make_strategy(c)
        out_ch = c.img_ch  # the original hard-codes 3, the only value it can train with
        # Variables are mirrored on every replica; --mixed_precision sets the layers' policy.
        with self.strategy.scope(), dtype_policy_scope(c.mixed_precision):
            self.gen_a2b = Generator(c.ch, c.n_res, c.light, c.smoothing, out_ch, c.recompute,
                                     c.xla, name='generator_B')
            self.gen_b2a = Generator(c.ch, c.n_res, c.light, c.smoothing, out_ch, c.recompute,
                                     c.xla, name='generator_A')
            self.disc_a = MultiScaleDiscriminator(c.ch, c.n_dis, c.sn, name='discriminator_A')
            self.disc_b = MultiScaleDiscriminator(c.ch, c.n_dis, c.sn, name='discriminator_B')
            # Draws the gradient penalties' noise; its state goes into every checkpoint.
            # Under a strategy each replica draws its own stream (tf.random.Generator folds
            # the replica id into the key), as its own images would have their own noise.
            self.rng = (tf.random.Generator.from_seed(c.seed) if c.seed is not None
                        else tf.random.Generator.from_non_deterministic_state())
            self.build_model()
        self.g_opt = self.d_opt = None  # built by build_optimizers() (training only)
        self._inception = None          # built by inception() (evaluation only)
        self._demo_checked = False      # the demo dataset is checked (or made) once
        if self.distributed:
            # Inputs are per-replica values (`split_batch`, `_training_streams`), which a
            # TensorSpec signature cannot describe; their shapes are fixed within a run.
            self.d_step = tf.function(self._replicated(self._d_update), autograph=False,
                                      jit_compile=self.jit_compile)
            self.g_step = tf.function(self._replicated(self._g_update), autograph=False,
                                      jit_compile=self.jit_compile)
        else:
            dtype = keras.config.floatx()  # float32; float64 in the exactness tests
            image = tf.TensorSpec([None, c.img_size, c.img_size, c.img_ch], dtype)
            scalar = tf.TensorSpec([], dtype)
            # One graph each for the whole run (any batch size).
            self.d_step = tf.function(self._d_update, input_signature=[image, image, scalar],
                                      autograph=False, jit_compile=self.jit_compile)
            self.g_step = tf.function(self._g_update, input_signature=[image, image, scalar],
                                      autograph=False, jit_compile=self.jit_compile)

    @property
    def jit_compile(self):
        """tf.function's jit_compile: True under --xla, else None (TensorFlow's default)."""
        return True if self.config.xla else None

    # -- distribution --

    @property
    def distributed(self):
        """True under --distribute mirrored or multi_worker (even with a single replica)."""
        return self.config.distribute != 'none'

    @property
    def replicas(self):
        """Replicas in sync: every device of every worker (1 with --distribute none)."""
        return self.strategy.num_replicas_in_sync

    @property
    def task(self):
        """(task type, index) of this worker in TF_CONFIG; (None, 0) outside multi_worker."""
        resolver = self.strategy.cluster_resolver if self.distributed else None
        if resolver is None or not resolver.task_type:
            return None, 0
        return resolver.task_type, resolver.task_id or 0

    @property
    def is_chief(self):
        """True for the process that writes checkpoints, logs, summaries and samples: the
        only one outside multi_worker; else TF_CONFIG's `chief`, or worker 0 when there is
        no chief (the TF multi-worker guide's rule)."""
        task_type, task_id = self.task
        if task_type is None or task_type == 'chief':
            return True
        return task_id == 0 and 'chief' not in self.strategy.cluster_resolver.cluster_spec().jobs

    def split_batch(self, images):
        """A global batch [N·b, ...] as N per-replica batches of b: replica r gets rows
        r·b … r·b + b − 1 (every worker passes the whole global batch). Without a strategy,
        `images` itself."""
        if not self.distributed:
            return images
        images = tf.convert_to_tensor(images)
        per_replica = images.shape[0] // self.replicas
        if per_replica * self.replicas != images.shape[0]:
            raise ValueError(f'a batch of {images.shape[0]} does not split over '
                             f'{self.replicas} replicas')
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: images[ctx.replica_id_in_sync_group * per_replica:
                               (ctx.replica_id_in_sync_group + 1) * per_replica])

    def local_batch(self, values):
        """This worker's replicas' part of per-replica `values` as one tensor [Σ b, ...]
        (replica order); a plain tensor is returned as is."""
        parts = self.strategy.experimental_local_results(values)
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

    def _replicated(self, update):
        """`update(real_a, real_b, lr)` as one step on every replica: returns (its losses
        averaged over the replicas, which is over the global batch, and its extras as
        per-replica values). The optimizer sums the replicas' gradients (see `_update`)."""
        def step(real_a, real_b, lr):
            losses, extras = self.strategy.run(update, args=(real_a, real_b, lr))
            mean = lambda value: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            return {name: mean(value) for name, value in losses.items()}, extras
        return step

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
        image = tf.zeros([1, c.img_size, c.img_size, c.img_ch], keras.config.floatx())
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
        # One call on [real; fake]: every critic op is per image (no batch statistics), so
        # this is the original's two calls, but each spectrally normalised kernel is formed
        # and kept for the backward pass once, and the deep layers' small maps make
        # better matrix products at twice the batch.
        logits, cams = disc(tf.concat([real, fake], axis=0))
        real_logit, fake_logit = halves(logits)
        real_cam, fake_cam = halves(cams)
        loss = (ops.discriminator_loss(c.gan_type, real_logit, fake_logit)
                + ops.discriminator_loss(c.gan_type, real_cam, fake_cam))
        if ops.has_gradient_penalty(c.gan_type):
            if alpha is None:
                alpha = self.rng.uniform([tf.shape(real)[0], 1, 1, 1])
            if eps is None and c.gan_type == 'dragan':
                eps = self.rng.uniform(tf.shape(real))
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
        # D's gradient does not flow into the generators: stop it here rather than let the
        # tape keep their activations (same result as the original's var_list).
        fake_a2b = tf.stop_gradient(self.gen_a2b(real_a)[0])
        fake_b2a = tf.stop_gradient(self.gen_b2a(real_b)[0])
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

    # -- training steps --

    @property
    def factored_layers(self):
        """The full model's first γ/β MLP layer of each generator (a 1,048,576-row kernel at
        256 px), whose gradient `_update` forms as one product (`ops.factored_kernel_gradient`)."""
        return [] if self.config.light else [gen.mlp.hidden[0] for gen in self.generators]

    @property
    def g_vars(self):
        return [v for net in self.generators for v in net.trainable_weights]

    @property
    def d_vars(self):
        return [v for net in self.discriminators for v in net.trainable_weights]

    def build_optimizers(self):
        """The original's two Adam optimizers (G first), with their slots created now.

        With --mixed_precision float16 each is wrapped in a `LossScaleOptimizer` (dynamic
        loss scaling: float16 gradients would underflow); `adam(opt)` is the Adam inside,
        whose slots are float32 and named as without the wrapper.
        """
        if self.g_opt is None:
            def adam(name):
                opt = ops.Adam(
                    learning_rate=self.config.lr, beta_1=ADAM_BETA1, beta_2=ADAM_BETA2,
                    epsilon=ADAM_EPSILON, name=name)
                if self.config.mixed_precision == 'float16':
                    opt = keras.optimizers.LossScaleOptimizer(opt, name=f'{name}_loss_scale')
                return opt
            with self.strategy.scope():  # slots, step counts and lr mirrored like the weights
                self.g_opt, self.d_opt = adam('G_Adam'), adam('D_Adam')
                self.g_opt.build(self.g_vars)
                self.d_opt.build(self.d_vars)
        return self.g_opt, self.d_opt

    @staticmethod
    def adam(optimizer):
        """The Adam optimizer itself: inside the float16 loss-scale wrapper, or `optimizer`."""
        return getattr(optimizer, 'inner_optimizer', optimizer)

    def learning_rate(self, epoch):
        """The original's per-epoch linear decay: lr until decay_epoch, then down towards 0."""
        c = self.config
        if not c.decay_flag or epoch < c.decay_epoch:
            return c.lr
        return c.lr * (c.epoch - epoch) / (c.epoch - c.decay_epoch)

    def _update(self, optimizer, variables, compute, total, lr):
        """One optimizer step on `compute()[0][total]`; every SN `u` advances once.

        This is the only way the model updates, so the spectral-norm commit of
        `ops.power_iteration_step` cannot be skipped: D calls in the step read
        the start-of-step `u`, and `u` moves one power iteration per update
        (D step and G step alike, as the original's graph does). The optimizer
        applies the rho constraints right after the update.

        Under a strategy this runs on every replica (`_replicated`): the kernels
        are identical on all, so each replica computes the same new `u` (and `u`
        is an ONLY_FIRST_REPLICA variable, so the first replica's value is
        written everywhere) and the same clipped rho.
        """
        # The full model's 1 GiB MLP kernels: their gradient is formed once, from all calls.
        factored = [layer for layer in self.factored_layers
                    if any(v is layer.dense.kernel for v in variables)]
        with ops.power_iteration_step(*self.discriminators):
            with tf.GradientTape() as tape, ops.recording_calls(factored):
                losses, extras = compute()
                objective = losses[total]
                if self.replicas > 1:
                    # Every term is a mean over this replica's b images (the L2 term is
                    # the same on all), and the optimizer sums the replicas' gradients
                    # (Keras' TF optimizer all-reduces them): 1/N makes that sum the
                    # gradient of the mean over all N·b images, L2 counted once.
                    objective = objective / self.replicas
                if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                    objective = optimizer.scale_loss(objective)  # `apply` unscales
                calls = [layer.recorded_calls for layer in factored]
            products = [product for layer_calls in calls for _, product in layer_calls]
            grads = tape.gradient(objective, list(variables) + products)
            grads, product_grads = list(grads[:len(variables)]), grads[len(variables):]
            for layer, layer_calls in zip(factored, calls):
                index = next(i for i, v in enumerate(variables) if v is layer.dense.kernel)
                data_term = ops.factored_kernel_gradient(
                    layer_calls, product_grads[:len(layer_calls)], variables[index].dtype)
                product_grads = product_grads[len(layer_calls):]
                # The tape's own gradient of the kernel holds only its L2 term.
                grads[index] = data_term if grads[index] is None else grads[index] + data_term
            optimizer.learning_rate = lr
            optimizer.apply(grads, variables)
        return losses, extras

    def _d_update(self, real_a, real_b, lr):
        """One D update on one batch per domain: (losses dict, {})."""
        return self._update(self.d_opt, self.d_vars,
                            lambda: (self.discriminator_losses(real_a, real_b), {}),
                            'Discriminator_loss', lr)

    def _g_update(self, real_a, real_b, lr):
        """One G update on one batch per domain: (losses dict, fakes before the update)."""
        return self._update(self.g_opt, self.g_vars,
                            lambda: self.generator_losses(real_a, real_b),
                            'Generator_loss', lr)

    # -- checkpoints --

    def optimizer_state_by_name(self):
        """{original name: variable} of the Adam slots: `<var>/Adam` (m), `<var>/Adam_1` (v)."""
        state = {}
        for opt, variables in ((self.g_opt, self.g_vars), (self.d_opt, self.d_vars)):
            opt = self.adam(opt)
            for var in variables:
                index = opt._get_variable_index(var)
                state[var.path + '/Adam'] = opt._momentums[index]
                state[var.path + '/Adam_1'] = opt._velocities[index]
        return state

    def _beta_powers(self):
        """The original's beta1_power, beta2_power (G) and *_1 (D): β^(steps taken + 1)."""
        powers = {}
        for opt, suffix in ((self.g_opt, ''), (self.d_opt, '_1')):
            t = float(opt.iterations.numpy()) + 1
            powers[f'beta1_power{suffix}'] = np.float32(ADAM_BETA1 ** t)
            powers[f'beta2_power{suffix}'] = np.float32(ADAM_BETA2 ** t)
        return powers

    def checkpoint_state(self, counter):
        """{name: value} of everything a training checkpoint holds, under the original's names
        (networks, Adam slots, beta powers) plus our counter and RNG state."""
        state = {name: var.value for name, var in self.variables_by_name().items()}
        state.update({name: var.value for name, var in self.optimizer_state_by_name().items()})
        state.update(self._beta_powers())
        state[COUNTER_KEY] = np.int64(counter)
        state[RNG_KEY] = self.rng.state.value()
        return state

    def save_checkpoint(self, directory, counter):
        """Writes `directory/<model_name>.model-<counter>` in the original's format; returns it.

        The files are written under a temporary name and renamed, and the
        `checkpoint` state file is replaced last, so the newest complete
        checkpoint is always loadable (`utils.write_checkpoint`). Keeps the newest
        MAX_TO_KEEP of ours (a checkpoint we did not write, such as a released one,
        is never deleted). Raises UserError, writing nothing, if a weight or Adam
        slot is NaN or infinite: the last good checkpoint stays the newest.
        """
        state = self.checkpoint_state(counter)
        bad = [name for name, value in state.items() if tf.as_dtype(value.dtype).is_floating
               and not bool(tf.reduce_all(tf.math.is_finite(value)))]
        if bad:
            raise UserError(f'not saving after step {counter - 1}: {len(bad)} variable(s) hold '
                            f'NaN or infinite values (first: {bad[0]}); training diverged, and the '
                            'newest checkpoint is kept: resume from it with a lower --lr')
        return utils.write_checkpoint(directory, f'{self.config.model_name}.model-{counter}',
                                      state, MAX_TO_KEEP, COUNTER_KEY)

    def checkpoint_bytes(self):
        """The size of one training checkpoint: every network variable and the two Adam
        slots of each trainable one, as float32 (the beta powers and counters are a few bytes)."""
        values = (sum(int(np.prod(v.shape)) for v in self.variables_by_name().values())
                  + 2 * sum(int(np.prod(v.shape)) for v in self.g_vars + self.d_vars))
        return values * np.dtype(np.float32).itemsize

    def load_checkpoint(self, path, networks=None, optimizers=False):
        """Fills the networks by name from a checkpoint in the original's format.

        `path`: a folder (its latest checkpoint), a prefix or one of its files;
        `networks`: which networks to fill (default: all four; the test phase
        needs only the generators); `optimizers`: also restore the Adam slots,
        step counts and our RNG state when the checkpoint has them. Returns
        (prefix, unused keys). A missing key or a shape mismatch raises
        `UserError` naming the flag to change.
        """
        prefix = resolve_checkpoint(path)
        try:
            reader = tf.train.load_checkpoint(prefix)
        except (tf.errors.OpError, ValueError) as err:
            raise corrupt_checkpoint(prefix, err) from err
        shapes = reader.get_variable_to_shape_map()
        wanted = self.variables_by_name(networks)
        problems = [name for name, var in wanted.items()
                    if name not in shapes or list(shapes[name]) != list(var.shape)]
        problems += self._structure_problems(shapes, networks)
        if problems:
            raise UserError(self._mismatch_message(prefix, shapes, problems[0], wanted))
        try:  # read everything before assigning anything: a bad file changes nothing
            values = {name: reader.get_tensor(name) for name in wanted}
            slots = self._read_optimizer_state(reader, shapes, prefix) if optimizers else None
        except (tf.errors.OpError, ValueError, IndexError) as err:
            raise corrupt_checkpoint(prefix, err) from err
        for name, var in wanted.items():
            var.assign(tf.cast(values[name], var.dtype))
        if slots is not None:
            self._assign_optimizer_state(*slots)
        ours = self.variables_by_name()
        unused = sorted(name for name in shapes if name not in ours
                        and not OPTIMIZER_KEY.search(name) and name not in (COUNTER_KEY, RNG_KEY))
        if unused:
            logging.warning('checkpoint %s: %d keys not used: %s', prefix, len(unused),
                            ', '.join(unused))
        return prefix, unused

    def _structure_problems(self, shapes, networks):
        """Blocks the checkpoint has beyond ours (more res blocks or D layers): every key we
        need may be there, yet the network would run truncated."""
        found = infer_config(shapes)
        nets = networks or self.networks
        checks = [('n_res', self.generators)] + [('n_dis', self.discriminators)]
        return [f'{flag} differs' for flag, group in checks
                if flag in found and found[flag] != getattr(self.config, flag)
                and any(net in nets for net in group)]

    def _read_optimizer_state(self, reader, shapes, prefix):
        """(slot values, Adam step counts, RNG state) from a checkpoint; slots None if absent."""
        self.build_optimizers()
        names = self.optimizer_state_by_name()
        missing = [name for name in names if name not in shapes]
        slot_values, steps = None, None
        if missing:
            logging.warning('checkpoint %s has no optimizer state (%d Adam slots missing): '
                            'Adam starts afresh', prefix, len(missing))
        else:
            slot_values = {name: reader.get_tensor(name) for name in names}
            steps = [adam_steps(reader.get_tensor(f'beta1_power{suffix}'),
                                reader.get_tensor(f'beta2_power{suffix}'),
                                fallback=checkpoint_step(prefix)) for suffix in ('', '_1')]
        rng = reader.get_tensor(RNG_KEY) if RNG_KEY in shapes else None
        return slot_values, steps, rng

    def _assign_optimizer_state(self, slot_values, steps, rng):
        if slot_values is not None:
            for name, var in self.optimizer_state_by_name().items():
                var.assign(tf.cast(slot_values[name], var.dtype))
            for opt, count in zip((self.g_opt, self.d_opt), steps):
                opt.iterations.assign(count)
        if rng is not None:
            self.rng.reset(rng)

    # -- the training loop --

    def dataset_folder(self, split):
        """`dataset_dir/dataset/<split>`; the built-in `demo` dataset is made on first use."""
        c = self.config
        root = os.path.join(c.dataset_dir, c.dataset)
        if c.dataset == DEMO_DATASET and not self._demo_checked:
            utils.make_demo_dataset(root)
            self._demo_checked = True
        return os.path.join(root, split)

    def _restore_for_training(self, checkpoint_dir):
        """The counter to start from: resumes `checkpoint_dir`, else `--init_from`, else 1."""
        c = self.config
        if glob.glob(os.path.join(glob.escape(checkpoint_dir), '*.index')):
            prefix, _ = self.load_checkpoint(checkpoint_dir, optimizers=True)
            reader = tf.train.load_checkpoint(prefix)
            counter = (int(reader.get_tensor(COUNTER_KEY)) if reader.has_tensor(COUNTER_KEY)
                       else checkpoint_step(prefix))
            if c.init_from:
                logging.info('--init_from ignored: resuming the run already in %s', checkpoint_dir)
            logging.info('resuming from %s (step %d)', prefix, counter - 1)
            return max(counter, 1)
        if c.init_from:
            prefix, _ = self.load_checkpoint(c.init_from)
            logging.info('new run initialised from the weights of %s', prefix)
        return 1

    def _sample_images(self, real_a, real_b):
        """For the sample sheet: per direction, input, attention, translation, cycle, identity."""
        rows = {}
        for name, gen, gen_back, real_src, real_tgt in (
                ('A2B', self.gen_a2b, self.gen_b2a, real_a, real_b),
                ('B2A', self.gen_b2a, self.gen_a2b, real_b, real_a)):
            fake, _, heatmap = gen(real_src)
            rows[name] = {'input': real_src, 'heatmap': heatmap, 'translation': fake,
                          'cycle': gen_back(fake)[0], 'identity': gen(real_tgt)[0]}
        return rows

    def training_files(self):
        """{'A': files, 'B': files} of trainA/trainB; UserError if a folder is missing or empty."""
        return {d: utils.list_images(self.dataset_folder(f'train{d}')) for d in 'AB'}

    def _training_streams(self, files, seed):
        """{'A': iterator, 'B': iterator} of training batches of --batch_size images per replica.

        Without a strategy: tensors [batch_size, S, S, img_ch] (`utils.build_dataset`).
        Under one: per-replica values (`strategy.distribute_datasets_from_function`). Each
        worker's input pipeline reads its own share of the files (every n-th, n = workers)
        with its own seed; the replicas of one worker take consecutive batches of it, so
        every replica sees different images.
        """
        c = self.config

        def stream(domain, seed):
            def dataset(context=None):
                shard, shards = ((context.input_pipeline_id, context.num_input_pipelines)
                                 if context else (0, 1))
                # (one pipeline: utils.build_dataset checks the readable images itself)
                if shards > 1 and len(files[domain]) < shards * c.batch_size:
                    raise UserError(f'train{domain} holds {len(files[domain])} images: {shards} '
                                    f'workers need at least {shards * c.batch_size} (one batch '
                                    'each); add images or lower --batch_size')
                return utils.build_dataset(
                    files[domain][shard::shards], c.img_size, c.img_ch, c.batch_size,
                    c.augment_flag, None if seed is None else seed + N_DOMAINS * shard)
            if not self.distributed:
                return iter(dataset())
            return iter(self.strategy.distribute_datasets_from_function(dataset))

        return {d: stream(d, None if seed is None else seed + i) for i, d in enumerate('AB')}

    def _check_workers_agree(self, counter, checkpoint_dir):
        """multi_worker: UserError unless every worker resumes at the same step. Each worker
        reads checkpoint_dir itself, so it must be storage they share (or a copy of the
        chief's run folder); the values are all-gathered, so all workers raise together."""
        if self.config.distribute != 'multi_worker':
            return
        counters = self.strategy.gather(
            self.strategy.experimental_distribute_values_from_function(
                lambda context: tf.constant([counter], tf.int64)), axis=0).numpy()
        if counters.min() != counters.max():
            raise UserError(f'the workers would resume at different steps ('
                            f'{", ".join(str(int(n) - 1) for n in counters)}): put '
                            f'{checkpoint_dir} on storage every worker reads, or copy the '
                            "chief's run folder to each worker")

    def train(self, on_start=None):
        """The original's `train()`: n_critic D updates per G update, per-epoch lr decay,
        samples every print_freq and checkpoints every save_freq steps, resumable.

        The images and the checkpoint to resume are checked, and the output folders made,
        before anything is written; then `on_start()` is called. A first SIGINT or SIGTERM
        stops after the current step with a checkpoint (then `utils.Interrupted` is raised);
        a loss or weight that is not finite stops with a UserError and saves nothing.
        Under --distribute every worker runs this loop in step with the others; only the
        chief writes checkpoints, the loss history, TensorBoard summaries, samples and
        evaluations, and prints the progress line (see `_save` for the other workers).
        """
        c = self.config
        chief = self.is_chief
        files = self.training_files()
        checkpoint_dir = os.path.join(c.checkpoint_dir, c.model_dir)
        sample_dir = os.path.join(c.sample_dir, c.model_dir)
        log_dir = os.path.join(c.log_dir, c.model_dir)
        self.build_optimizers()
        if chief:
            utils.remove_partial_checkpoints(checkpoint_dir)
        counter = self._restore_for_training(checkpoint_dir)
        self._check_workers_agree(counter, checkpoint_dir)
        steps_done = counter - 1
        # A resumed run draws a new (seeded) data order: tf.data keeps no position.
        seed = None if c.seed is None else c.seed + steps_done
        data = self._training_streams(files, seed)
        if chief:
            size = self.checkpoint_bytes()
            utils.check_free_space(
                checkpoint_dir, (MAX_TO_KEEP + 1) * size - utils.checkpoints_size(checkpoint_dir),
                f'the {MAX_TO_KEEP} checkpoints kept and the one being written '
                f'({utils.format_bytes(size)} each)')
        checkpoint_dir = utils.check_folder(checkpoint_dir, '--checkpoint_dir')
        if chief:
            utils.check_folder(sample_dir, '--sample_dir')
            utils.check_folder(log_dir, '--log_dir')
        if on_start:
            on_start()
        writer = (tf.summary.create_file_writer(log_dir) if chief
                  else tf.summary.create_noop_writer())
        write_scalars, write_rho = self._summary_writers(writer)
        evaluate = self._training_evaluator(writer) if c.eval_freq and chief else None
        history = utils.LossHistory(os.path.join(log_dir, 'losses.jsonl')) if chief else None
        progress = utils.Progress(c.epoch * c.iteration, steps_done, quiet=not chief)
        sample_fn = tf.function(self._sample_images, autograph=False)
        saved_at = counter if steps_done else None
        real_a = real_b = fakes = None
        last_g_loss = -1.0  # printed until the first G step, as the original
        start_epoch, start_batch = divmod(steps_done, c.iteration)
        stop = utils.StopRequests()
        try:
            for epoch in range(start_epoch, c.epoch):
                lr = tf.constant(self.learning_rate(epoch), tf.float32)
                for idx in range(start_batch, c.iteration):
                    d_losses, _ = self.d_step(next(data['A']), next(data['B']), lr)
                    step = tf.constant(counter, tf.int64)
                    write_scalars(step, d_losses)
                    logged = self._check_finite(d_losses, counter)
                    if (counter - 1) % c.n_critic == 0:
                        real_a, real_b = next(data['A']), next(data['B'])
                        write_rho(step)  # rho at the start of the G step, as the original
                        g_losses, fakes = self.g_step(real_a, real_b, lr)
                        write_scalars(step, g_losses)
                        logged.update(self._check_finite(g_losses, counter))
                    if chief:
                        history.append(counter, logged)
                    counter += 1
                    progress.update(epoch, idx, c.iteration, logged['Discriminator_loss'],
                                    logged.get('Generator_loss', last_g_loss))
                    last_g_loss = logged.get('Generator_loss', last_g_loss)
                    if chief and (idx + 1) % c.print_freq == 0 and real_a is not None:
                        self._write_samples(sample_dir, f'{epoch:03d}_{idx + 1:05d}', step,
                                            writer, sample_fn, real_a, real_b, fakes)
                    if (idx + 1) % c.save_freq == 0:
                        saved_at = self._save(checkpoint_dir, counter, history, progress)
                    if evaluate is not None and (idx + 1) % c.eval_freq == 0:
                        progress.note(evaluate(step))
                    stop.check()  # between steps: every counter and optimizer agrees
                start_batch = 0
                if saved_at != counter:
                    saved_at = self._save(checkpoint_dir, counter, history, progress)
        except utils.Interrupted:
            if saved_at != counter and counter > 1:
                self._save(checkpoint_dir, counter, history, progress)
            raise
        finally:  # a second signal (KeyboardInterrupt) stops at once, without saving
            stop.restore()
            progress.close()
            writer.close()
        return counter

    def _write_samples(self, sample_dir, tag, step, writer, sample_fn, real_a, real_b, fakes):
        """The original's real_A/fake_B files and our sample sheet (also to TensorBoard), from
        the last G step's inputs and fakes (this worker's replicas' images, stacked)."""
        real_a, real_b = self.local_batch(real_a), self.local_batch(real_b)
        fake_b = self.local_batch(fakes['fake_B']).numpy()
        grid = [len(fake_b), 1]
        utils.save_images(real_a.numpy(), grid, os.path.join(sample_dir, f'real_A_{tag}.png'))
        utils.save_images(fake_b, grid, os.path.join(sample_dir, f'fake_B_{tag}.png'))
        sheet = utils.sample_sheet(tf.nest.map_structure(lambda t: t.numpy(),
                                                         sample_fn(real_a, real_b)))
        utils.write_image(os.path.join(sample_dir, f'sheet_{tag}.png'), sheet)
        with writer.as_default(step=step):
            tf.summary.image('samples', sheet[None], max_outputs=1)

    def _save(self, checkpoint_dir, counter, history, progress):
        """The chief writes a checkpoint into `checkpoint_dir` and refreshes the loss plot.
        Another worker writes its own into a scratch folder and deletes it at once, as the
        TF multi-worker guide does: every worker takes part in a save, so a variable whose
        value needs all of them could never hang the chief."""
        if self.is_chief:
            prefix = self.save_checkpoint(checkpoint_dir, counter)
            history.plot(os.path.join(os.path.dirname(history.path), 'losses.png'))
            progress.note(f'saved {prefix}')
        else:
            scratch = os.path.join(checkpoint_dir, utils.TMP_PREFIX
                                   + WORKER_SCRATCH.format(task_id=self.task[1]))
            try:
                self.save_checkpoint(scratch, counter)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return counter

    @staticmethod
    def _check_finite(losses, counter):
        """The losses as floats; raises UserError if one is NaN or infinite."""
        values = {k: float(v) for k, v in losses.items()}
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:
            raise UserError(f'training diverged at step {counter}: {", ".join(bad)} '
                            f'{"is" if len(bad) == 1 else "are"} not finite; nothing of this '
                            'step was saved and the newest checkpoint is kept: resume from it '
                            'with a lower --lr')
        return values

    def _summary_writers(self, writer):
        """Compiled TensorBoard writers with the original's tags: (scalars(step, losses),
        rho(step): a histogram and _min/_max/_mean of every rho, tagged `…/rho_0`)."""
        rhos = [(v.path + '_0', v) for net in self.generators for v in net.trainable_weights
                if v.path.endswith('/rho')]

        @tf.function(autograph=False)
        def scalars(step, losses):
            with writer.as_default(step=step):
                for name, value in losses.items():
                    tf.summary.scalar(name, value)

        @tf.function(autograph=False)
        def rho(step):
            with writer.as_default(step=step):
                for tag, var in rhos:
                    tf.summary.histogram(tag, var)
                    tf.summary.scalar(tag + '_min', tf.reduce_min(var))
                    tf.summary.scalar(tag + '_max', tf.reduce_max(var))
                    tf.summary.scalar(tag + '_mean', tf.reduce_mean(var))

        return scalars, rho

    # -- the test phase --

    def translate(self, images, direction):
        """Translates [B, S, S, img_ch] images in [-1, 1]: (translations, heatmaps [B, S/4, S/4])."""
        if not hasattr(self, '_translate'):
            spec = tf.TensorSpec([None, self.config.img_size, self.config.img_size,
                                  self.config.img_ch], keras.config.floatx())
            self._translate = {
                name: tf.function(lambda x, g=gen: g(x)[::2], input_signature=[spec],
                                  jit_compile=self.jit_compile)
                for name, gen in (('A2B', self.gen_a2b), ('B2A', self.gen_b2a))}
        fake, heatmap = self._translate[direction](images)
        return fake.numpy(), heatmap.numpy()

    def load_for_inference(self):
        """Loads the generators from --checkpoint, else the newest in checkpoint_dir/model_dir."""
        c = self.config
        path = c.checkpoint or os.path.join(c.checkpoint_dir, c.model_dir)
        if not c.checkpoint and not os.path.isdir(path):
            raise UserError(f'no checkpoint folder {path}: train with the same flags first, put '
                            'a checkpoint there, or name one with --checkpoint')
        prefix, _ = self.load_checkpoint(path, networks=self.generators)
        logging.info('loaded the generators of %s', prefix)
        return prefix

    def test(self):
        """The original's `test()`: testA through A→B and testB through B→A.

        Writes `result_dir/model_dir/{A2B,B2A}/<name>` (the translations),
        `…/input/<name>` (what the generator saw), `…/attention/<name>` (the
        CAM heatmap over the input) and `index.html`. Returns the page's path.
        An image that cannot be read is skipped with a warning naming it.
        """
        self.load_for_inference()
        sections = self._test_translations(self._test_inputs())
        page = utils.write_index_html(self.result_root, sections, self.config.img_size)
        if self.config.dataset == DEMO_DATASET:
            self.demo_score(dict(sections))
        return page

    def demo_score(self, sections):
        """`--dataset demo`: the share of translations that a small classifier, trained on the
        real demo images only, puts in the target domain. Prints one line, writes
        `result_dir/model_dir/demo_score.json` and returns its dict (see `utils.demo_score`)."""
        c = self.config
        path = os.path.join(self.result_root, utils.DEMO_SCORE_FILE)
        score = utils.demo_score(os.path.dirname(self.dataset_folder('trainA')),
                                 [row['output'] for row in sections['A2B']],
                                 [row['output'] for row in sections['B2A']],
                                 c.img_size, c.img_ch, path)
        shapes = utils.DEMO_SHAPES
        print(f'demo score: {score["A2B_classified_B"]:.0%} of A2B translations look like B '
              f'({shapes["B"]}s), {score["B2A_classified_A"]:.0%} of B2A like A ({shapes["A"]}s) '
              f'(the classifier is right on {score["classifier_accuracy_real_test"]:.0%} of the '
              f'real test images; {path})', flush=True)
        return score

    @property
    def result_root(self):
        """result_dir/model_dir: the test phase's outputs, index.html and metrics.json."""
        return os.path.join(self.config.result_dir, self.config.model_dir)

    def _test_inputs(self):
        """{direction: the files of its test split}; both folders are checked before anything
        is written."""
        inputs = {d: utils.list_images(self.dataset_folder(source))
                  for d, (source, _) in TEST_SPLITS.items()}
        utils.check_folder(self.result_root, '--result_dir')
        return inputs

    def _test_translations(self, inputs, reuse_since=None):
        """Translates `inputs` ({direction: files}) into result_dir/model_dir/<direction>/;
        returns the index sections [(direction, rows)]. With `reuse_since` (a time stamp),
        a direction whose outputs are all current (`utils.current_translations`) is kept."""
        sections = []
        for direction, files in inputs.items():
            out_dir = os.path.join(self.result_root, direction)
            rows = None
            if reuse_since is not None:
                rows = utils.current_translations(out_dir, files, reuse_since, self.config.img_size)
            if rows is None:
                rows = self.translate_files(files, out_dir, direction)
            else:
                print(f'{direction}: reusing the {len(rows)} translations in {out_dir} (newer '
                      'than the checkpoint)', flush=True)
            sections.append((direction, rows))
        return sections

    def _translate_batches(self, files, direction, read=None, skipped=None):
        """Per --batch_size batch of image files: (paths, inputs [B, S, S, img_ch] in [-1, 1],
        translations, heatmaps [B, S/4, S/4]).

        `read(path)` gives the model input (default: `utils.load_test_image`). A file it
        cannot read goes to the list `skipped` as (path, UserError); without that list, or
        for a single file, the error is raised.
        """
        c = self.config
        read = read or (lambda path: utils.load_test_image(path, c.img_size, c.img_ch))
        for start in range(0, len(files), c.batch_size):
            batch, images = [], []
            for path in files[start:start + c.batch_size]:
                try:
                    images.append(read(path))
                    batch.append(path)
                except UserError as err:
                    if skipped is None or len(files) == 1:
                        raise
                    skipped.append((path, err))
            if batch:
                images = np.stack(images)
                yield (batch, images, *self.translate(images, direction))

    def translate_files(self, files, out_dir, direction, read=None, names=None, source=None):
        """Translates image files in batches of --batch_size; returns the index rows.

        `read(path)` gives the model input (default: `utils.load_test_image`); a file it
        cannot read is skipped with a warning naming it (a single file is an error), and
        UserError (one line, no warning) is raised if none can be read. `names`: {path:
        output name} (default: the file name); `source`: where the files are, for that
        error (default: their folder).
        """
        rows, skipped = [], []
        for batch, images, fakes, heatmaps in self._translate_batches(files, direction, read,
                                                                      skipped):
            for path, image, fake, heatmap in zip(batch, images, fakes, heatmaps):
                name = names[path] if names else os.path.basename(path)
                rows.append(utils.save_translation(out_dir, name, image, fake, heatmap))
            print(f'{direction}: {len(rows) + len(skipped)}/{len(files)}', flush=True)
        if not rows:
            shown = ', '.join(os.path.basename(path) for path, _ in skipped[:utils.NAMES_SHOWN])
            raise UserError(f'none of the {len(files)} images in '
                            f'{source or os.path.dirname(files[0])} can be read ({shown}'
                            f'{", ..." if len(skipped) > utils.NAMES_SHOWN else ""}): replace '
                            'them with JPEG, PNG, BMP, WebP or TIFF files')
        for _, err in skipped:
            logging.warning('%s; skipped', err)
        return rows

    # -- evaluation: KID and FID (--phase eval, --eval_freq) --

    def inception(self):
        """The evaluation's feature extractor (`utils.load_inception`), built on first use."""
        if self._inception is None:
            self._inception = utils.load_inception(self.config.inception_weights)
        return self._inception

    def _eval_files(self):
        """({direction: test files to translate}, {direction: real files of its target domain});
        UserError when a folder holds fewer than the 2 images KID and FID need."""
        inputs = self._test_inputs()
        reals = {d: inputs[other] for d, other in (('A2B', 'B2A'), ('B2A', 'A2B'))}
        for files in inputs.values():
            if len(files) < ops.MIN_PER_BLOCK:
                raise UserError(f'{os.path.dirname(files[0])} holds {len(files)} image: KID and '
                                f'FID need at least {ops.MIN_PER_BLOCK} in each test folder')
        return inputs, reals

    def evaluate(self):
        """`--phase eval`: the paper's KID × 100 (mean ± std) and FID, per direction.

        Loads the generators as the test phase does. The translations are the test phase's
        outputs when all of them are newer than the checkpoint; otherwise the test images are
        translated again, and written, as the test phase does. A2B's translations are
        compared with the real testB images, B2A's with testA, by their InceptionV3 features
        (`utils.InceptionFeatures`, cached per folder) and `kid_and_fid`. Writes
        result_dir/model_dir/metrics.json and the figures into its index.html, prints a
        table, and returns the path of metrics.json.
        """
        extractor = self.inception()  # weights problems surface before any other work
        prefix = self.load_for_inference()
        inputs, reals = self._eval_files()
        sections = self._test_translations(inputs, reuse_since=os.path.getmtime(prefix + '.index'))
        record = {'checkpoint': prefix, 'kid_max_block_size': ops.KID_MAX_BLOCK_SIZE}
        for direction, rows in sections:
            fake = extractor.of_files([row['output'] for row in rows])
            record[direction] = {
                **kid_and_fid(extractor.of_files(reals[direction]), fake),
                'translated': os.path.join(self.result_root, direction),
                'real': os.path.dirname(reals[direction][0]),
                'weights': extractor.description}
        path = os.path.join(self.result_root, METRICS_FILE)
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=2, allow_nan=False)
        figures = {d: record[d] for d in TEST_SPLITS}
        note = (f'Translations against the real test images of the target domain (A2B: testB, '
                f'B2A: testA); lower is better. KID blocks of at most {ops.KID_MAX_BLOCK_SIZE}. '
                f'Checkpoint {prefix}; InceptionV3 weights {extractor.description}.')
        print(utils.metrics_table(figures))
        print(note)
        utils.write_index_html(self.result_root, sections, self.config.img_size, figures, note)
        return path

    def _training_evaluator(self, writer):
        """For --eval_freq: a function evaluate(step) that computes KID and FID of the current
        generators, logs them as `eval/<direction>/<figure>` TensorBoard scalars and returns a
        one-line summary. The test images are translated in memory, to uint8 as the test
        phase would write them; nothing is written, so result_dir keeps the test phase's
        outputs. The weights are loaded and the real images' features computed (or read from
        their cache) now, so that a problem stops the run before its first step."""
        extractor = self.inception()
        inputs, reals = self._eval_files()
        real_features = {d: extractor.of_files(files) for d, files in reals.items()}

        def evaluate(step):
            figures = {}
            for direction, files in inputs.items():
                fakes = [utils.to_uint8(fake) for *_, batch_fakes, _ in  # unreadable: skipped
                         self._translate_batches(files, direction, skipped=[])
                         for fake in batch_fakes]
                figures[direction] = kid_and_fid(real_features[direction], extractor(fakes))
            with writer.as_default(step=step):
                for direction, values in figures.items():
                    for name in ('kid_x100_mean', 'kid_x100_std', 'fid'):
                        if values[name] is not None:
                            tf.summary.scalar(f'eval/{direction}/{name}', values[name])
            return f'eval at step {int(step)}: ' + '; '.join(
                f'{d} KID×100 {kid}, FID {fid}' for d, kid, fid, *_ in utils.metric_rows(figures))

        return evaluate

    # -- own images (--input) and export --

    def translate_input(self):
        """`--input`: translates an image file, or the images of a folder, with `--direction`.

        Loads the generators as the test phase does, then per image: read it with OpenCV
        (any size and format; grey and RGBA become RGB), with `--crop_face` cut a square
        around the largest face (the whole image, with a warning, when there is none),
        resize to img_size and translate. Writes into `Config.input_output_dir`:
        `<stem>.png` (the translation), `input/<stem>.png` (what the generator saw),
        `attention/<stem>.png` and `index.html`; returns the page's path. An unreadable
        file in a folder is skipped with a warning; a single unreadable file is an error.
        Nothing is written before the inputs are listed, --output is checked to overwrite
        none of them, and the checkpoint is loaded.
        """
        c = self.config
        files = utils.list_input_images(c.input)
        out_dir, names = c.input_output_dir, utils.output_names(files)
        sources = {os.path.realpath(f): f for f in files}
        for name in names.values():
            for sub in ('', 'input', 'attention'):
                clash = sources.get(os.path.realpath(os.path.join(out_dir, sub, name)))
                if clash:
                    raise UserError(f'--output {out_dir} would overwrite the input {clash}: '
                                    'choose another --output')
        detector = utils.face_detector() if c.crop_face else None
        self.load_for_inference()
        utils.check_folder(out_dir, '--output' if c.output else '--result_dir')
        rows = self.translate_files(files, out_dir, c.direction,
                                    read=lambda path: self.read_input(path, detector),
                                    names=names, source=c.input)
        return utils.write_index_html(out_dir, [(f'{c.direction}: {c.input}', rows)], c.img_size)

    def read_input(self, path, detector=None):
        """One `--input` file → float32 [S, S, img_ch] in [-1, 1]; with a face `detector`,
        the square around the largest face (logs a warning when it finds none)."""
        rgb = utils.read_image_rgb(path)
        if detector is not None:
            rgb, box = utils.crop_face(rgb, detector)
            if box is None:
                logging.warning('no face found in %s: translating the whole image', path)
            else:
                logging.info('face in %s at x=%d y=%d w=%d h=%d', path, *box)
        return utils.to_model_input(rgb, self.config.img_size, self.config.img_ch)

    def export(self):
        """`--phase export`: a SavedModel per direction in `Config.export_dir/{A2B,B2A}`.

        Loads the generators as the test phase does and saves each behind a serving
        signature (`ServingModule`): no discriminator, no optimizer state. Each folder is
        written under a temporary name and then swapped in, so an earlier export stays
        whole until the new one is. Returns the export folder.
        """
        prefix = self.load_for_inference()
        root = self.config.export_dir
        for direction, generator in zip(DIRECTIONS, self.generators):
            module = ServingModule(generator, self.config.img_size, self.config.img_ch, direction)
            final = os.path.join(root, direction)
            tmp, old = (os.path.join(root, f'{utils.TMP_PREFIX}{direction}{suffix}')
                        for suffix in ('', '.old'))
            for path in (tmp, old):
                shutil.rmtree(path, ignore_errors=True)
            try:
                utils.check_folder(root)
                verbosity = logging.get_verbosity()
                logging.set_verbosity(logging.WARNING)  # TF's saver logs a dozen INFO lines
                try:
                    tf.saved_model.save(module, tmp, signatures={SERVING_KEY: module.serve})
                finally:
                    logging.set_verbosity(verbosity)
                if os.path.exists(final):
                    os.replace(final, old)
                os.replace(tmp, final)
            except (OSError, tf.errors.OpError) as err:
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f'cannot write the SavedModel {final}: '
                                f'{getattr(err, "message", err)}') from err
            shutil.rmtree(old, ignore_errors=True)
            logging.info('exported %s of %s to %s', direction, prefix, final)
        return root

    # -- the benchmark phase --

    def benchmark(self):
        """`--phase benchmark`: times the compiled steps on generated images (no dataset
        needed) and returns the figures (and writes them to --benchmark_json).

        After one warm-up (which traces), `--benchmark_steps` runs each of: a D update,
        a G update (their sum is a training iteration at n_critic 1), an A→B translation.
        With --distribute mirrored the steps run on every replica, each with --batch_size
        images (the translation takes the whole batch on one device).
        FLOP are counted from the traced graphs (`utils.graph_flops`: convolutions and
        matrix products, gradients included); the machine's peak is a matrix product
        timed in the same run; the input pipeline is timed on its own.
        """
        c = self.config
        floatx = keras.config.floatx()
        rng = np.random.default_rng(BENCHMARK_SEED)
        batch = c.batch_size * self.replicas   # --batch_size per replica
        shape = (batch, c.img_size, c.img_size, c.img_ch)
        real_a, real_b, real_a2, real_b2 = (tf.constant(rng.uniform(-1, 1, shape), floatx)
                                            for _ in range(4))
        lr = tf.constant(c.lr, floatx)
        self.build_optimizers()
        step_inputs = {self.d_step: [self.split_batch(x) for x in (real_a, real_b)] + [lr],
                       self.g_step: [self.split_batch(x) for x in (real_a2, real_b2)] + [lr]}

        def d_update():
            self.d_step(*step_inputs[self.d_step])[0]['Discriminator_loss'].numpy()

        def g_update():
            self.g_step(*step_inputs[self.g_step])[0]['Generator_loss'].numpy()

        start = time.perf_counter()
        d_update(), g_update(), self.translate(real_a, 'A2B')   # warm-up: traces each once
        trace_s = time.perf_counter() - start
        d_times, g_times = [], []
        for _ in range(c.benchmark_steps):
            d_times += utils.time_calls(d_update, 1)
            g_times += utils.time_calls(g_update, 1)
        iteration_times = [d + g for d, g in zip(d_times, g_times)]
        translate_times = utils.time_calls(lambda: self.translate(real_a, 'A2B'),
                                           c.benchmark_steps)
        peak_rss = utils.peak_rss_bytes()   # before the pipeline and the matmul probe
        # Counted on graphs traced at the inputs' own shapes: the steps' signatures leave the
        # batch unknown, which would hide the critics' [real; fake] batch of 2B.
        traced = lambda fn, *inputs: tf.function(fn, autograph=False).get_concrete_function(
            *inputs).graph
        train_flop = sum(utils.graph_flops(traced(step.python_function, *inputs), batch)
                         for step, inputs in step_inputs.items())
        translate_flop = utils.graph_flops(
            traced(self._translate['A2B'].python_function, real_a), batch)
        pipeline = self._benchmark_pipeline()
        peak = utils.machine_peak_gflops()
        iteration = utils.timing_summary(iteration_times)
        achieved = train_flop / iteration['median'] / 1e9
        count_bytes = lambda variables: int(sum(v.numpy().nbytes for v in variables))
        slots = [v for opt in (self.g_opt, self.d_opt) for v in opt.variables
                 if len(v.shape) > 0]
        gpus = tf.config.list_logical_devices('GPU')
        figures = {
            'config': dataclasses.asdict(c),
            'device': gpus[0].name if gpus else 'CPU',
            'trace_s': trace_s,
            'train_iteration_s': iteration['median'],
            'train_iteration_s_range': [iteration['min'], iteration['max']],
            'd_update_s': utils.timing_summary(d_times)['median'],
            'g_update_s': utils.timing_summary(g_times)['median'],
            'translate_s': utils.timing_summary(translate_times)['median'],
            'translate_s_range': [min(translate_times), max(translate_times)],
            'replicas': self.replicas,
            'images_per_s': batch / iteration['median'],
            'translate_images_per_s': batch / float(np.median(translate_times)),
            'train_iteration_gflop': train_flop / 1e9,
            'translate_gflop': translate_flop / 1e9,
            'achieved_gflops': achieved,
            'machine_peak_gflops': peak,
            'peak_share': achieved / peak,
            'parameter_bytes': count_bytes(self.g_vars + self.d_vars),
            'optimizer_state_bytes': count_bytes(slots),
            'peak_rss_bytes': peak_rss,
            'peak_device_bytes': (tf.config.experimental.get_memory_info('GPU:0')['peak']
                                  if gpus else None),
            'pipeline_images_per_s': pipeline,
            'steps_timed': c.benchmark_steps,
        }
        print(utils.benchmark_table(figures), flush=True)
        if c.benchmark_json:
            utils.check_folder(os.path.dirname(os.path.abspath(c.benchmark_json)))
            with open(c.benchmark_json, 'w', encoding='utf-8') as f:
                json.dump(figures, f, indent=2)
                f.write('\n')
        return figures

    def _benchmark_pipeline(self):
        """Decoded, augmented training images per second from `utils.build_dataset`, on
        trainA of --dataset when it exists, else on generated noise JPEGs."""
        c = self.config
        folder = os.path.join(c.dataset_dir, c.dataset, 'trainA')
        with tempfile.TemporaryDirectory() as tmp:
            files = (utils.list_images(folder) if os.path.isdir(folder) else
                     utils.write_noise_images(tmp, BENCHMARK_PIPELINE_FILES, c.img_size))
            batches = iter(utils.build_dataset(files, c.img_size, c.img_ch, c.batch_size,
                                               c.augment_flag, BENCHMARK_SEED))
            next(batches)  # warm-up: the first batch waits for the shuffle buffer
            seconds = sum(utils.time_calls(lambda: next(batches), BENCHMARK_PIPELINE_BATCHES))
        return BENCHMARK_PIPELINE_BATCHES * c.batch_size / seconds

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
        if first_problem not in shapes and not any(n.startswith('discriminator') for n in shapes):
            return (f'checkpoint {prefix} holds only the generators: use it for --phase test, '
                    'not to resume training')
        if first_problem not in shapes:
            return (f'checkpoint {prefix} has no variable {first_problem}: it was not written '
                    'by U-GAT-IT with these flags')
        return (f'checkpoint {prefix}: {first_problem} is '
                f'{"×".join(map(str, shapes[first_problem]))}, this model expects '
                f'{"×".join(map(str, wanted[first_problem].shape))}')
