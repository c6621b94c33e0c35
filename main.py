"""U-GAT-IT command line: the original release's flags, then train or test.

    python main.py --dataset selfie2anime --light True          # train
    python main.py --dataset selfie2anime --phase test          # translate testA/testB
    python main.py --dataset selfie2anime --phase test --input me.jpg --crop_face True
    python main.py --dataset selfie2anime --phase eval          # KID x 100 and FID, as the paper
    python main.py --dataset selfie2anime --phase export        # a SavedModel per direction
    python main.py --phase benchmark --light True --benchmark_json bench.json
    python main.py --dataset selfie2anime --distribute mirrored --gpus 0,1   # two GPUs
    TF_CONFIG='{...}' python main.py --dataset selfie2anime --distribute multi_worker

Every flag of the original `main.py` keeps its name and default. Booleans
accept true/false/1/0/yes/no in any case, as `--light False`, `--light=false`,
`--light` or `--nolight`. Bad flags and bad input give one line on stderr
(exit status 2 for flags, 1 for everything else); `--debug` shows tracebacks.
Ctrl-C (or SIGTERM) while training saves a checkpoint after the current step and
exits with status 130; a second Ctrl-C stops at once.
"""

import contextlib
import dataclasses
import os
import sys
import tempfile

# TensorFlow's C++ log lines (start-up notes, and decoder errors such as "Premature end of
# JPEG data" for a file we then skip by name) would break "one line per error" on stderr;
# the errors that matter also reach Python as exceptions.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags, logging

FLAGS = flags.FLAGS
# absl.logging defines its own --log_dir (for log files, which we do not write); the
# original's --log_dir (TensorBoard) keeps its name, so absl's gives way.
if 'log_dir' in FLAGS:
    delattr(FLAGS, 'log_dir')

TRUE_WORDS = ('true', '1', 'yes')
FALSE_WORDS = ('false', '0', 'no')
EXIT_USAGE, EXIT_FAILURE = 2, 1
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT


class StrictBoolParser(flags.BooleanParser):
    """true/false/1/0/yes/no in any case, nothing else (the original read '1' and 'yes' as False)."""

    def parse(self, argument):
        if isinstance(argument, bool):
            return argument
        word = str(argument).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f'{argument!r} is not a boolean: use true or false')


def define_bool(name, default, help_text):
    flags.DEFINE_flag(flags.Flag(StrictBoolParser(), None, name, default, help_text, boolean=True))


# The original's flags, in its order, with its defaults.
flags.DEFINE_enum('phase', 'train', ['train', 'test', 'eval', 'export', 'benchmark'],
                  'train, test, eval (KID and FID on the test images), export (a TensorFlow '
                  'SavedModel per direction), or benchmark (time the training and translation '
                  'steps on generated images)')
define_bool('light', False, 'light model: the gamma/beta MLP sees pooled features (the paper version is full)')
flags.DEFINE_string('dataset', 'selfie2anime', 'dataset folder name under --dataset_dir (demo: a built-in synthetic one)')
flags.DEFINE_integer('epoch', 100, 'number of epochs; one epoch is --iteration steps')
flags.DEFINE_integer('iteration', 10000, 'steps per epoch')
flags.DEFINE_integer('batch_size', 1, 'images per domain per step')
flags.DEFINE_integer('print_freq', 1000, 'save sample images every N steps')
flags.DEFINE_integer('save_freq', 1000, 'save a checkpoint every N steps')
define_bool('decay_flag', True, 'decay the learning rate linearly from --decay_epoch on')
flags.DEFINE_integer('decay_epoch', 50, 'epoch at which the decay starts')
flags.DEFINE_float('lr', 0.0001, 'learning rate of both optimizers')
flags.DEFINE_integer('GP_ld', 10, 'gradient-penalty weight (wgan-gp, wgan-lp, dragan)')
flags.DEFINE_integer('adv_weight', 1, 'weight of the adversarial losses')
flags.DEFINE_integer('cycle_weight', 10, 'weight of the cycle-consistency losses')
flags.DEFINE_integer('identity_weight', 10, 'weight of the identity losses')
flags.DEFINE_integer('cam_weight', 1000, 'weight of the CAM losses')
flags.DEFINE_enum('gan_type', 'lsgan', ['lsgan', 'gan', 'hinge', 'wgan', 'wgan-gp', 'wgan-lp', 'dragan'],
                  'adversarial loss')
define_bool('smoothing', True, 'AdaLIN uses clip(rho - 0.1, 0, 1)')
flags.DEFINE_integer('ch', 64, 'base channel count')
flags.DEFINE_integer('n_res', 4, 'residual blocks in the encoder and in the decoder')
flags.DEFINE_integer('n_dis', 6, 'discriminator depth (global: n_dis - 1 stride-2 convs)')
flags.DEFINE_integer('n_critic', 1, 'discriminator updates per generator update')
define_bool('sn', True, 'spectral normalisation in the discriminators')
flags.DEFINE_integer('img_size', 256, 'image side in pixels')
flags.DEFINE_integer('img_ch', 3, 'image channels (1 or 3)')
define_bool('augment_flag', True, 'training augmentation: flip, resize up, random crop')
flags.DEFINE_string('checkpoint_dir', 'checkpoint', 'where checkpoints go (a folder per run)')
flags.DEFINE_string('result_dir', 'results', 'where test outputs go')
flags.DEFINE_string('log_dir', 'logs', 'where TensorBoard logs go')
flags.DEFINE_string('sample_dir', 'samples', 'where training samples go')
# Ours.
flags.DEFINE_string('dataset_dir', 'dataset', 'the folder holding the datasets')
flags.DEFINE_integer('seed', None, 'seed for initialisation, data order, augmentation and noise')
flags.DEFINE_string('init_from', '', 'train: start a new run from the weights of this checkpoint '
                    '(a folder or file, ours or the original release\'s)')
flags.DEFINE_string('checkpoint', '', 'test, export: use this checkpoint (a folder or file) instead of the '
                    'newest in checkpoint_dir/model_dir')
flags.DEFINE_string('input', '', 'test: translate this image file, or the images of this folder, '
                    'instead of testA/testB (any size and format)')
flags.DEFINE_enum('direction', 'A2B', ['A2B', 'B2A'], '--input: A2B or B2A')
flags.DEFINE_string('output', '', '--input: the folder for the results (default: '
                    'result_dir/model_dir/custom_<direction>)')
define_bool('crop_face', False, '--input: crop a square around the largest face first (OpenCV)')
flags.DEFINE_integer('eval_freq', 0, 'train: compute KID and FID on the test images every N steps '
                     'of an epoch and log them to TensorBoard (0: never)')
flags.DEFINE_string('inception_weights', '', 'eval, --eval_freq: an InceptionV3 weights file, for '
                    'machines without internet (default: the ImageNet weights Keras downloads '
                    'once into ~/.keras/models)')
flags.DEFINE_integer('benchmark_steps', 5, 'benchmark: timed runs of each step (after one warm-up)')
flags.DEFINE_string('benchmark_json', '', 'benchmark: also write the figures to this JSON file')
flags.DEFINE_enum('distribute', 'none', ['none', 'mirrored', 'multi_worker'],
                  'train: none (one device), mirrored (every GPU of this machine, or --gpus; '
                  'also benchmark) or multi_worker (the machines of the TF_CONFIG environment '
                  'variable); --batch_size is per replica')
flags.DEFINE_string('gpus', '', '--distribute mirrored: the GPUs to use, e.g. 0,1 (default: '
                    'every visible GPU)')
define_bool('recompute', False, 'train, benchmark: recompute the generator blocks\' activations in '
            'the backward pass instead of keeping them (gradient checkpointing): less memory, '
            'about a fifth more time per generator update, the same results')
define_bool('xla', False, 'train, benchmark, test: compile the training steps and the translation '
            'with XLA (jit_compile); for GPUs: on CPU it traces twice as long for ~10% faster steps')
flags.DEFINE_enum('mixed_precision', 'none', ['none', 'float16', 'bfloat16'],
                  'train, benchmark, test: compute in float16 (with dynamic loss scaling) or '
                  'bfloat16, variables, outputs and losses in float32 (Keras mixed precision); '
                  'for GPU tensor cores: not faster on CPU (float16 slower), so none by default')
define_bool('debug', False, 'show Python tracebacks')

FLAGFILE_NAME = 'flags.txt'


def normalise_bool_args(argv):
    """`--light False` -> `--light=False`: absl would read it as `--light` plus a stray word."""
    names = {name for name, flag in FLAGS._flags().items() if flag.boolean}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.lstrip('-') if arg.startswith('-') and '=' not in arg else None
        if name in names and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
            out.append(f'{arg}={argv[i + 1]}')
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def fail(message, status):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(status)


def parse_args(argv):
    if any(arg in ('--help', '-h', '--helpshort') for arg in argv[1:]):
        print(__doc__)
        print(FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    try:
        rest = FLAGS(normalise_bool_args(argv))
    except flags.Error as err:
        fail(str(err).removeprefix('ERROR:: '), EXIT_USAGE)
    if len(rest) > 1:
        fail(f'unexpected argument {rest[1]!r}: flags are written --name value or --name=value',
             EXIT_USAGE)


def our_flags():
    return FLAGS.get_flags_for_module(sys.modules[__name__])


def make_config():
    import UGATIT  # after flag parsing: TensorFlow loads in ~3 s
    fields = {f.name for f in dataclasses.fields(UGATIT.Config)}
    return UGATIT.Config(**{f.name: f.value for f in our_flags() if f.name in fields})


def save_flagfile(config):
    """The resolved flags in the run folder, replayable with --flagfile."""
    import utils
    folder = utils.check_folder(os.path.join(config.checkpoint_dir, config.model_dir),
                                '--checkpoint_dir')
    text = ''.join(f'{f.serialize()}\n' for f in our_flags() if f.name != 'debug' and f.value is not None)
    with open(os.path.join(folder, FLAGFILE_NAME), 'w') as f:
        f.write(text)


def run(config):
    import UGATIT
    model = UGATIT.UGATIT(config)  # first: --distribute multi_worker starts the cluster here
    if not model.is_chief:
        logging.set_verbosity(logging.WARNING)  # the chief reports for the whole cluster
    else:
        print(' '.join(f'{f.name}={f.value}' for f in our_flags() if f.name != 'debug'),
              flush=True)
        for net in model.networks:
            print(f'{net.name}: {net.count_params():,} parameters', flush=True)
        if model.distributed:
            print(f'{model.replicas} replicas of --batch_size {config.batch_size}: '
                  f'{model.replicas * config.batch_size} images per domain per step', flush=True)
    if config.phase == 'train':
        counter = model.train(on_start=(lambda: save_flagfile(config)) if model.is_chief else None)
        if model.is_chief:
            print(f'done: {counter - 1} steps; checkpoints in '
                  f'{os.path.join(config.checkpoint_dir, config.model_dir)}')
    elif config.phase == 'benchmark':
        model.benchmark()
    elif config.phase == 'export':
        print(f'done: SavedModels in {model.export()}')
    elif config.phase == 'eval':
        print(f'done: figures in {model.evaluate()}')
    elif config.input:
        print(f'done: results in {model.translate_input()}')
    else:
        page = model.test()
        print(f'done: results in {page}')


@contextlib.contextmanager
def native_stderr_held():
    """Holds back what is written to file descriptor 2 meanwhile, and shows it only if the
    block fails: TensorFlow's import prints start-up notes from C++ ("oneDNN custom
    operations are on", on CPUs with AVX-512) that TF_CPP_MIN_LOG_LEVEL no longer silences."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors='replace'))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv):
    parse_args(argv)
    logging.set_verbosity(logging.INFO)
    with native_stderr_held():
        import utils   # and with it TensorFlow
    utils.limit_malloc_arenas()  # before TensorFlow's threads allocate: ~1 GB less at 256 px
    try:
        config = make_config()
        config.validate()
    except utils.UserError as err:
        fail(str(err), EXIT_USAGE)
    if config.seed is not None:
        import keras
        keras.utils.set_random_seed(config.seed)
    try:
        run(config)
    except (utils.UserError, OSError) as err:
        if FLAGS.debug:
            raise
        # An OSError that no check foresaw (a disk filling up while logs are written):
        # errno's words and the file still say what is wrong.
        fail(str(err) if isinstance(err, utils.UserError) else
             f'{err.strerror or err}: {err.filename or "(no file)"}', EXIT_FAILURE)
    except KeyboardInterrupt as err:
        if FLAGS.debug:
            raise
        saved = ('the newest checkpoint is kept: run the same command to resume'
                 if config.phase == 'train' else 'nothing else is written')
        how = f' by {err}' if isinstance(err, utils.Interrupted) else ''
        fail(f'interrupted{how}; {saved}', EXIT_INTERRUPTED)


if __name__ == '__main__':
    main(sys.argv)
