"""Issue 5: every bad input gets one clear line, and no crash loses more than the last
checkpoint interval.

1. A table of bad inputs through the command line (`main.main` in-process, as
   tests/test_main.py does; every case fails before a training step is traced): exit
   status, exactly one stderr line (our `error:` line; TF's C++ log lines, which main.py
   hides in a real run, are left out), no traceback, no file written or deleted.
2. Images of every format in the test phase (in-process) and the training phase (the
   first fault run below trains on them).
3. Fault injection: main.py training subprocesses on a tiny model (light, 32 px, n_dis 4,
   ch 4, n_res 1). Tracing the steps costs ~45 s of CPU per process, so there are three,
   chained in a background thread that starts with the module (overlapping the in-process
   tests): one killed (SIGKILL, through the test-only hook utils.FAULT_ENV) while its second
   checkpoint is written; its restart, stopped with SIGINT; the next restart, with --lr 1e30
   (forced NaN). Subprocesses that only save (no tracing) are killed at every stage of a save.
4. A full disk (the hook's ENOSPC in-process, and a real write failure under
   RLIMIT_FSIZE in a subprocess), NaN weights, the free-space warning, SIGTERM.
"""
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import types

import cv2
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

import main
import UGATIT as ugatit
import utils

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')
TIMEOUT = 900  # seconds per subprocess: a guard against hangs, not a speed assertion
# main.py sets TF_CPP_MIN_LOG_LEVEL itself (to keep TF's C++ lines off stderr): let it.
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ('TF_CPP_MIN_LOG_LEVEL', utils.FAULT_ENV)}, 'CUDA_VISIBLE_DEVICES': ''}
IS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0

TINY = dict(light=True, img_size=32, n_dis=4, ch=4, n_res=1)
TINY_ARGS = ['--light', 'True', '--img_size', '32', '--n_dis', '4', '--ch', '4', '--n_res', '1']
NAME = 'UGATIT_light'            # checkpoint names: UGATIT_light.model-<counter>
SIDE = 40                        # generated images; the model resizes them to 32
HUGE_SIDE = 8000
GOOD_PER_FOLDER = 3
SPLITS = ('trainA', 'trainB', 'testA', 'testB')
# A C++ log line of TF (absl format), which in-process tests cannot silence once TF is loaded.
TF_LOG_LINE = re.compile(r'^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)')


# --- images ---------------------------------------------------------------------------

def noise(seed, side=SIDE):
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def encoded(ext, rgb):
    ok, data = cv2.imencode(ext, rgb)
    assert ok
    return data.tobytes()


def _animated_gif(path, rgb):
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


ODD_FORMATS = {   # every kind of image the issue lists, all of which must be used
    'gray.png': lambda p, rgb: Image.fromarray(rgb).convert('L').save(p),
    'rgba.png': lambda p, rgb: Image.fromarray(np.dstack([rgb, rgb[..., 0]])).save(p),
    'palette.png': lambda p, rgb: Image.fromarray(rgb).convert('P').save(p),
    'deep16.png': lambda p, rgb: cv2.imwrite(p, rgb.astype(np.uint16) * 257 + 100),
    'cmyk.jpg': lambda p, rgb: Image.fromarray(rgb).convert('CMYK').save(p),
    'animated.gif': _animated_gif,
    'photo.webp': lambda p, rgb: Image.fromarray(rgb).save(p),
    'tiny8.png': lambda p, rgb: cv2.imwrite(p, rgb[:8, :8]),
}
BROKEN = {        # skipped, each named in a warning
    'zero.png': lambda: b'',
    'truncated.jpg': lambda: encoded('.jpg', noise(1))[:600],
    'truncated.png': lambda: encoded('.png', noise(2))[:600],
}
NON_IMAGES = ('notes.txt', 'Thumbs.db')   # ignored, counted in one warning


def write_good(folder, count=GOOD_PER_FOLDER):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        assert cv2.imwrite(os.path.join(folder, f'good{i}.png'), noise(i))


def write_odd(folder, huge):
    """Good images, every odd format, broken files and non-images in `folder`; a
    HUGE_SIDE² JPEG copied from `huge` if given."""
    write_good(folder)
    for i, (name, writer) in enumerate(ODD_FORMATS.items()):
        writer(os.path.join(folder, name), noise(10 + i))
    for name, data in BROKEN.items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data())
    for name in NON_IMAGES:
        with open(os.path.join(folder, name), 'w') as f:
            f.write('not an image')
    if huge:
        shutil.copy(huge, os.path.join(folder, 'huge.jpg'))


def write_huge(path):
    image = np.zeros((HUGE_SIDE, HUGE_SIDE, 3), np.uint8)
    image[:HUGE_SIDE // 2] = 200
    image[:, :HUGE_SIDE // 3, 1] = 90
    assert cv2.imwrite(path, image)


def usable_images(folder):
    """The names in `folder` that the model must use (good, odd formats, huge)."""
    return sorted(n for n in os.listdir(folder) if n not in BROKEN and n not in NON_IMAGES)


# --- files ----------------------------------------------------------------------------

def snapshot(*roots):
    """{path: sha1} of every file under `roots`."""
    out = {}
    for root in roots:
        for path in glob.glob(os.path.join(str(root), '**', '*'), recursive=True):
            if os.path.isfile(path):
                with open(path, 'rb') as f:
                    out[path] = hashlib.sha1(f.read()).hexdigest()
    return out


def listed(folder):
    """(newest, [all]) checkpoint names of the state file in `folder`."""
    with open(os.path.join(folder, utils.CHECKPOINT_STATE)) as f:
        text = f.read()
    newest = re.search(r'model_checkpoint_path: "(.*)"', text).group(1)
    return newest, re.findall(r'all_model_checkpoint_paths: "(.*)"', text)


def complete(folder):
    """Counters of the checkpoints in `folder` with an index and a data file."""
    return sorted(int(m.group(1)) for p in glob.glob(os.path.join(folder, f'{NAME}.model-*.index'))
                  if (m := re.search(r'-(\d+)\.index$', p))
                  and os.path.exists(p[:-len('.index')] + '.data-00000-of-00001'))


def hidden(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, '.*')))


def checkpoint_counters(prefix):
    """(ugatit/counter, G Adam steps, D Adam steps) of a checkpoint, the step counts read
    from TF1's beta1 powers 0.5^(steps + 1)."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    steps = [round(np.log(float(reader.get_tensor(f'beta1_power{s}'))) / np.log(0.5)) - 1
             for s in ('', '_1')]
    return int(reader.get_tensor(ugatit.COUNTER_KEY)), *steps


def error_and_warning_lines(stderr):
    """What a real run would print on stderr, less TF's C++ lines and INFO lines."""
    return [line for line in stderr.splitlines()
            if line.strip() and not TF_LOG_LINE.match(line) and not line.startswith('INFO:')]


# --- background runs of main.py ------------------------------------------------------------

class Runs:
    """main.py subprocesses in background threads; `result(name)` waits for one.

    Each run's stdout and stderr are kept; `on_stdout(line, proc)` may act on the
    stdout lines as they come (to send a signal at a known point).
    """

    def __init__(self, root):
        self.root = root
        self.results, self.events, self.procs = {}, {}, []
        self.lock = threading.Lock()
        self.stopping = False

    def chain(self, names, body):
        """Runs `body()` in a thread; the runs `names` are failed if it stops before them."""
        for name in names:
            self.events[name] = threading.Event()

        def guarded():
            try:
                body()
            except Exception:
                if not self.stopping:  # else the test session ended (and killed the run)
                    raise
            finally:
                for name in names:
                    self.events[name].set()
        threading.Thread(target=guarded, daemon=True).start()

    def run(self, name, args, fault=None, on_stdout=None, cmd=None, then=None):
        """Runs main.py `args` (or `cmd`) to the end, then `then()`; stores and returns its
        result (and only then do the tests waiting for it go on)."""
        if self.stopping:
            raise RuntimeError('stopping')
        env = {**ENV, utils.FAULT_ENV: fault} if fault else ENV
        err_path = os.path.join(self.root, f'{name}.err')
        with open(err_path, 'w') as err:
            proc = subprocess.Popen(cmd or [sys.executable, MAIN, *map(str, args)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            with self.lock:
                self.procs.append(proc)
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if on_stdout:
                    on_stdout(line, proc)
            code = proc.wait(timeout=TIMEOUT)
        with open(err_path) as f:
            result = types.SimpleNamespace(returncode=code, stdout=''.join(lines),
                                           stderr=f.read())
        if then:
            then()
        self.results[name] = result
        self.events[name].set()
        return result

    def result(self, name):
        self.events[name].wait(timeout=8 * TIMEOUT)
        if name not in self.results:
            pytest.fail(f'the background run {name!r} did not happen: an earlier one failed '
                        f'(see {self.root})')
        return self.results[name]

    def stop(self):
        """Kills the runs still going (ours, by their handles)."""
        self.stopping = True
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


# --- the workspace ---------------------------------------------------------------------------

FAULT_SAVE_FREQ = 2
KILLED = f'{NAME}.model-5'       # the first run dies while writing its second checkpoint
INTERRUPT_AFTER = 6              # its restart gets SIGINT when it reports step 6
SAVE_ONLY = f'''
import sys
import UGATIT
model = UGATIT.UGATIT(UGATIT.Config(**{TINY!r}, seed=1))
model.build_optimizers()
for counter in range(2, 9):
    model.save_checkpoint(sys.argv[1], counter)
'''
SAVE_ONLY_KILLED = f'{NAME}.model-8'   # the seventh save; rotation keeps 5 (3..7) before it
WRITE_FAILURE = f'''
import os, resource, signal, sys
import UGATIT, utils
model = UGATIT.UGATIT(UGATIT.Config(**{TINY!r}, seed=1))
model.build_optimizers()
for counter in (2, 3):
    model.save_checkpoint(sys.argv[1], counter)
data = os.path.join(sys.argv[1], '{NAME}.model-3.data-00000-of-00001')
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else exceeding the limit kills the process
resource.setrlimit(resource.RLIMIT_FSIZE,
                   (os.path.getsize(data) // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    model.save_checkpoint(sys.argv[1], 4)
except utils.UserError as err:
    print(err)
'''


def tiny_config(root, dataset, **changes):
    return ugatit.Config(**{**TINY, **changes}, dataset=dataset, seed=1,
                         dataset_dir=os.path.join(root, 'dataset'))


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """root/dataset/{tiny,odd}/ and root/ckpt/{light,full}/ (one checkpoint each, model-3)."""
    root = str(tmp_path_factory.mktemp('reliability'))
    huge = os.path.join(root, 'huge.jpg')
    write_huge(huge)
    for split in SPLITS:
        write_good(os.path.join(root, 'dataset', 'tiny', split))
        write_odd(os.path.join(root, 'dataset', 'odd', split), huge if split.endswith('A') else None)
    folders = {}
    for kind, light in (('light', True), ('full', False)):
        config = tiny_config(root, 'tiny', light=light)
        model = ugatit.UGATIT(config)
        model.build_optimizers()
        folders[kind] = os.path.join(root, 'ckpt', kind, config.model_dir)
        model.save_checkpoint(folders[kind], 3)
    return types.SimpleNamespace(root=root, checkpoints=folders)


@pytest.fixture(scope='module')
def saver(workspace):
    """A tiny model with its optimizers, to save in-process."""
    model = ugatit.UGATIT(ugatit.Config(**TINY, seed=3))
    model.build_optimizers()
    return model


def two_checkpoints(model, folder):
    for counter in (2, 3):
        model.save_checkpoint(str(folder), counter)
    return snapshot(folder)


def fault_args(ws):
    out = os.path.join(ws.root, 'fault')
    return [*TINY_ARGS, '--dataset', 'odd', '--dataset_dir', os.path.join(ws.root, 'dataset'),
            '--checkpoint_dir', os.path.join(out, 'checkpoint'), '--log_dir', os.path.join(out, 'logs'),
            '--sample_dir', os.path.join(out, 'samples'), '--result_dir', os.path.join(out, 'results'),
            '--epoch', '1', '--iteration', '100', '--save_freq', str(FAULT_SAVE_FREQ),
            '--print_freq', '1000', '--seed', '3']


def fault_folder(ws):
    config = tiny_config(ws.root, 'odd')
    return os.path.join(ws.root, 'fault', 'checkpoint', config.model_dir)


def fabricate_leftovers(folder):
    """What a kill leaves at moments the runs here do not stop at: a data file whose index
    was never renamed, and a temporary file of SaveV2 (its `.tempstate` suffix)."""
    leftovers = [os.path.join(folder, f'{NAME}.model-99.data-00000-of-00001'),
                 os.path.join(folder, f'.tmp-{NAME}.model-98.data-00000-of-00001.tempstate1')]
    for path in leftovers:
        with open(path, 'wb') as f:
            f.write(b'partial')
    return leftovers


@pytest.fixture(scope='module', autouse=True)
def start_early(request):
    """Starts the background runs with the module's first test if a selected test needs
    them, so that they overlap the in-process tests."""
    if any('runs' in item.fixturenames for item in request.session.items
           if item.module is request.module):
        request.getfixturevalue('runs')


@pytest.fixture(scope='module')
def runs(workspace):
    """Starts every background run at once; yields the Runs."""
    ws = workspace
    runs = Runs(ws.root)
    folder = fault_folder(ws)

    def copy_state(name):
        shutil.copytree(folder, os.path.join(ws.root, 'after', name))

    def faults():
        args = fault_args(ws)
        runs.run('killed', args, fault=f'kill@written@{KILLED}', then=lambda: copy_state('killed'))
        fabricate_leftovers(folder)
        sent = []

        def interrupt(line, proc):
            if not sent and f' step {INTERRUPT_AFTER}/' in line:
                proc.send_signal(signal.SIGINT)
                sent.append(line)
        # No periodic save: the one it reports is SIGINT's.
        runs.run('interrupted', args + ['--save_freq', '1000'], on_stdout=interrupt,
                 then=lambda: copy_state('interrupted'))
        runs.run('nan', args + ['--save_freq', '1', '--lr', '1e30'])

    def save_only(stage):
        folder = os.path.join(ws.root, 'save_only', stage)
        runs.run(f'save_only_{stage}', None, fault=f'kill@{stage}@{SAVE_ONLY_KILLED}',
                 cmd=[sys.executable, '-c', SAVE_ONLY, folder])

    runs.chain(['killed', 'interrupted', 'nan'], faults)
    runs.chain(['write_failure'], lambda: runs.run(
        'write_failure', None, cmd=[sys.executable, '-c', WRITE_FAILURE,
                                    os.path.join(ws.root, 'write_failure')]))
    for stage in utils.FAULT_STAGES:
        runs.chain([f'save_only_{stage}'], lambda stage=stage: save_only(stage))
    yield runs
    runs.stop()


# --- 1. bad inputs through the command line -----------------------------------------------

def run_main(args, capfd, caplog):
    """main.main in-process with fresh flags: (exit status, stdout, stderr lines). The
    stderr lines are what the command line would print: ours, and one per WARNING+ record."""
    caplog.clear()
    capfd.readouterr()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        try:
            main.main(['main.py', *map(str, args)])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    FLAGS.unparse_flags()
    out, err = capfd.readouterr()
    logged = [f'{r.levelname}: {r.getMessage()}' for r in caplog.records if r.levelno >= 30]
    return code, out, error_and_warning_lines(err) + logged, err


def make_dataset(root, missing=(), contents=None):
    """root/<splits> with GOOD_PER_FOLDER images, but no `missing` folders and
    `contents` {split: {name: bytes}} instead of the good images."""
    for split in SPLITS:
        if split in missing:
            continue
        folder = os.path.join(root, split)
        if contents and split in contents:
            os.makedirs(folder)
            for name, data in contents[split].items():
                with open(os.path.join(folder, name), 'wb') as f:
                    f.write(data)
        else:
            write_good(folder)


def corrupt(folder, how):
    """Damages the checkpoint in `folder` (its only one) the way `how` says."""
    prefix = glob.glob(os.path.join(folder, '*.index'))[0][:-len('.index')]
    data = prefix + '.data-00000-of-00001'
    if how == 'truncated index':
        os.truncate(prefix + '.index', 100)
    elif how == 'truncated data':
        os.truncate(data, os.path.getsize(data) // 2)
    elif how == 'no data':
        os.remove(data)
    elif how == 'only temporary files':   # a first save killed before its rename
        for path in glob.glob(os.path.join(folder, '*')):
            os.replace(path, os.path.join(folder, utils.TMP_PREFIX + os.path.basename(path)))


JUNK = {'zero.png': b'', 'junk.jpg': b'\xff\xd8\xff' + b'junk' * 20,
        'truncated.png': encoded('.png', noise(3))[:300]}
TEXTS = {'notes.txt': b'x', 'labels.csv': b'x', 'README': b'x'}


def case(id, args, code, words, dataset=None, checkpoint=None, damage=None, file_at=None):
    """One row of the table: `args` after the case's own folders; `dataset`: make_dataset's
    keyword arguments (default: a good one); `checkpoint`: 'light' or 'full' copied into the
    case's run folder (to resume) or 'LIGHT'/'FULL' (its path, for --checkpoint/--init_from);
    `damage`: `corrupt`'s `how` for the copied checkpoint; `file_at`: a flag whose folder is
    put under a regular file."""
    return pytest.param(dict(args=args, code=code, words=words, dataset=dataset or {},
                             checkpoint=checkpoint, damage=damage, file_at=file_at), id=id)


BAD_INPUTS = [
    # dataset folders
    case('missing dataset', ['--dataset', 'absent'], 1, ['absent', 'trainA', 'does not exist']),
    case('missing trainB', [], 1, ['trainB', 'does not exist', 'domain-B training'],
         dataset=dict(missing=['trainB'])),
    case('missing testA', ['--phase', 'test', '--checkpoint', 'LIGHT'], 1,
         ['testA', 'does not exist'], dataset=dict(missing=['testA'])),
    case('empty trainA', [], 1, ['trainA has no image', 'domain-A training'],
         dataset=dict(contents={'trainA': {}})),
    case('only non-image files', [], 1, ['trainA has no image', '3 other file(s)', 'labels.csv'],
         dataset=dict(contents={'trainA': TEXTS})),
    case('no readable training image', [], 1,
         ['None of the 3 images', 'trainB', 'zero.png: Input is empty', 'junk.jpg'],
         dataset=dict(contents={'trainB': JUNK})),
    case('no readable test image', ['--phase', 'test', '--checkpoint', 'LIGHT'], 1,
         ['none of the 3 images', 'testA', 'zero.png'], dataset=dict(contents={'testA': JUNK})),
    case('fewer images than a batch', ['--batch_size', str(GOOD_PER_FOLDER + 1)], 1,
         ['Only 3 readable', '--batch_size']),
    # flag values and combinations
    case('--lr nan', ['--lr', 'nan'], 2, ['--lr', 'nan']),
    case('--lr inf', ['--lr', 'inf'], 2, ['--lr', 'inf']),
    case('--lr beyond float32', ['--lr', '1e39'], 2, ['--lr', '1e+39']),
    case('--save_freq 0', ['--save_freq', '0'], 2, ['--save_freq']),
    case('--light maybe', ['--light', 'maybe'], 2, ['maybe', 'true or false']),
    case('--img_size too small for --n_dis', ['--img_size', '32', '--n_dis', '6'], 2,
         ['--n_dis 4', '--img_size 96']),
    case('--output without --input', ['--phase', 'test', '--output', 'x'], 2, ['--output', '--input']),
    case('--init_from missing', ['--init_from', 'nowhere/UGATIT.model-1'], 1, ['no checkpoint at']),
    # a checkpoint of another configuration
    case('light checkpoint, full model', ['--phase', 'test', '--light', 'False', '--checkpoint', 'LIGHT'],
         1, ['light model', '--light True']),
    case('full checkpoint, light model', ['--phase', 'test', '--checkpoint', 'FULL'], 1,
         ['full model', '--light False']),
    case('another --ch', ['--phase', 'test', '--ch', '8', '--checkpoint', 'LIGHT'], 1, ['--ch 4']),
    case('another --n_res', ['--phase', 'test', '--n_res', '2', '--checkpoint', 'LIGHT'], 1,
         ['--n_res 1']),
    case('another --n_dis (init_from)', ['--n_dis', '3', '--init_from', 'LIGHT'], 1, ['--n_dis 4']),
    case('another --img_size (full)', ['--phase', 'test', '--light', 'False', '--img_size', '64',
                                       '--checkpoint', 'FULL'], 1, ['--img_size 32']),
    case('resume with another --ch', ['--ch', '8'], 1, ['does not match', '--ch 4'],
         checkpoint='light'),
    # corrupt or half-written checkpoint folders
    case('truncated index', ['--phase', 'test'], 1, ['corrupt or half-written', 'model-3.*'],
         checkpoint='light', damage='truncated index'),
    case('truncated data, resume', [], 1, ['corrupt or half-written', 'model-3.*'],
         checkpoint='light', damage='truncated data'),
    case('missing data file', ['--phase', 'test'], 1, ['corrupt or half-written'],
         checkpoint='light', damage='no data'),
    case('only temporary files', ['--phase', 'test'], 1, ['no checkpoint in'],
         checkpoint='light', damage='only temporary files'),
    # output folders that cannot be written
    case('--checkpoint_dir under a file', [], 1, ['cannot create folder', '--checkpoint_dir'],
         file_at='--checkpoint_dir'),
    case('--sample_dir under a file', [], 1, ['cannot create folder', '--sample_dir'],
         file_at='--sample_dir'),
    case('--log_dir under a file', [], 1, ['cannot create folder', '--log_dir'], file_at='--log_dir'),
    case('--result_dir under a file', ['--phase', 'test', '--checkpoint', 'LIGHT'], 1,
         ['cannot create folder', '--result_dir'], file_at='--result_dir'),
    case('--output under a file', ['--phase', 'test', '--checkpoint', 'LIGHT', '--input', 'TESTA'],
         1, ['cannot create folder', '--output'], file_at='--output'),
]


@pytest.mark.parametrize('row', BAD_INPUTS)
def test_bad_input_gives_one_line_and_changes_nothing(workspace, tmp_path, capfd, caplog, row):
    """Each bad input: its exit status, exactly one stderr line (`error: …` naming the
    problem and the fix), no traceback, and no file written or deleted anywhere."""
    ws = workspace
    make_dataset(str(tmp_path / 'dataset' / 'case'), **row['dataset'])
    out = {flag: str(tmp_path / 'out' / flag.lstrip('-'))
           for flag in ('--checkpoint_dir', '--result_dir', '--log_dir', '--sample_dir', '--output')}
    config = tiny_config(str(tmp_path), 'case')
    if row['checkpoint']:
        run_folder = os.path.join(out['--checkpoint_dir'], config.model_dir)
        shutil.copytree(ws.checkpoints[row['checkpoint']], run_folder)
        if row['damage']:
            corrupt(run_folder, row['damage'])
    if row['file_at']:
        blocker = tmp_path / 'out' / 'a_file'
        blocker.parent.mkdir(exist_ok=True)
        blocker.write_text('in the way')
        out[row['file_at']] = str(blocker / 'sub')
    substitutes = {'LIGHT': ws.checkpoints['light'], 'FULL': ws.checkpoints['full'],
                   'TESTA': str(tmp_path / 'dataset' / 'case' / 'testA')}
    args = [*TINY_ARGS, '--dataset', 'case', '--dataset_dir', tmp_path / 'dataset',
            '--epoch', '1', '--iteration', '1',
            *[a for flag in ('--checkpoint_dir', '--result_dir', '--log_dir', '--sample_dir')
              for a in (flag, out[flag])],
            *[substitutes.get(a, a) for a in row['args']]]
    if '--input' in row['args']:
        args += ['--output', out['--output']]
    before = snapshot(tmp_path, ws.root + '/ckpt')
    code, _, lines, raw_err = run_main(args, capfd, caplog)
    assert code == row['code'], lines
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    assert 'Traceback' not in raw_err
    for word in row['words']:
        assert word in lines[0], (word, lines[0])
    assert snapshot(tmp_path, ws.root + '/ckpt') == before


@pytest.mark.skipif(IS_ROOT, reason='running as root: file permissions do not apply, so a '
                                    'chmod 000 image stays readable')
def test_unreadable_images_are_skipped_by_name(workspace, tmp_path, capfd, caplog):
    """Images without read permission: skipped with a warning naming each; all of a folder
    unreadable is the one error line."""
    make_dataset(str(tmp_path / 'dataset' / 'case'))
    folder = tmp_path / 'dataset' / 'case' / 'trainA'
    for path in folder.iterdir():
        path.chmod(0)
    args = [*TINY_ARGS, '--dataset', 'case', '--dataset_dir', tmp_path / 'dataset',
            '--checkpoint_dir', tmp_path / 'out']
    code, _, lines, _ = run_main(args, capfd, caplog)
    assert code == 1
    assert len(lines) == 1 and 'None of the 3 images' in lines[0] and 'good0.png' in lines[0]


def test_damaged_state_file_falls_back_to_the_newest_complete(saver, tmp_path):
    """An empty or garbled `checkpoint` state file, or one naming a missing checkpoint: the
    newest complete checkpoint is used (TF's reader would raise or warn twice)."""
    two_checkpoints(saver, tmp_path)
    os.remove(tmp_path / f'{NAME}.model-3.index')   # a damaged newest: not complete
    for text in ('', '@@ garbage {{', 'model_checkpoint_path: "UGATIT_light.model-9"\n'):
        (tmp_path / utils.CHECKPOINT_STATE).write_text(text)
        assert ugatit.resolve_checkpoint(str(tmp_path)) == str(tmp_path / f'{NAME}.model-2')


# --- 2. images of every format -------------------------------------------------------------------

def test_test_phase_reads_every_format_and_skips_broken_files(workspace, tmp_path, capfd, caplog):
    """testA and testB of every odd format, 8×8 and 8000×8000 included: each translated;
    each broken file skipped with a warning naming it; the non-images counted in one
    warning per folder; nothing else on stderr."""
    ws = workspace
    dataset = os.path.join(ws.root, 'dataset')
    args = [*TINY_ARGS, '--dataset', 'odd', '--dataset_dir', dataset, '--phase', 'test',
            '--checkpoint', ws.checkpoints['light'], '--result_dir', tmp_path]
    code, _, lines, raw_err = run_main(args, capfd, caplog)
    assert code == 0, lines
    # OpenCV's libjpeg would print this for a truncated JPEG (TF's own C++ line says "data").
    assert 'Traceback' not in raw_err and 'Premature end of JPEG file' not in raw_err
    results = tmp_path / tiny_config(ws.root, 'odd').model_dir
    expected_lines = []
    for direction, split in (('A2B', 'testA'), ('B2A', 'testB')):
        folder = os.path.join(dataset, 'odd', split)
        for name in usable_images(folder):
            for sub in ('', 'input', 'attention'):
                image = cv2.imread(str(results / direction / sub / name))
                assert image is not None and image.shape == (32, 32, 3), (direction, sub, name)
        for name in BROKEN:
            assert not (results / direction / name).exists()
            expected_lines.append(f'WARNING: Cannot read image {os.path.join(folder, name)}: '
                                  'replace or remove it; skipped')
        expected_lines.append(f'WARNING: Ignoring 2 non-image file(s) in {folder} '
                              '(Thumbs.db, notes.txt); images end in .bmp .gif .jpeg .jpg .png .webp.')
    assert sorted(lines) == sorted(expected_lines)


def test_training_uses_every_format_and_skips_broken_files(workspace, runs):
    """The first fault run trains on trainA/trainB of every odd format (8×8 and
    8000×8000 included): it warns once per broken file, naming it, and once per folder
    about the non-images, and says nothing else on stderr before it is killed."""
    result = runs.result('killed')
    folders = [os.path.join(workspace.root, 'dataset', 'odd', split) for split in ('trainA', 'trainB')]
    lines = error_and_warning_lines(result.stderr)
    assert all(DATASET_WARNING.match(line) for line in lines), lines
    skipped = sorted(re.findall(r'^WARNING:absl:Skipping unreadable image (\S+): ', result.stderr, re.M))
    assert skipped == sorted(os.path.join(f, name) for f in folders for name in BROKEN)
    ignoring = [line for line in lines if 'Ignoring 2 non-image file(s)' in line]
    assert len(ignoring) == 2 and all(any(f in line for line in ignoring) for f in folders)
    assert len(lines) == len(skipped) + len(ignoring)
    readable = [int(n) for n in re.findall(r'^INFO:absl:(\d+) readable training images', result.stderr, re.M)]
    assert readable == [len(usable_images(f)) for f in folders]


# --- 3. kills, Ctrl-C and NaN in real training runs -----------------------------------------

# The warnings about the odd dataset that every fault run starts with.
DATASET_WARNING = re.compile(r'^WARNING:absl:(Ignoring 2 non-image file|Skipping unreadable image)')


def saved_lines(stdout):
    return [os.path.basename(line.split(' ', 1)[1].strip())
            for line in stdout.splitlines() if line.startswith('saved ')]


def interrupted_save(runs):
    """(name, counter) of the checkpoint that SIGINT made the restart write."""
    name = saved_lines(runs.result('interrupted').stdout)[-1]
    return name, int(name.rsplit('-', 1)[1])


def test_kill_while_writing_a_checkpoint(workspace, runs):
    """SIGKILL after the second checkpoint's files are written under temporary names:
    model-3 stays the newest complete and listed one; model-5 was never reported saved."""
    result = runs.result('killed')
    assert result.returncode == -signal.SIGKILL
    assert saved_lines(result.stdout) == [f'{NAME}.model-3']
    folder = os.path.join(workspace.root, 'after', 'killed')
    assert complete(folder) == [3]
    assert listed(folder) == (f'{NAME}.model-3', [f'{NAME}.model-3'])
    assert hidden(folder) == [f'.tmp-{KILLED}.data-00000-of-00001', f'.tmp-{KILLED}.index']


def test_restart_after_a_kill_resumes_from_the_newest_complete(workspace, runs):
    """The restart resumes at step 2 from model-3 and removes what the kill left (the two
    temporary files, plus two fabricated leftovers of other moments)."""
    result = runs.result('interrupted')
    assert f'resuming from {fault_folder(workspace)}/{NAME}.model-3 (step 2)' in result.stderr
    assert 'Removed 4 file(s) of an interrupted checkpoint save' in result.stderr
    folder = os.path.join(workspace.root, 'after', 'interrupted')
    assert hidden(folder) == [] and not glob.glob(os.path.join(folder, f'{NAME}.model-99.*'))


def test_sigint_saves_after_the_step_and_exits_cleanly(workspace, runs):
    """SIGINT after step 6: the run finishes its step, saves (its only save: model-7 or
    later), and exits 130 with the notice and one `interrupted` line, no traceback."""
    result = runs.result('interrupted')
    assert result.returncode == main.EXIT_INTERRUPTED
    assert 'Traceback' not in result.stderr
    lines = [line for line in error_and_warning_lines(result.stderr)
             if not DATASET_WARNING.match(line)]
    assert lines == ['stopping after this step; press Ctrl-C again to stop at once',
                     'error: interrupted by SIGINT; the newest checkpoint is kept: run the '
                     'same command to resume']
    name, counter = interrupted_save(runs)
    assert len(saved_lines(result.stdout)) == 1 and counter > INTERRUPT_AFTER
    folder = os.path.join(workspace.root, 'after', 'interrupted')
    assert complete(folder) == [3, counter]
    assert listed(folder) == (name, [f'{NAME}.model-3', name])


def test_counters_agree_after_the_interruption(workspace, runs):
    """The checkpoint SIGINT wrote: counter N (its name), and N − 1 Adam steps for G and D
    alike (n_critic 1), so no half step was saved; every earlier step is in the loss log."""
    name, counter = interrupted_save(runs)
    prefix = os.path.join(workspace.root, 'after', 'interrupted', name)
    assert checkpoint_counters(prefix) == (counter, counter - 1, counter - 1)
    history = utils.LossHistory(os.path.join(workspace.root, 'fault', 'logs',
                                             tiny_config(workspace.root, 'odd').model_dir,
                                             'losses.jsonl'))
    assert sorted(history.read()) == list(range(1, counter))


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(workspace, runs):
    """The next start, with --lr 1e30 and a save after every step, resumes from the SIGINT
    checkpoint (step N − 1); its first step's losses are not finite: one error line names
    step N, nothing is saved, and the folder is byte for byte as SIGINT left it."""
    name, counter = interrupted_save(runs)
    result = runs.result('nan')
    assert result.returncode == 1
    assert f'resuming from {fault_folder(workspace)}/{name} (step {counter - 1})' in result.stderr
    lines = [line for line in error_and_warning_lines(result.stderr)
             if not DATASET_WARNING.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f'error: training diverged at step {counter}: ')
    assert 'not finite' in lines[0] and '--lr' in lines[0]
    assert saved_lines(result.stdout) == []
    after, before = fault_folder(workspace), os.path.join(workspace.root, 'after', 'interrupted')
    relative = lambda root: {os.path.relpath(p, root): h for p, h in snapshot(root).items()
                             if not p.endswith(main.FLAGFILE_NAME)}
    assert relative(after) == relative(before)


@pytest.mark.parametrize('stage', utils.FAULT_STAGES)
def test_kill_at_each_stage_of_a_save(workspace, runs, saver, stage):
    """A process that only saves (model-2 … model-7, five kept), killed at `stage` of saving
    model-8: the newest listed checkpoint loads with its counter; the next save clears the
    leftovers and keeps the newest five of ours."""
    result = runs.result(f'save_only_{stage}')
    assert result.returncode == -signal.SIGKILL, result.stderr
    folder = os.path.join(workspace.root, 'save_only', stage)
    newest = 8 if stage == 'listed' else 7
    assert listed(folder)[0] == f'{NAME}.model-{newest}'
    assert complete(folder) == ([3, 4, 5, 6, 7] if stage == 'written' else [3, 4, 5, 6, 7, 8])
    prefix, _ = saver.load_checkpoint(folder, optimizers=True)
    assert prefix == os.path.join(folder, f'{NAME}.model-{newest}')
    assert checkpoint_counters(prefix)[0] == newest
    utils.remove_partial_checkpoints(folder)
    saver.save_checkpoint(folder, 9)
    kept = [4, 5, 6, 7, 9] if stage == 'written' else [5, 6, 7, 8, 9]
    assert complete(folder) == kept and hidden(folder) == []
    assert listed(folder) == (f'{NAME}.model-9', [f'{NAME}.model-{n}' for n in kept])


# --- 4. full disk, NaN weights, free space, SIGTERM ------------------------------------------

@pytest.mark.parametrize('stage', ['written', 'renamed'])
def test_full_disk_during_a_save(saver, tmp_path, monkeypatch, stage):
    """ENOSPC (the hook) after the files are written, or after they are renamed: a
    one-line UserError saying so; the previous checkpoints, the state file and the folder
    are byte for byte as before (the partial checkpoint is removed)."""
    before = two_checkpoints(saver, tmp_path)
    name = f'{NAME}.model-4'
    monkeypatch.setenv(utils.FAULT_ENV, f'enospc@{stage}@{name}')
    with pytest.raises(utils.UserError) as err:
        saver.save_checkpoint(str(tmp_path), 4)
    message = str(err.value)
    assert '\n' not in message and f'cannot save checkpoint {tmp_path / name}' in message
    assert 'No space left on device' in message and 'previous checkpoints kept' in message
    assert snapshot(tmp_path) == before and hidden(tmp_path) == []


def test_real_write_failure_during_a_save(workspace, runs):
    """A process whose writes fail beyond half a checkpoint's size (RLIMIT_FSIZE: EFBIG,
    as a full disk fails them) while SaveV2 writes model-4: one-line UserError; model-2 and
    model-3 as before, the state file naming model-3, no partial file."""
    result = runs.result('write_failure')
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip().splitlines()[-1]
    folder = os.path.join(workspace.root, 'write_failure')
    assert message.startswith(f'cannot save checkpoint {folder}/{NAME}.model-4 (')
    assert 'File too large' in message and 'previous checkpoints kept' in message
    assert complete(folder) == [2, 3] and hidden(folder) == []
    assert listed(folder) == (f'{NAME}.model-3', [f'{NAME}.model-2', f'{NAME}.model-3'])


def test_non_finite_weights_are_never_saved(saver, tmp_path):
    """One NaN in a weight, or one infinity in an Adam slot: save_checkpoint raises,
    naming it, and writes nothing."""
    before = two_checkpoints(saver, tmp_path)
    weight = next(iter(saver.variables_by_name().items()))
    slot = next(iter(saver.optimizer_state_by_name().items()))
    for (name, variable), bad in ((weight, np.nan), (slot, np.inf)):
        good = variable.numpy()
        damaged = good.copy()
        damaged.flat[0] = bad
        variable.assign(damaged)
        try:
            with pytest.raises(utils.UserError, match=f'not saving.*{re.escape(name)}'):
                saver.save_checkpoint(str(tmp_path), 4)
        finally:
            variable.assign(good)
        assert snapshot(tmp_path) == before


def test_free_space_warning_and_checkpoint_size(saver, tmp_path, monkeypatch, caplog):
    """checkpoint_bytes is within 3% of a written checkpoint's size; with less free space
    than needed, check_free_space warns in one line naming the folder and the flag."""
    saver.save_checkpoint(str(tmp_path), 2)
    size = sum(os.path.getsize(p) for p in utils.checkpoint_files(str(tmp_path / f'{NAME}.model-2')))
    assert abs(saver.checkpoint_bytes() - size) < 0.03 * size
    usage = types.SimpleNamespace(total=10 ** 9, used=10 ** 9 - 5 * 10 ** 6, free=5 * 10 ** 6)
    monkeypatch.setattr(utils.shutil, 'disk_usage', lambda path: usage)
    folder = str(tmp_path / 'not' / 'made' / 'yet')
    assert utils.check_free_space(folder, 5 * 10 ** 6, 'x') is None
    with caplog.at_level('WARNING'):
        message = utils.check_free_space(folder, 6 * 10 ** 6, 'six checkpoints')
    assert message == (f'only 5 MB free on the disk of {folder}, and six checkpoints need 6 MB '
                       'more: free some space or choose another --checkpoint_dir')
    assert [r.getMessage() for r in caplog.records] == [message]


def test_sigterm_is_deferred_to_the_step_boundary():
    """StopRequests: a first SIGTERM only records itself (check() then raises Interrupted),
    a second raises KeyboardInterrupt, and restore() puts the old handlers back."""
    previous = signal.getsignal(signal.SIGTERM)
    stop = utils.StopRequests()
    try:
        stop.check()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(utils.Interrupted, match='SIGTERM'):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous
