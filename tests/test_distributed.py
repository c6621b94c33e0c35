"""Tests of --distribute (tf.distribute): mirrored replicas against one device, a two-process
multi-worker run, and resuming across strategies. CPU only; nothing is skipped.

The oracle is the single-device update: N replicas × batch b must train like one device
with batch N·b. The mirrored checks need the CPU split into 2 logical devices before
TensorFlow starts, so they run in ONE subprocess (this file as a script: `python
tests/test_distributed.py mirrored OUT`) that saves what it computed to OUT/mirrored.npz
and OUT/mirrored.json; the tests here only compare. It computes in float64, where the
only differences left are round-off of a different summation order (in float32, Adam's
first step turns the round-off sign of gradients that are exactly zero in theory, such as
a conv bias before instance norm, into ±lr moves). The multi-worker run is main.py in two
processes on 127.0.0.1 (TF_CONFIG with two free ports), each through this file as a
script (`worker OUT.npz -- <main.py flags>`) that also saves its final state. The three
processes start together with the module's first test; tracing the distributed steps
dominates their run time.
"""
import glob
import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
TIMEOUT = 1800  # seconds per subprocess: a guard against hangs, not a speed assertion
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': ''}
ENV.pop('TF_CONFIG', None)

REPLICAS = 2            # logical CPU devices of the mirrored subprocess; also the workers
# The tiniest valid model (32 px allows n_dis 4); lsgan draws no gradient-penalty noise.
TINY = dict(img_size=32, n_dis=4, ch=4, n_res=1, light=True, gan_type='lsgan')
TINY_FLAGS = ['--light', 'True', '--img_size', '32', '--n_dis', '4', '--ch', '4',
              '--n_res', '1', '--gan_type', 'lsgan']
LR = 1e-3               # larger than the default so one step moves every weight visibly
N_IMAGES = 4            # per dataset folder: one batch of 1 for each of 2 workers, twice
SOURCE_SIDE = 40        # generated images are resized to 32 by the pipeline
DATASET = 'tiny'
MODEL_DIR = 'UGATIT_light_tiny_lsgan_1resblock_4dis_1_1_10_10_1000_sn_smoothing'
WORKER_STEPS = 2
SEED = 3

# Tolerances of mirrored (float64) against one device (float64); what differs is the
# summation order. Variables: one Adam step moves a weight by ≈ lr·sign(g), whatever the
# scale of g; a gradient that is zero in theory (a conv bias before instance norm) is
# round-off in practice (≈1e-13 here) and moves its weight by lr·g/ε ≈ 1e-9, differently on
# each side: 1e-4·lr leaves a margin of 100 and is far below a wrong move (≈ lr). Adam
# slots hold the gradients themselves (m = Σ(1−β1)·g, v = Σ(1−β2)·g²), so they check the
# loss scaling that Adam's normalised step hides (a missing 1/N doubles them; an L2 term
# counted N times moves them by ≈1e-6); they are compared against the largest slot of
# their optimizer and kind (measured: within 1e-15 of it).
VAR_ATOL = 1e-4 * LR
SLOT_RTOL = 1e-11
LOSS_RTOL = 1e-12


# --- helpers shared with the subprocesses ---------------------------------------------

def write_dataset(root):
    """root/tiny/{trainA,trainB,testA,testB}/ with N_IMAGES random PNGs each."""
    import cv2
    rng = np.random.default_rng(0)
    for folder in ('trainA', 'trainB', 'testA', 'testB'):
        path = os.path.join(root, DATASET, folder)
        os.makedirs(path, exist_ok=True)
        for i in range(N_IMAGES):
            image = rng.integers(0, 256, (SOURCE_SIDE, SOURCE_SIDE, 3), dtype=np.uint8)
            assert cv2.imwrite(os.path.join(path, f'{folder}_{i}.png'), image)


def snapshot(model):
    """{name: array} of the whole training state: every variable (weights, `u`, rho), the
    Adam slots, both optimizers' step counts and the noise generator's state."""
    state = {name: var.numpy() for name, var in model.variables_by_name().items()}
    state.update({name: var.numpy() for name, var in model.optimizer_state_by_name().items()})
    state['G_Adam/iterations'] = model.g_opt.iterations.numpy()
    state['D_Adam/iterations'] = model.d_opt.iterations.numpy()
    state['rng_state'] = model.rng.state.numpy()
    return state


def replica_spread(model):
    """{name: max |copy − first copy|} over the per-replica copies of every variable."""
    spread = {}
    variables = {**model.variables_by_name(), **model.optimizer_state_by_name(),
                 'G_Adam/iterations': model.g_opt.iterations,
                 'D_Adam/iterations': model.d_opt.iterations}
    for name, var in variables.items():
        copies = [c.numpy() for c in model.strategy.experimental_local_results(var.value)]
        assert len(copies) == REPLICAS, name
        spread[name] = max(float(np.max(np.abs(c - copies[0]))) for c in copies)
    return spread


# --- the mirrored subprocess ----------------------------------------------------------

def mirrored_program(out):
    """Everything mirrored, in one process with the CPU split into REPLICAS devices; writes
    out/mirrored.npz (states and losses, keyed `<stage>/<name>`) and out/mirrored.json."""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)
    import keras
    keras.config.set_floatx('float64')
    sys.path.insert(0, ROOT)
    import UGATIT as ugatit

    arrays, info = {}, {}
    rng = np.random.default_rng(0)
    lr = tf.constant(LR, tf.float64)

    def images():
        return tf.constant(rng.uniform(-1, 1, (REPLICAS, TINY['img_size'], TINY['img_size'], 3)))

    def record(stage, model, losses=None):
        arrays.update({f'{stage}/{k}': v for k, v in snapshot(model).items()})
        for name, value in (losses or {}).items():
            arrays[f'{stage}/loss/{name}'] = np.asarray(value)

    def update_single(model, batches):
        """One eager D and one eager G update on one device, batch REPLICAS."""
        (a, b), (a2, b2) = batches
        d_losses, _ = model._d_update(a, b, lr)
        g_losses, _ = model._g_update(a2, b2, lr)
        return {**d_losses, **g_losses}

    def update_mirrored(model, batches):
        """The compiled D and G steps, each replica on its own row of the same batches."""
        (a, b), (a2, b2) = batches
        d_losses, _ = model.d_step(model.split_batch(a), model.split_batch(b), lr)
        g_losses, fakes = model.g_step(model.split_batch(a2), model.split_batch(b2), lr)
        info['fake_rows'] = int(model.local_batch(fakes['fake_B']).shape[0])
        return {**d_losses, **g_losses}

    keras.utils.set_random_seed(1)
    single = ugatit.UGATIT(ugatit.Config(**TINY, seed=1))
    keras.utils.set_random_seed(2)
    write_dataset(os.path.join(out, 'dataset'))
    mirror = ugatit.UGATIT(ugatit.Config(**TINY, seed=2, distribute='mirrored', dataset=DATASET,
                                         dataset_dir=os.path.join(out, 'dataset')))
    for model in (single, mirror):
        model.build_optimizers()
    info['replicas'] = mirror.replicas
    info['devices'] = list(mirror.strategy.extended.worker_devices)
    info['u_is_mirrored'] = type(
        mirror.variables_by_name()['discriminator_A/global/conv_0/u'].value).__name__

    # 1. none -> mirrored at the start: the same initial state on both sides.
    single.save_checkpoint(os.path.join(out, 'none_start'), 1)
    info['start_counter'] = mirror._restore_for_training(os.path.join(out, 'none_start'))
    record('start_single', single)
    record('start_mirror', mirror)
    info['spread_start'] = replica_spread(mirror)

    # 2. One D and one G update: 2 replicas × batch 1 against one device × batch 2.
    batches = [(images(), images()), (images(), images())]
    record('step1_single', single, update_single(single, batches))
    record('step1_mirror', mirror, update_mirrored(mirror, batches))
    info['spread_step1'] = replica_spread(mirror)

    # 3. none -> mirrored mid-run (Adam state, step counts, RNG): restore the single-device
    # checkpoint into the mirrored model, then both continue with the same batches.
    single.save_checkpoint(os.path.join(out, 'none_step1'), 2)
    info['none_to_mirrored_counter'] = mirror._restore_for_training(
        os.path.join(out, 'none_step1'))
    record('restored_mirror', mirror)
    info['spread_restored'] = replica_spread(mirror)
    batches = [(images(), images()), (images(), images())]
    record('step2_single', single, update_single(single, batches))
    record('step2_mirror', mirror, update_mirrored(mirror, batches))

    # 4. mirrored -> none: a new single-device model resumes the mirrored checkpoint, then
    # both continue with the same batches.
    mirror.save_checkpoint(os.path.join(out, 'mirror_step2'), 3)
    keras.utils.set_random_seed(3)
    resumed = ugatit.UGATIT(ugatit.Config(**TINY, seed=3))
    resumed.build_optimizers()
    info['mirrored_to_none_counter'] = resumed._restore_for_training(
        os.path.join(out, 'mirror_step2'))
    record('restored_none', resumed)
    batches = [(images(), images()), (images(), images())]
    record('step3_none', resumed, update_single(resumed, batches))
    record('step3_mirror', mirror, update_mirrored(mirror, batches))

    # 5. The input pipeline: each replica takes its own batch of the training stream.
    streams = mirror._training_streams(mirror.training_files(), seed=SEED)
    arrays['stream/A'] = np.stack([t.numpy() for t in mirror.strategy.experimental_local_results(
        next(streams['A']))])

    np.savez(os.path.join(out, 'mirrored.npz'), **arrays)
    with open(os.path.join(out, 'mirrored.json'), 'w') as f:
        json.dump(info, f)


# --- the multi-worker processes ---------------------------------------------------------

def worker_program(out, main_args):
    """main.py with `main_args`, then the trained state saved to `out` (an .npz)."""
    sys.path.insert(0, ROOT)
    import main
    import UGATIT as ugatit
    train = ugatit.UGATIT.train

    def train_and_save(self, **kwargs):
        counter = train(self, **kwargs)
        np.savez(out, **snapshot(self))
        return counter

    ugatit.UGATIT.train = train_and_save
    main.main(['main.py', *main_args])


def free_ports(count):
    """`count` distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Runs:
    """The mirrored subprocess and the two multi-worker processes, started together."""

    def __init__(self, root):
        self.root = str(root)
        self.procs = {}
        write_dataset(self.path('dataset'))

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def start(self):
        os.makedirs(self.path('mirrored'))
        self._spawn('mirrored', ['mirrored', self.path('mirrored')], ENV)
        hosts = [f'127.0.0.1:{port}' for port in free_ports(REPLICAS)]
        for index in range(REPLICAS):
            tf_config = {'cluster': {'worker': hosts}, 'task': {'type': 'worker', 'index': index}}
            self._spawn(f'worker{index}', ['worker', self.path(f'worker{index}.npz'), '--']
                        + self.worker_flags(index), {**ENV, 'TF_CONFIG': json.dumps(tf_config)})

    def worker_flags(self, index):
        """main.py flags of worker `index`: shared dataset, run folders of its own (as on
        separate machines), so that what each one writes can be told apart."""
        own = lambda kind: self.path(f'worker{index}', kind)
        return TINY_FLAGS + [
            '--dataset', DATASET, '--dataset_dir', self.path('dataset'),
            '--checkpoint_dir', own('checkpoint'), '--log_dir', own('logs'),
            '--sample_dir', own('samples'), '--result_dir', own('results'),
            '--epoch', '1', '--iteration', str(WORKER_STEPS), '--print_freq', '1',
            '--save_freq', str(WORKER_STEPS), '--lr', str(LR), '--seed', str(SEED),
            '--distribute', 'multi_worker']

    def _spawn(self, name, args, env):
        with open(self.path(f'{name}.out'), 'w') as out, open(self.path(f'{name}.err'), 'w') as err:
            self.procs[name] = subprocess.Popen([sys.executable, HERE, *args], cwd=self.root,
                                                stdout=out, stderr=err, env=env)

    def result(self, name):
        """The finished process `name`: returncode, stdout, stderr."""
        code = self.procs[name].wait(timeout=TIMEOUT)
        read = lambda ext: open(self.path(f'{name}.{ext}')).read()
        return types.SimpleNamespace(returncode=code, stdout=read('out'), stderr=read('err'))

    def stop(self):
        """Kills the processes still going (ours only, by their handles)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


SUBPROCESS_FIXTURES = {'mirrored', 'workers'}


@pytest.fixture(scope='module', autouse=True)
def runs(request, tmp_path_factory):
    """The subprocesses, started at once if a selected test needs them (so they overlap)."""
    workspace = Runs(tmp_path_factory.mktemp('distributed'))
    if any(SUBPROCESS_FIXTURES & set(item.fixturenames) for item in request.session.items):
        workspace.start()
    yield workspace
    workspace.stop()


@pytest.fixture(scope='module')
def mirrored(runs):
    """(arrays, info) saved by the mirrored subprocess."""
    result = runs.result('mirrored')
    assert result.returncode == 0, result.stderr[-3000:]
    folder = runs.path('mirrored')
    with np.load(os.path.join(folder, 'mirrored.npz')) as data:
        arrays = dict(data)
    with open(os.path.join(folder, 'mirrored.json')) as f:
        return arrays, json.load(f)


@pytest.fixture(scope='module')
def workers(runs):
    """[result of worker 0 (the chief), result of worker 1], each with its saved state."""
    results = [runs.result(f'worker{i}') for i in range(REPLICAS)]
    for i, result in enumerate(results):
        assert result.returncode == 0, f'worker {i}:\n{result.stderr[-3000:]}'
        with np.load(runs.path(f'worker{i}.npz')) as data:
            result.state = dict(data)
    return results


def stage(arrays, name):
    """The state {variable: array} (losses excluded) recorded at stage `name`."""
    prefix = name + '/'
    return {k[len(prefix):]: v for k, v in arrays.items()
            if k.startswith(prefix) and '/loss/' not in k}


def losses(arrays, name):
    prefix = name + '/loss/'
    return {k[len(prefix):]: float(v) for k, v in arrays.items() if k.startswith(prefix)}


def is_slot(name):
    return name.endswith(('/Adam', '/Adam_1'))


def assert_states_close(got, want):
    """Every entry of `want` in `got`: variables within VAR_ATOL, Adam slots within
    SLOT_RTOL of the largest slot of their optimizer and kind, counts exactly."""
    assert sorted(got) == sorted(want)
    scale = {}
    for name, value in want.items():
        if is_slot(name):
            key = (name.split('/')[0].startswith('generator'), name.endswith('_1'))
            scale[key] = max(scale.get(key, 0.0), float(np.max(np.abs(value))))
    for name, value in want.items():
        if is_slot(name):
            key = (name.split('/')[0].startswith('generator'), name.endswith('_1'))
            np.testing.assert_allclose(got[name], value, rtol=SLOT_RTOL,
                                       atol=SLOT_RTOL * scale[key], err_msg=name)
        elif name.endswith('iterations') or name == 'rng_state':
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], value, rtol=0, atol=VAR_ATOL, err_msg=name)


def assert_states_equal(got, want):
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# --- flags and configuration (in-process) --------------------------------------------------

def user_error(**changes):
    import UGATIT as ugatit
    from utils import UserError
    with pytest.raises(UserError) as err:
        ugatit.Config(**TINY, **changes).validate()
    message = str(err.value)
    assert '\n' not in message
    return message


def test_mirrored_flag_errors_name_the_flag():
    """--distribute, --gpus: one line naming the flag for a value that cannot work."""
    assert '--distribute' in user_error(distribute='horovod')
    assert '--gpus' in user_error(distribute='mirrored', gpus='0,0')
    assert '--gpus' in user_error(distribute='mirrored', gpus='first')
    assert '--gpus' in user_error(gpus='0')  # without --distribute mirrored
    assert '--distribute' in user_error(distribute='mirrored', phase='test')
    assert '--distribute' in user_error(distribute='multi_worker', phase='benchmark')


def test_mirrored_names_only_visible_gpus():
    """--gpus naming a GPU past the visible ones says how many there are."""
    import tensorflow as tf
    import UGATIT as ugatit
    from utils import UserError
    absent = len(tf.config.list_logical_devices('GPU'))
    with pytest.raises(UserError, match=f'--gpus {absent}: no GPU {absent} '):
        ugatit.mirrored_devices(str(absent))


@pytest.mark.parametrize('tf_config, words', [
    (None, 'not set'),
    ('{"cluster": ', 'must be JSON'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'must be JSON'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
     'must be JSON'),
    ('{"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', 'does not train'),
])
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, words):
    """--distribute multi_worker checks TF_CONFIG up front, in one line."""
    if tf_config is None:
        monkeypatch.delenv('TF_CONFIG', raising=False)
    else:
        monkeypatch.setenv('TF_CONFIG', tf_config)
    message = user_error(distribute='multi_worker')
    assert 'TF_CONFIG' in message and words in message


def test_multi_worker_and_mirrored_flags_reach_the_config():
    from absl import flags
    from absl.testing import flagsaver
    import main
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        main.parse_args(['main.py', '--distribute', 'mirrored', '--gpus', '0,1'])
        config = main.make_config()
        flags.FLAGS.unparse_flags()
    assert (config.distribute, config.gpus) == ('mirrored', '0,1')
    assert main.FLAGS['distribute'].default == 'none'


# --- mirrored: 2 replicas against one device ------------------------------------------------

def test_mirrored_runs_on_two_replicas(mirrored):
    arrays, info = mirrored
    assert info['replicas'] == REPLICAS and len(info['devices']) == REPLICAS
    assert info['u_is_mirrored'] == 'MirroredVariable'
    assert info['fake_rows'] == REPLICAS  # both replicas' fakes, one image each


def test_mirrored_update_equals_single_device_batch(mirrored):
    """One D and one G update on 2 replicas with batch 1 each equal one update on one
    device with the same two images as a batch of 2: every variable (u and rho included),
    every Adam slot, the step counts and every loss."""
    arrays, _ = mirrored
    start = stage(arrays, 'start_single')
    assert_states_equal(stage(arrays, 'start_mirror'), start)
    want, got = stage(arrays, 'step1_single'), stage(arrays, 'step1_mirror')
    assert_states_close(got, want)
    moved = [n for n in want if not is_slot(n) and 'iterations' not in n
             and not np.array_equal(want[n], start[n])]
    assert any(n.endswith('/u') for n in moved) and any(n.endswith('/rho') for n in moved)
    assert int(want['G_Adam/iterations']) == int(want['D_Adam/iterations']) == 1
    want_losses, got_losses = losses(arrays, 'step1_single'), losses(arrays, 'step1_mirror')
    assert sorted(got_losses) == sorted(want_losses) and 'reg_loss_generator' in want_losses
    for name, value in want_losses.items():
        assert got_losses[name] == pytest.approx(value, rel=LOSS_RTOL), name


def test_mirrored_replicas_hold_identical_copies(mirrored):
    """After an update and after a restore, every replica's copy of every variable, Adam
    slot and step count is the same (u and the clipped rho included)."""
    _, info = mirrored
    for key in ('spread_start', 'spread_step1', 'spread_restored'):
        assert info[key] and all(v == 0 for v in info[key].values()), (
            key, {k: v for k, v in info[key].items() if v})
    assert any(k.endswith('/u') for k in info['spread_step1'])


def test_mirrored_replicas_read_different_images(mirrored):
    """Each replica takes its own batch of --batch_size images from the training stream."""
    arrays, _ = mirrored
    batches = arrays['stream/A']
    assert batches.shape == (REPLICAS, 1, TINY['img_size'], TINY['img_size'], 3)
    assert not np.array_equal(batches[0], batches[1])


def test_resume_none_to_mirrored(mirrored):
    """A single-device checkpoint resumes under mirrored: the counter, every variable, the
    Adam state and the RNG state, exactly; the next update then equals the single device's."""
    arrays, info = mirrored
    assert info['start_counter'] == 1 and info['none_to_mirrored_counter'] == 2
    assert_states_equal(stage(arrays, 'restored_mirror'), stage(arrays, 'step1_single'))
    assert_states_close(stage(arrays, 'step2_mirror'), stage(arrays, 'step2_single'))


def test_resume_mirrored_to_none(mirrored):
    """A mirrored checkpoint resumes on one device exactly, and training continues there as
    it does under mirrored."""
    arrays, info = mirrored
    assert info['mirrored_to_none_counter'] == 3
    assert_states_equal(stage(arrays, 'restored_none'), stage(arrays, 'step2_mirror'))
    assert_states_close(stage(arrays, 'step3_none'), stage(arrays, 'step3_mirror'))
    assert int(stage(arrays, 'step3_none')['G_Adam/iterations']) == 3


# --- multi_worker: two processes on localhost -----------------------------------------------

def test_multi_worker_both_workers_finish(workers):
    for result in workers:
        assert int(result.state['G_Adam/iterations']) == WORKER_STEPS


def test_multi_worker_weights_identical_on_both_workers(workers):
    chief, other = workers
    assert_states_equal(other.state, chief.state)


def test_multi_worker_chief_checkpoint_restores(runs, workers):
    """The chief's checkpoint holds the trained state and resumes (here on one device)."""
    import keras
    import UGATIT as ugatit
    folder = runs.path('worker0', 'checkpoint', MODEL_DIR)
    keras.utils.set_random_seed(SEED + 1)
    model = ugatit.UGATIT(ugatit.Config(**TINY, seed=SEED + 1))
    model.build_optimizers()
    assert model._restore_for_training(folder) == WORKER_STEPS + 1
    assert_states_equal(snapshot(model), workers[0].state)


def test_multi_worker_only_the_chief_writes(runs, workers):
    """Checkpoints, flags.txt, samples, TensorBoard logs, the progress line and the summary
    come from the chief; the other worker's scratch checkpoint is gone."""
    chief, other = workers
    own = lambda index, *parts: runs.path(f'worker{index}', *parts)
    assert glob.glob(own(0, 'checkpoint', MODEL_DIR, '*.index'))
    assert os.path.exists(own(0, 'checkpoint', MODEL_DIR, 'flags.txt'))
    assert glob.glob(own(0, 'samples', MODEL_DIR, 'sheet_*.png'))
    assert os.path.exists(own(0, 'logs', MODEL_DIR, 'losses.jsonl'))
    assert 'Epoch:' in chief.stdout and 'done:' in chief.stdout
    assert 'replicas' in chief.stdout
    leftovers = [p for p in glob.glob(own(1, '**', '*'), recursive=True) if os.path.isfile(p)]
    assert leftovers == []
    assert not glob.glob(own(1, 'checkpoint', MODEL_DIR, '.*'))
    assert not os.path.exists(own(1, 'samples')) and not os.path.exists(own(1, 'logs'))
    assert other.stdout.strip() == ''


if __name__ == '__main__':
    if sys.argv[1] == 'mirrored':
        mirrored_program(sys.argv[2])
    elif sys.argv[1] == 'worker':
        worker_program(sys.argv[2], sys.argv[4:])
    else:
        sys.exit(f'usage: {sys.argv[0]} mirrored OUT | worker OUT.npz -- FLAGS')
