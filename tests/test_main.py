"""Tests of main.py (flags, errors, one train → resume → test run) and of UGATIT's training steps.

Spec §1 (flags, run folders), §7–§13 (training loop, checkpoints, samples, test phase).
Flags are parsed in-process (each test starts from unparsed flags and restores them);
the command-line flow runs main.py in four subprocesses (train, resume with --eval_freq,
test, eval) plus one for the test phase without a checkpoint, chained in a background
thread that starts with the module's first test, so it overlaps the in-process tests.
The evaluation runs use a random-weight InceptionV3 (utils.RANDOM_INCEPTION_ENV): nothing
is downloaded, and their figures only need to be well-formed. Shapes are the tiniest
valid ones: light, 32 px, n_dis 4, ch 4, n_res 1 (16 px, n_dis 3, ch 2 in-process).
"""
import contextlib
import glob
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import types

import cv2
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

import main

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')
TIMEOUT = 900  # seconds per CLI run: a guard against hangs, not a speed assertion
# TensorFlow's C++ start-up lines go to stderr; silence them to see only ours.
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': '',
       'UGATIT_TEST_RANDOM_INCEPTION': '1'}

TINY = ['--light', 'True', '--img_size', '32', '--n_dis', '4', '--ch', '4', '--n_res', '1']
DATASET = 'tiny'
MODEL_DIR = 'UGATIT_light_tiny_lsgan_1resblock_4dis_1_1_10_10_1000_sn_smoothing'
N_IMAGES = 3         # per dataset folder
ITERATION = 3
SOURCE_SIDE = 40     # generated images are resized to 32 by the pipeline

# Spec §1: every flag of the original main.py with its default.
ORIGINAL_DEFAULTS = {
    'phase': 'train', 'light': False, 'dataset': 'selfie2anime', 'epoch': 100,
    'iteration': 10000, 'batch_size': 1, 'print_freq': 1000, 'save_freq': 1000,
    'decay_flag': True, 'decay_epoch': 50, 'lr': 0.0001, 'GP_ld': 10, 'adv_weight': 1,
    'cycle_weight': 10, 'identity_weight': 10, 'cam_weight': 1000, 'gan_type': 'lsgan',
    'smoothing': True, 'ch': 64, 'n_res': 4, 'n_dis': 6, 'n_critic': 1, 'sn': True,
    'img_size': 256, 'img_ch': 3, 'augment_flag': True, 'checkpoint_dir': 'checkpoint',
    'result_dir': 'results', 'log_dir': 'logs', 'sample_dir': 'samples',
}
DEFAULT_MODEL_DIR = 'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing'
INT_WEIGHTS = ('GP_ld', 'adv_weight', 'cycle_weight', 'identity_weight', 'cam_weight')


# --- helpers ------------------------------------------------------------------------

@pytest.fixture
def parse():
    """parse(*args) parses like the command line (exit 2 on errors); flags restored after."""
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        yield lambda *args: main.parse_args(['main.py', *map(str, args)])
    FLAGS.unparse_flags()


def error_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def assert_one_error_line(stderr):
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith('error: '), stderr
    assert 'Traceback' not in stderr
    return lines[0]


def files_under(path):
    return sorted(p for p in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                  if os.path.isfile(p))


def checkpoint_counters(folder):
    return sorted(int(re.search(r'-(\d+)\.index$', p).group(1))
                  for p in glob.glob(os.path.join(folder, 'UGATIT_light.model-*.index')))


def write_dataset(root):
    """root/tiny/{trainA,trainB,testA,testB}/ with N_IMAGES random PNGs each."""
    rng = np.random.default_rng(0)
    for folder in ('trainA', 'trainB', 'testA', 'testB'):
        path = os.path.join(root, DATASET, folder)
        os.makedirs(path)
        for i in range(N_IMAGES):
            image = rng.integers(0, 256, (SOURCE_SIDE, SOURCE_SIDE, 3), dtype=np.uint8)
            assert cv2.imwrite(os.path.join(path, f'{folder}_{i}.png'), image)


class Cli:
    """A workspace (dataset, run folders) and the chain of main.py runs, in a background thread.

    train (2 epochs) → copy its run folders to after_train/ → resume (--epoch 3, --eval_freq 3)
    → test phase, with the no-checkpoint test run alongside it → copy the results to
    eval_results/ → eval phase there (so that it cannot rewrite what the test-phase tests
    read). Each run's stdout and stderr go to files; `result(name)` waits for a run and
    returns its exit status and output.
    """

    RUNS = ('train', 'resume', 'no_checkpoint', 'test', 'eval')

    def __init__(self, root):
        self.root = str(root)
        self.procs, self.results = {}, {}
        self.finished = {name: threading.Event() for name in self.RUNS}
        self.stopping = False
        self.thread = None
        write_dataset(os.path.join(self.root, 'dataset'))
        self.args = TINY + [
            '--dataset', DATASET, '--dataset_dir', self.path('dataset'),
            '--checkpoint_dir', self.path('checkpoint'), '--result_dir', self.path('results'),
            '--log_dir', self.path('logs'), '--sample_dir', self.path('samples'),
            '--iteration', str(ITERATION), '--print_freq', '2', '--save_freq', '2', '--seed', '3']

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def start_chain(self):
        self.thread = threading.Thread(target=self._chain, daemon=True)
        self.thread.start()

    def _chain(self):
        try:
            self._start('train', self.args + ['--epoch', '2'])
            if self._finish('train', publish=False) != 0:
                return
            for kind in ('checkpoint', 'logs', 'samples'):
                shutil.copytree(self.path(kind, MODEL_DIR), self.path('after_train', kind))
            self.finished['train'].set()  # only now: the tests of `train` read after_train/
            if self._run('resume', self.args + ['--epoch', '3', '--eval_freq', str(ITERATION)]) != 0:
                return
            empty = self.path('empty_checkpoints', MODEL_DIR)
            os.makedirs(empty)  # a run folder that died before its first save: flags.txt only
            open(os.path.join(empty, 'flags.txt'), 'w').close()
            self._start('no_checkpoint', self.args + [
                '--epoch', '3', '--phase', 'test', '--result_dir', self.path('empty_results'),
                '--checkpoint_dir', self.path('empty_checkpoints')])
            tested = self._run('test', self.args + ['--epoch', '3', '--phase', 'test'])
            self._finish('no_checkpoint')
            if tested != 0:
                return
            # copytree keeps the modification times: the outputs stay newer than the checkpoint.
            shutil.copytree(self.path('results', MODEL_DIR), self.path('eval_results', MODEL_DIR))
            self._run('eval', self.args + ['--epoch', '3', '--phase', 'eval',
                                           '--result_dir', self.path('eval_results')])
        finally:
            for event in self.finished.values():
                event.set()

    def _start(self, name, args):
        if self.stopping:
            return
        with open(self.path(f'{name}.out'), 'w') as out, open(self.path(f'{name}.err'), 'w') as err:
            self.procs[name] = subprocess.Popen([sys.executable, MAIN, *args], cwd=self.root,
                                                stdout=out, stderr=err, env=ENV)

    def _finish(self, name, publish=True):
        """Waits for run `name`, records its result and (if `publish`) signals it; its status."""
        if name not in self.procs:
            return None
        code = self.procs[name].wait(timeout=TIMEOUT)
        read = lambda ext: open(self.path(f'{name}.{ext}')).read()
        self.results[name] = types.SimpleNamespace(returncode=code, stdout=read('out'),
                                                   stderr=read('err'))
        if publish:
            self.finished[name].set()
        return code

    def _run(self, name, args):
        self._start(name, args)
        return self._finish(name)

    def result(self, name):
        """The finished run `name`; fails the test if the chain stopped before it."""
        assert self.thread is not None, 'the CLI chain was not started'
        self.finished[name].wait(timeout=len(self.RUNS) * TIMEOUT)
        if name not in self.results:
            pytest.fail(f'the CLI run {name!r} did not happen: an earlier run failed '
                        f'(see {self.root})')
        return self.results[name]

    def stop(self):
        """Kills the runs still going (ours only, by their handles) and ends the chain."""
        self.stopping = True
        while True:
            for proc in list(self.procs.values()):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if self.thread is None or not self.thread.is_alive():
                break
            self.thread.join(timeout=1)


CLI_FIXTURES = {'trained', 'resumed', 'tested', 'no_checkpoint_run', 'evaluated'}


@pytest.fixture(scope='module', autouse=True)
def cli(request, tmp_path_factory):
    """The CLI workspace; its chain of runs starts at once, in the background, if a selected
    test needs one (so it overlaps the in-process tests)."""
    workspace = Cli(tmp_path_factory.mktemp('cli'))
    if any(CLI_FIXTURES & set(item.fixturenames) for item in request.session.items):
        workspace.start_chain()
    yield workspace
    workspace.stop()


@pytest.fixture(scope='module')
def trained(cli):
    """The 2-epoch run (6 steps); its run folders were copied to after_train/ when it ended."""
    return cli.result('train')


@pytest.fixture(scope='module')
def resumed(cli, trained):
    """The same command with --epoch 3: resumes at step 7 and runs 3 more steps."""
    return cli.result('resume')


@pytest.fixture(scope='module')
def tested(cli, resumed):
    """--phase test with the flags of the resumed run."""
    return cli.result('test')


@pytest.fixture(scope='module')
def evaluated(cli, tested):
    """--phase eval on a copy of the test phase's results (eval_results/)."""
    return cli.result('eval')


@pytest.fixture(scope='module')
def no_checkpoint_run(cli):
    """--phase test with a checkpoint_dir whose run folder holds no checkpoint."""
    return cli.result('no_checkpoint')


def run_config():
    """The Config of the CLI runs (network flags only matter here)."""
    import UGATIT
    return UGATIT.Config(light=True, dataset=DATASET, img_size=32, n_dis=4, ch=4, n_res=1)


def load_checkpoint(prefix):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return reader, reader.get_variable_to_shape_map()


def event_records(log_folder):
    """[(tag, step, plugin)] of every summary in the event files of `log_folder`."""
    import tensorflow as tf
    records = []
    for path in sorted(glob.glob(os.path.join(log_folder, 'events.out.tfevents.*'))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                records.append((value.tag, event.step, value.metadata.plugin_data.plugin_name))
    return records


# --- 1. flags, in-process --------------------------------------------------------------

def test_every_original_flag_has_its_default(parse):
    """Each flag of the original main.py exists with the spec §1 default and type."""
    parse()
    for name, default in ORIGINAL_DEFAULTS.items():
        assert name in FLAGS, name
        value = FLAGS[name].value
        assert value == default and type(value) is type(default), (name, value)


def test_default_config_and_model_dir(parse):
    """make_config() with no flags gives the defaults and the original's model_dir."""
    parse()
    config = main.make_config()
    for name, default in ORIGINAL_DEFAULTS.items():
        assert getattr(config, name) == default, name
    assert config.model_dir == DEFAULT_MODEL_DIR


@pytest.mark.parametrize('args, want', [
    (['--light', 'True'], {'light': True}),
    (['--sn', 'False'], {'sn': False}),
    (['--smoothing', 'false'], {'smoothing': False}),
    (['--light=1'], {'light': True}),
    (['--light', 'yes'], {'light': True}),
    (['--light', 'NO'], {'light': False}),
    (['--decay_flag', '0'], {'decay_flag': False}),
    (['--nolight'], {'light': False}),
    (['--light'], {'light': True}),
    (['--light', '--sn', 'False'], {'light': True, 'sn': False}),
    (['--light', '--img_size', '64'], {'light': True, 'img_size': 64}),
    (['--augment_flag=False', '--light', 'true'], {'augment_flag': False, 'light': True}),
])
def test_boolean_forms(parse, args, want):
    """The original's boolean forms (and absl's) parse to the intended values."""
    parse(*args)
    for name, value in want.items():
        assert FLAGS[name].value is value, (name, args)
    untouched = set(ORIGINAL_DEFAULTS) - set(want)
    assert all(FLAGS[n].value == ORIGINAL_DEFAULTS[n] for n in untouched)


def test_normalise_bool_args_joins_only_boolean_values():
    """normalise_bool_args joins `--bool value` but leaves other flags and lone booleans alone."""
    argv = ['main.py', '--light', 'False', '--dataset', 'x', '--sn', '--epoch', '3', '--smoothing']
    assert main.normalise_bool_args(argv) == [
        'main.py', '--light=False', '--dataset', 'x', '--sn', '--epoch', '3', '--smoothing']


@pytest.mark.parametrize('args', [
    ['--light', 'maybe'],
    ['--light', 't'],            # the original's str2bool read 't' as True; we reject it
    ['--light='],
    ['--light', 'True', 'stray'],
    ['stray'],
    ['--gan_type', 'foo'],
    ['--phase', 'serve'],
    ['--epoch', 'ten'],
    ['--no_such_flag', '1'],
] + [[f'--{name}', '0.5'] for name in INT_WEIGHTS])
def test_bad_flags_exit_2_with_one_line(parse, capsys, args):
    """Bad booleans, stray words, unknown enums and non-int weights: exit 2, one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*args)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err)


def test_weights_are_ints_and_wgan_is_accepted(parse):
    """GP_ld and the four weights parse as int; --gan_type wgan is accepted."""
    parse('--gan_type', 'wgan', *[a for name in INT_WEIGHTS for a in (f'--{name}', '7')])
    assert FLAGS.gan_type == 'wgan'
    assert all(type(FLAGS[n].value) is int and FLAGS[n].value == 7 for n in INT_WEIGHTS)
    assert main.make_config().model_dir.startswith('UGATIT_selfie2anime_wgan_')


def test_model_dir_follows_the_flags(parse):
    """model_dir reflects light, gan_type, n_res, n_dis, n_critic, weights, sn and smoothing."""
    parse('--light', '--dataset', 'cats', '--gan_type', 'hinge', '--n_res', '2', '--n_dis', '5',
          '--n_critic', '3', '--adv_weight', '2', '--cycle_weight', '3', '--identity_weight', '4',
          '--cam_weight', '5', '--sn', 'false', '--smoothing', 'false')
    assert main.make_config().model_dir == 'UGATIT_light_cats_hinge_2resblock_5dis_3_2_3_4_5'


def test_help_prints_the_flags(parse, capsys):
    """--help prints the usage with the flags and exits 0, as the original's argparse did."""
    with pytest.raises(SystemExit) as exit_info:
        parse('--help')
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert '--light' in out and '--gan_type' in out


def test_debug_takes_the_same_boolean_words(parse):
    """--debug yes parses like --light yes."""
    parse('--debug', 'yes')
    assert FLAGS.debug is True


@pytest.mark.parametrize('args, want', [
    ([], {'xla': False, 'mixed_precision': 'none'}),
    (['--xla', 'True'], {'xla': True, 'mixed_precision': 'none'}),
    (['--mixed_precision', 'bfloat16'], {'xla': False, 'mixed_precision': 'bfloat16'}),
    (['--xla=yes', '--mixed_precision', 'float16'], {'xla': True, 'mixed_precision': 'float16'}),
])
def test_xla_and_mixed_precision_flags_reach_the_config(parse, args, want):
    """--xla (a strict boolean) and --mixed_precision (none|float16|bfloat16) map onto Config
    fields of the same names; both are off by default."""
    parse(*args)
    config = main.make_config()
    config.validate()
    assert {name: getattr(config, name) for name in want} == want


@pytest.mark.parametrize('args', [['--mixed_precision', 'float8'], ['--mixed_precision', 'fp16'],
                                  ['--xla', 'maybe']])
def test_bad_xla_or_mixed_precision_exits_2_with_one_line(parse, capsys, args):
    """An unknown precision or a non-boolean --xla: exit 2, one `error:` line naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*args)
    assert exit_info.value.code == 2
    assert args[0].lstrip('-') in assert_one_error_line(capsys.readouterr().err)


# --- 2. command-line errors -------------------------------------------------------------

def run_main(tmp_path, *args):
    """main.main with safe tiny flags first (later flags override): (exit code, stdout, stderr)."""
    argv = ['main.py', *TINY, '--dataset_dir', str(tmp_path / 'no_datasets'),
            '--checkpoint_dir', str(tmp_path / 'checkpoint'), '--result_dir', str(tmp_path / 'results'),
            '--log_dir', str(tmp_path / 'logs'), '--sample_dir', str(tmp_path / 'samples'),
            *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(argv)
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize('args, words', [
    (['--epoch', '0'], ['--epoch']),
    (['--epoch', '-3'], ['--epoch']),
    (['--batch_size', '0'], ['--batch_size']),
    (['--iteration', '0'], ['--iteration']),
    (['--img_size', '30'], ['--img_size', 'divisible']),
    (['--img_size', '64', '--n_dis', '6'], ['--n_dis 5', '--img_size 96']),
    (['--lr', '0'], ['--lr']),
    (['--eval_freq', '-1'], ['--eval_freq']),
    (['--phase', 'predict'], ['phase']),
])
def test_invalid_config_exits_2_with_one_line(parse, tmp_path, args, words):
    """Values that cannot build: exit 2, one `error:` line naming the fix; nothing written."""
    code, _, err = run_main(tmp_path, *args)
    assert code == 2, err
    line = assert_one_error_line(err)
    for word in words:
        assert word in line
    assert files_under(str(tmp_path)) == []


def test_out_of_range_seed_is_a_flag_error(parse, tmp_path):
    """--seed -1 is rejected like any bad flag: exit 2, one line."""
    code, _, err = run_main(tmp_path, '--seed', '-1')
    assert code == 2
    assert_one_error_line(err)


def test_unsupported_img_ch_fails_validation():
    """Config.validate rejects --img_ch 2 (only 1 and 3 can be decoded)."""
    import UGATIT
    from utils import UserError
    with pytest.raises(UserError, match='img_ch'):
        UGATIT.Config(img_ch=2).validate()


@pytest.fixture(scope='module')
def missing_dataset_run(tmp_path_factory):
    """main.main, in-process, on a dataset folder that does not exist (fails before tracing)."""
    tmp_path = tmp_path_factory.mktemp('missing')
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        result = run_main(tmp_path, '--dataset', 'absent')
    FLAGS.unparse_flags()
    return tmp_path, result


def test_missing_dataset_exits_1_with_one_line(missing_dataset_run):
    """A missing trainA folder: exit 1 and one `error:` line naming the folder."""
    tmp_path, (code, _, err) = missing_dataset_run
    assert code == 1
    line = assert_one_error_line(err)
    assert os.path.join('absent', 'trainA') in line


def test_missing_dataset_writes_nothing(missing_dataset_run):
    """A run that fails on a missing dataset leaves no file in checkpoint_dir."""
    tmp_path, _ = missing_dataset_run
    assert files_under(str(tmp_path / 'checkpoint')) == []


# --- 4. UGATIT in-process: learning rate and the compiled steps --------------------------

def learning_rate(at_epoch, **changes):
    """UGATIT.learning_rate of a Config with `changes`, without building a model."""
    import UGATIT
    return UGATIT.UGATIT.learning_rate(types.SimpleNamespace(config=UGATIT.Config(**changes)),
                                       at_epoch)


def test_learning_rate_defaults():
    """Defaults: 1e-4 for epochs 0–50, then linear towards 0: 9.8e-5 at 51, 2e-6 at 99."""
    assert [learning_rate(e) for e in (0, 1, 49, 50)] == [1e-4] * 4
    assert learning_rate(51) == pytest.approx(9.8e-5, rel=1e-12)
    assert learning_rate(99) == pytest.approx(2e-6, rel=1e-12)
    rates = [learning_rate(e) for e in range(100)]
    assert all(a >= b > 0 for a, b in zip(rates, rates[1:]))


def test_learning_rate_without_decay_is_constant():
    """decay_flag False keeps lr for every epoch."""
    assert {learning_rate(e, decay_flag=False, lr=3e-4) for e in range(100)} == {3e-4}


@pytest.mark.parametrize('decay_epoch', [10, 25])
def test_learning_rate_decay_epoch_at_or_after_the_end(decay_epoch):
    """decay_epoch >= epoch never decays (and never divides by zero)."""
    assert {learning_rate(e, epoch=10, decay_epoch=decay_epoch) for e in range(10)} == {1e-4}


UNIT_SIZE = 16


@pytest.fixture(scope='module')
def unit_model():
    """A tiny light model (16 px, n_dis 3, ch 2, n_res 1) with its optimizers."""
    import keras
    import UGATIT
    keras.utils.set_random_seed(11)
    model = UGATIT.UGATIT(UGATIT.Config(img_size=UNIT_SIZE, n_dis=3, ch=2, n_res=1, light=True,
                                        seed=5))
    model.build_optimizers()
    return model


def batch(n, seed):
    import tensorflow as tf
    return tf.random.stateless_uniform([n, UNIT_SIZE, UNIT_SIZE, 3], [seed, 7], -1, 1)


def values(variables):
    return {v.path: v.numpy().copy() for v in variables}


@contextlib.contextmanager
def restored(model):
    """Restores every network and optimizer variable on exit."""
    variables = list(model.variables_by_name().values()) + list(model.g_opt.variables) + \
        list(model.d_opt.variables)
    saved = [v.numpy().copy() for v in variables]
    try:
        yield
    finally:
        for var, value in zip(variables, saved):
            var.assign(value)


def test_steps_trace_once(unit_model):
    """d_step and g_step trace once across batch sizes 1 and 2 and different learning rates."""
    import tensorflow as tf
    for i, (n, lr) in enumerate([(1, 1e-4), (2, 3e-4), (1, tf.constant(5e-5)), (2, 1e-5)]):
        d_losses, _ = unit_model.d_step(batch(n, i), batch(n, i + 10), lr)
        g_losses, fakes = unit_model.g_step(batch(n, i + 20), batch(n, i + 30), lr)
        assert fakes['fake_B'].shape[0] == n
        assert np.isfinite(float(d_losses['Discriminator_loss']))
        assert np.isfinite(float(g_losses['Generator_loss']))
    assert unit_model.d_step.experimental_get_tracing_count() == 1
    assert unit_model.g_step.experimental_get_tracing_count() == 1


def test_g_step_leaves_discriminators_unchanged(unit_model):
    """A G step changes generator variables and no trainable discriminator variable."""
    d_before, g_before = values(unit_model.d_vars), values(unit_model.g_vars)
    unit_model.g_step(batch(1, 1), batch(1, 2), 1e-3)
    d_after, g_after = values(unit_model.d_vars), values(unit_model.g_vars)
    for name in d_before:
        np.testing.assert_array_equal(d_after[name], d_before[name], err_msg=name)
    assert any(not np.array_equal(g_after[n], g_before[n]) for n in g_before)


def test_d_step_leaves_generators_unchanged(unit_model):
    """A D step changes discriminator variables and no generator variable."""
    generator_weights = lambda: values(w for net in unit_model.generators for w in net.weights)
    g_before, d_before = generator_weights(), values(unit_model.d_vars)
    unit_model.d_step(batch(1, 3), batch(1, 4), 1e-3)
    g_after, d_after = generator_weights(), values(unit_model.d_vars)
    for name in g_before:
        np.testing.assert_array_equal(g_after[name], g_before[name], err_msg=name)
    assert any(not np.array_equal(d_after[n], d_before[n]) for n in d_before)


def l2n(x):
    return x / np.sqrt(max(np.sum(x ** 2), 1e-12))


def power_iteration(u, w):
    return l2n(l2n(u @ w.T) @ w)


@pytest.mark.parametrize('step', ['d_step', 'g_step'])
def test_steps_move_every_u_exactly_once(unit_model, step):
    """After either step every SN `u` is one power iteration from the start-of-step u and kernel."""
    import ops
    layers = ops.spectral_norm_layers(*unit_model.discriminators)
    # per domain: local (conv_0) and global (conv_0, conv_1), each + conv_last, CAM, D_logit
    assert len(layers) == 2 * ((1 + 3) + (2 + 3))
    rng = np.random.default_rng(3)
    for layer in layers:  # a fresh random u, far from convergence
        layer.u.assign(rng.standard_normal(layer.u.shape).astype(np.float32))
    u0 = [layer.u.numpy().astype(np.float64) for layer in layers]
    w0 = [layer.kernel.numpy().astype(np.float64).reshape(-1, layer.kernel.shape[-1])
          for layer in layers]
    getattr(unit_model, step)(batch(1, 5), batch(1, 6), 1e-3)
    two_iterations_differ = False
    for layer, u, w in zip(layers, u0, w0):
        once = power_iteration(u, w)
        np.testing.assert_allclose(layer.u.numpy(), once, rtol=1e-4, atol=1e-5, err_msg=layer.u.path)
        two_iterations_differ |= not np.allclose(power_iteration(once, w), once, rtol=1e-3, atol=1e-4)
    assert two_iterations_differ  # else the check could not tell one iteration from two


def test_rho_stays_in_unit_interval_after_a_pushed_g_step(unit_model):
    """With every rho at 0.5 and lr 10, a G step clips every rho to [0, 1]."""
    rhos = [v for v in unit_model.g_vars if v.path.endswith('/rho')]
    assert len(rhos) == 2 * 4  # per generator: AdaLIN res1, res2 and two LIN
    with restored(unit_model):
        for rho in rhos:
            rho.assign(np.full(rho.shape, 0.5, np.float32))
        unit_model.g_step(batch(2, 8), batch(2, 9), 10.0)
        after = np.concatenate([rho.numpy() for rho in rhos])
    assert after.min() >= 0.0 and after.max() <= 1.0
    assert np.any((after == 0.0) | (after == 1.0))  # the clip was needed


BENCHMARK_KEYS = ('train_iteration_s', 'd_update_s', 'g_update_s', 'translate_s', 'images_per_s',
                  'train_iteration_gflop', 'translate_gflop', 'achieved_gflops',
                  'machine_peak_gflops', 'peak_share', 'peak_rss_bytes', 'pipeline_images_per_s')


def test_benchmark_reports_every_field(unit_model, tmp_path, capsys):
    """--phase benchmark at a tiny size: every field the issue names, in the JSON and the
    table, with consistent values (not their size: no wall-clock assertion)."""
    import dataclasses
    original = unit_model.config
    path = tmp_path / 'bench' / 'figures.json'
    unit_model.config = dataclasses.replace(original, phase='benchmark', benchmark_steps=2,
                                            benchmark_json=str(path), batch_size=2,
                                            dataset_dir=str(tmp_path / 'no_datasets'))
    try:
        with restored(unit_model):
            returned = unit_model.benchmark()
    finally:
        unit_model.config = original
    figures = json.loads(path.read_text())
    assert figures == json.loads(json.dumps(returned))
    for key in BENCHMARK_KEYS:
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
    assert figures['config']['img_size'] == UNIT_SIZE and figures['config']['batch_size'] == 2
    assert figures['peak_share'] == pytest.approx(figures['achieved_gflops']
                                                  / figures['machine_peak_gflops'])
    assert figures['images_per_s'] == pytest.approx(2 / figures['train_iteration_s'])
    assert figures['train_iteration_gflop'] > 3 * figures['translate_gflop']  # 2 G + D, with grads
    # the steps were not traced again (the benchmark times the training graphs)
    assert unit_model.d_step.experimental_get_tracing_count() == 1
    table = capsys.readouterr().out
    for label in ('training iteration', 'translation', 'share of peak', 'input pipeline'):
        assert label in table


def test_test_phase_checks_both_folders_before_writing(unit_model, tmp_path):
    """A test phase whose testB is missing raises UserError before writing any result."""
    import dataclasses
    from utils import UserError
    config = dataclasses.replace(
        unit_model.config, phase='test', dataset='half', dataset_dir=str(tmp_path / 'dataset'),
        checkpoint_dir=str(tmp_path / 'checkpoint'), result_dir=str(tmp_path / 'results'))
    os.makedirs(tmp_path / 'dataset' / 'half' / 'testA')
    assert cv2.imwrite(str(tmp_path / 'dataset' / 'half' / 'testA' / 'a.png'),
                       np.zeros((UNIT_SIZE, UNIT_SIZE, 3), np.uint8))
    unit_model.save_checkpoint(os.path.join(config.checkpoint_dir, config.model_dir), 1)
    saved, unit_model.config = unit_model.config, config
    try:
        with pytest.raises(UserError, match='testB'):
            unit_model.test()
    finally:
        unit_model.config = saved
    assert files_under(str(tmp_path / 'results')) == []


# --- 3. the command-line flow: train, resume, test ----------------------------------------

def test_train_exits_0(trained):
    """The 2-epoch × 3-step run finishes with status 0 and reports 6 steps."""
    assert trained.returncode == 0, trained.stderr
    assert 'Traceback' not in trained.stderr
    assert 'done: 6 steps' in trained.stdout


def test_train_flagfile_replays_the_config(cli, trained, parse):
    """flags.txt in the run folder parses back (--flagfile) to the run's Config."""
    flagfile = cli.path('after_train', 'checkpoint', main.FLAGFILE_NAME)
    parse(*cli.args, '--epoch', '2')
    want = main.make_config()
    FLAGS.unparse_flags()
    parse('--flagfile', flagfile)
    assert main.make_config() == want
    assert want.model_dir == MODEL_DIR


def test_train_checkpoints(cli, trained):
    """Checkpoints UGATIT_light.model-<counter>: 3, 4, 6, 7 (the newest, in the state file)."""
    import tensorflow as tf
    folder = cli.path('after_train', 'checkpoint')
    assert checkpoint_counters(folder) == [3, 4, 6, 7]
    state = tf.train.get_checkpoint_state(folder)
    assert os.path.basename(state.model_checkpoint_path) == 'UGATIT_light.model-7'
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        f'UGATIT_light.model-{n}' for n in (3, 4, 6, 7)]


def test_train_checkpoint_contents(cli, trained):
    """The newest checkpoint holds exactly the original's names: variables, Adam slots, beta
    powers for 6 G and 6 D steps, plus ugatit/counter = 7 and ugatit/rng_state."""
    import UGATIT
    reader, shapes = load_checkpoint(cli.path('after_train', 'checkpoint', 'UGATIT_light.model-7'))
    model = UGATIT.UGATIT(run_config())
    network = {name: list(v.shape) for name, v in model.variables_by_name().items()}
    trainable = {v.path: list(v.shape) for v in model.g_vars + model.d_vars}
    slots = {f'{n}/{s}': shape for n, shape in trainable.items() for s in ('Adam', 'Adam_1')}
    powers = ['beta1_power', 'beta2_power', 'beta1_power_1', 'beta2_power_1']
    assert set(shapes) == set(network) | set(slots) | set(powers) | {
        UGATIT.COUNTER_KEY, UGATIT.RNG_KEY}
    for name, shape in {**network, **slots}.items():
        assert list(shapes[name]) == shape, name
    assert any(n.endswith('/u') for n in network) and not any(n.endswith('/u/Adam') for n in shapes)
    for suffix in ('', '_1'):  # G, then D: 6 steps each, so beta^(6 + 1)
        np.testing.assert_allclose(reader.get_tensor(f'beta1_power{suffix}'), 0.5 ** 7, rtol=1e-6)
        np.testing.assert_allclose(reader.get_tensor(f'beta2_power{suffix}'), 0.999 ** 7, rtol=1e-6)
    assert int(reader.get_tensor(UGATIT.COUNTER_KEY)) == 7
    assert reader.get_tensor(UGATIT.RNG_KEY).size > 0


def test_train_samples(cli, trained):
    """Samples real_A/fake_B/sheet_000_00002.png exist; the sheet is not one flat colour."""
    import utils
    folder = cli.path('after_train', 'samples')
    for kind in ('real_A', 'fake_B'):
        image = cv2.imread(os.path.join(folder, f'{kind}_000_00002.png'))
        assert image is not None and image.shape == (32, 32, 3), kind
    sheet = cv2.imread(os.path.join(folder, 'sheet_000_00002.png'))
    assert sheet is not None
    body = sheet[utils.LABEL_HEIGHT:]
    zoom = 3  # 32-px tiles are enlarged to 96 px (utils.SHEET_MIN_TILE) so the captions fit
    assert body.shape[0] == 2 * 32 * zoom and body.shape[1] == 5 * 32 * zoom
    assert len(np.unique(body.reshape(-1, 3), axis=0)) > 50


def test_train_tensorboard_and_loss_history(cli, trained):
    """The event file has the original's tags (losses, rho histogram and rho_0_mean);
    losses.jsonl has one record per step 1..6, and losses.png exists."""
    folder = cli.path('after_train', 'logs')
    records = event_records(folder)
    tags = {tag: plugin for tag, _, plugin in records}
    for tag in ('Discriminator_loss', 'Generator_loss', 'G_A_gan', 'D_B_loss'):
        assert tags.get(tag) == 'scalars', tag
    histograms = [t for t, p in tags.items() if p == 'histograms' and t.endswith('rho_0')]
    assert histograms and all(t.startswith('generator_') for t in histograms)
    assert all(f'{t}_mean' in tags for t in histograms)
    assert sorted(s for t, s, _ in records if t == 'Discriminator_loss') == list(range(1, 7))
    with open(os.path.join(folder, 'losses.jsonl')) as f:
        steps = [json.loads(line)['step'] for line in f]
    assert steps == list(range(1, 7))
    assert cv2.imread(os.path.join(folder, 'losses.png')) is not None


def test_sample_summary_has_the_step_of_its_losses(cli, trained):
    """The `samples` image of steps 2 and 5 (idx + 1 = 2 in each epoch) is logged at steps 2 and 5."""
    records = event_records(cli.path('after_train', 'logs'))
    assert sorted(s for t, s, _ in records if t == 'samples') == [2, 5]


def test_resume_continues_the_run(cli, resumed):
    """--epoch 3 resumes at counter 7 and ends at 10; model-3 is pruned (5 kept), model-7 stays."""
    import tensorflow as tf
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming' in (resumed.stdout + resumed.stderr).lower()
    assert 'done: 9 steps' in resumed.stdout
    folder = cli.path('checkpoint', MODEL_DIR)
    assert checkpoint_counters(folder) == [4, 6, 7, 9, 10]
    state = tf.train.get_checkpoint_state(folder)
    assert os.path.basename(state.model_checkpoint_path) == 'UGATIT_light.model-10'


def test_resume_continues_adam_and_counter(cli, resumed):
    """The newest checkpoint after resuming: counter 10, beta powers of 9 G and 9 D steps."""
    import UGATIT
    reader, _ = load_checkpoint(cli.path('checkpoint', MODEL_DIR, 'UGATIT_light.model-10'))
    assert int(reader.get_tensor(UGATIT.COUNTER_KEY)) == 10
    for suffix in ('', '_1'):
        np.testing.assert_allclose(reader.get_tensor(f'beta1_power{suffix}'), 0.5 ** 10, rtol=1e-6)
        np.testing.assert_allclose(reader.get_tensor(f'beta2_power{suffix}'), 0.999 ** 10, rtol=1e-6)


def test_resume_repeats_no_step(cli, resumed):
    """After resuming, losses.jsonl and the event files hold each step 1..9 exactly once."""
    folder = cli.path('logs', MODEL_DIR)
    with open(os.path.join(folder, 'losses.jsonl')) as f:
        steps = [json.loads(line)['step'] for line in f]
    assert steps == list(range(1, 10))
    records = event_records(folder)
    assert sorted(s for t, s, _ in records if t == 'Generator_loss') == list(range(1, 10))
    assert os.path.exists(cli.path('samples', MODEL_DIR, 'sheet_002_00002.png'))


class IndexParser(html.parser.HTMLParser):
    """{h2 heading: [[img src, ...] per table row]}."""

    def __init__(self):
        super().__init__()
        self.sections, self.current, self.in_h2 = {}, None, False

    def handle_starttag(self, tag, attrs):
        if tag == 'h2':
            self.in_h2 = True
        elif tag == 'tr' and self.current is not None:
            self.sections[self.current].append([])
        elif tag == 'img':
            self.sections[self.current][-1].append(dict(attrs)['src'])

    def handle_endtag(self, tag):
        if tag == 'h2':
            self.in_h2 = False

    def handle_data(self, data):
        if self.in_h2:
            self.current = data.strip()
            self.sections[self.current] = []


def test_test_phase_writes_every_output(cli, tested):
    """Every test image gets its translation, input and attention picture in each direction."""
    assert tested.returncode == 0, tested.stderr
    out_root = cli.path('results', MODEL_DIR)
    for direction, split in (('A2B', 'testA'), ('B2A', 'testB')):
        for i in range(N_IMAGES):
            name = f'{split}_{i}.png'
            for sub in ('', 'attention', 'input'):
                image = cv2.imread(os.path.join(out_root, direction, sub, name))
                assert image is not None and image.shape == (32, 32, 3), (direction, sub, name)


def test_test_phase_index_html(cli, tested):
    """index.html: per direction one row per image, three relative image links that exist."""
    out_root = cli.path('results', MODEL_DIR)
    parser = IndexParser()
    with open(os.path.join(out_root, 'index.html'), encoding='utf-8') as f:
        parser.feed(f.read())
    assert sorted(parser.sections) == ['A2B', 'B2A']
    for direction, split in (('A2B', 'testA'), ('B2A', 'testB')):
        rows = [row for row in parser.sections[direction] if row]  # the header row has no img
        assert len(rows) == N_IMAGES
        for i, row in enumerate(rows):
            name = f'{split}_{i}.png'
            assert row == [f'{direction}/input/{name}', f'{direction}/attention/{name}',
                           f'{direction}/{name}']
            for src in row:
                assert not os.path.isabs(src) and '..' not in src
                assert os.path.isfile(os.path.join(out_root, src))


def test_test_phase_without_checkpoint(cli, no_checkpoint_run):
    """--phase test with a checkpoint_dir holding no checkpoint: exit 1, one line, no results."""
    assert no_checkpoint_run.returncode == 1
    line = assert_one_error_line(no_checkpoint_run.stderr)
    assert 'checkpoint' in line
    assert not os.path.exists(cli.path('empty_results')) or files_under(cli.path('empty_results')) == []


# --- 5. evaluation: --eval_freq during training, --phase eval -----------------------------

def test_eval_with_a_missing_weights_file_exits_1(parse, tmp_path, monkeypatch):
    """--phase eval --inception_weights PATH that does not exist: exit 1, one line naming
    the flag, before any checkpoint or dataset is looked at."""
    import utils
    monkeypatch.delenv(utils.RANDOM_INCEPTION_ENV, raising=False)
    code, _, err = run_main(tmp_path, '--phase', 'eval', '--inception_weights',
                            str(tmp_path / 'absent.h5'))
    assert code == 1
    assert '--inception_weights' in assert_one_error_line(err)
    assert files_under(str(tmp_path)) == []


def test_eval_freq_logs_the_figures_to_tensorboard(cli, resumed):
    """--eval_freq 3 on the resumed run (steps 7–9): one evaluation, at step 9, as scalars
    eval/<direction>/kid_x100_mean and fid (no std: 3 images make one KID block) and a line."""
    records = event_records(cli.path('logs', MODEL_DIR))
    evals = sorted((tag, step) for tag, step, _ in records if tag.startswith('eval/'))
    assert evals == [(f'eval/{d}/{name}', 9) for d in ('A2B', 'B2A') for name in ('fid', 'kid_x100_mean')]
    lines = [line for line in resumed.stdout.splitlines() if line.startswith('eval at step')]
    assert len(lines) == 1 and lines[0].startswith('eval at step 9: A2B KID×100 ')


def test_eval_reuses_the_test_outputs_and_writes_metrics_json(cli, evaluated):
    """The eval phase reuses the test phase's translations (newer than the checkpoint) and
    writes metrics.json: per direction the figures, 3 images a side, the weights used."""
    assert evaluated.returncode == 0, evaluated.stderr
    for direction in ('A2B', 'B2A'):
        assert f'{direction}: reusing the {N_IMAGES} translations' in evaluated.stdout
        assert f'{direction}: 1/{N_IMAGES}' not in evaluated.stdout
    root = cli.path('eval_results', MODEL_DIR)
    with open(os.path.join(root, 'metrics.json'), encoding='utf-8') as f:
        record = json.load(f)
    assert record['checkpoint'].endswith('UGATIT_light.model-10')
    assert record['kid_max_block_size'] == 10
    for direction, real in (('A2B', 'testB'), ('B2A', 'testA')):
        figures = record[direction]
        assert figures['n_translated'] == figures['n_real'] == N_IMAGES
        assert np.isfinite(figures['kid_x100_mean']) and figures['kid_x100_std'] is None
        assert np.isfinite(figures['fid']) and figures['fid'] >= 0
        assert figures['real'] == cli.path('dataset', DATASET, real)
        assert figures['translated'] == os.path.join(root, direction)
        assert figures['weights'].startswith('random')
    lines = evaluated.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith('direction ')]
    assert len(header) == 1
    assert lines[header[0]].split() == ['direction', 'KID×100', 'FID', 'translated', 'real']
    assert [line.split()[0] for line in lines[header[0] + 1:header[0] + 3]] == ['A2B', 'B2A']


def test_eval_adds_the_figures_to_the_result_page(cli, evaluated):
    """The eval phase's index.html: the KID and FID table first, then the image rows."""
    parser = IndexParser()
    with open(os.path.join(cli.path('eval_results', MODEL_DIR), 'index.html'), encoding='utf-8') as f:
        parser.feed(f.read())
    assert list(parser.sections) == ['KID and FID', 'A2B', 'B2A']
    assert len(parser.sections['KID and FID']) == 3  # header + one row per direction
    assert all(len([row for row in parser.sections[d] if row]) == N_IMAGES for d in ('A2B', 'B2A'))
