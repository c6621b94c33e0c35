"""Tests of inference outside the dataset: --input (own images), --crop_face, --phase export.

Issue items 5 and 6, and their error paths. The tiny model (light, 32 px, n_dis 4, ch 4,
n_res 1) is saved once with `save_checkpoint` and loaded into a second model built with
another seed; the reference checkpoint of the original release (light, 96 px, ch 8) is copied
into the folder where the original's README puts a released checkpoint. The photos are
scikit-image's bundled samples (no download): `astronaut` has a frontal face, `coffee` none.
Everything runs in-process (main.main for the command-line errors) except one main.py
subprocess, a check of the real exit status and stderr, started in the background when the
module starts.
"""
import contextlib
import dataclasses
import glob
import io
import os
import re
import shutil
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

import main
import UGATIT as ugatit
import utils
from UGATIT import Config
from utils import UserError

FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = os.path.join(os.path.dirname(HERE), 'main.py')
REFERENCE = os.path.join(HERE, 'reference', 'light_96_ch8')
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': ''}
TIMEOUT = 600  # seconds per subprocess: a guard against hangs, not a speed assertion

TINY = dict(light=True, img_size=32, n_dis=4, ch=4, n_res=1, dataset='tiny')
TINY_ARGS = ['--light', 'True', '--img_size', '32', '--n_dis', '4', '--ch', '4', '--n_res', '1',
             '--dataset', 'tiny']
# The reference checkpoint's network flags; with the default --dataset its model_dir is the
# released model's folder name with UGATIT_light.
REFERENCE_CONFIG = dict(light=True, img_size=96, ch=8, n_res=4, n_dis=6)
FORWARD_TOL = 1e-4   # the reference README's tolerance for forward arrays
ODD_SHAPE = (45, 37)  # an input size that no resize maps evenly onto 32


# --- helpers ------------------------------------------------------------------------

def rgb_write(path, rgb):
    """Writes uint8 RGB (or grey, or RGBA, or uint16) with OpenCV; the format follows the name."""
    image = rgb
    if rgb.ndim == 3 and rgb.shape[-1] == 3:
        image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif rgb.ndim == 3 and rgb.shape[-1] == 4:
        image = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA)
    assert cv2.imwrite(path, image), path


def read_rgb(path):
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def small_photo(name, size=(53, 41)):
    """A scikit-image sample photo resized to `size` (w, h), uint8 RGB."""
    return cv2.resize(getattr(skimage.data, name)(), size, interpolation=cv2.INTER_AREA)


def files_under(path):
    return sorted(os.path.relpath(p, path)
                  for p in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                  if os.path.isfile(p))


def expected_translation(model, path, direction):
    """(input, translation) as uint8, the test phase's way: load_test_image, translate."""
    image = utils.load_test_image(path, model.config.img_size)
    fake, _ = model.translate(image[None], direction)
    return utils.to_uint8(image), utils.to_uint8(fake[0])


def configure(model, base, **changes):
    """Gives `model` the config `base` with --phase test and `changes` (the networks stay)."""
    model.config = dataclasses.replace(base, phase='test', **changes)
    model.config.validate()
    return model


def log_text(caplog):
    return '\n'.join(record.getMessage() for record in caplog.records)


def run_main(*args):
    """main.main in-process with fresh flags: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main.main(['main.py', *map(str, args)])
                code = 0
            except SystemExit as exit_info:
                code = exit_info.code
    FLAGS.unparse_flags()
    return code, out.getvalue(), err.getvalue()


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith('error: '), stderr
    return lines[0]


# --- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A folder holding checkpoint/<tiny model_dir>/ with one checkpoint of the tiny model."""
    root = tmp_path_factory.mktemp('inference')
    config = Config(**TINY, checkpoint_dir=str(root / 'checkpoint'),
                    result_dir=str(root / 'results'), seed=1)
    keras.utils.set_random_seed(1)
    source = ugatit.UGATIT(config)
    source.build_optimizers()
    source.save_checkpoint(os.path.join(config.checkpoint_dir, config.model_dir), 3)
    return root, config, source


@pytest.fixture(scope='module', autouse=True)
def cli_run(workspace):
    """main.py in the background: --input with a checkpoint of another configuration (the
    tiny one, run with --ch 8). Yields a function that waits for it: (status, stdout, stderr)."""
    root, config, _ = workspace
    photo = str(root / 'cli_photo.png')
    rgb_write(photo, small_photo('astronaut'))
    args = TINY_ARGS[:6] + ['--ch', '8'] + TINY_ARGS[8:] + [
        '--phase', 'test', '--input', photo, '--checkpoint_dir', config.checkpoint_dir,
        '--result_dir', str(root / 'cli_results')]
    proc = subprocess.Popen([sys.executable, MAIN, *args], cwd=str(root), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finished():
        out, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out, err
    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope='module')
def model(workspace):
    """A tiny model built with another seed, to load the workspace's checkpoint into."""
    _, config, _ = workspace
    keras.utils.set_random_seed(2)
    return ugatit.UGATIT(dataclasses.replace(config, seed=2))


# --- the original's checkpoint as a released one ----------------------------------------

def test_reference_checkpoint_translates_files(tmp_path):
    """The reference checkpoint (the original's TF1 format and names), put where the original's
    README puts the released model, loads without --checkpoint: the generators compute the
    original's outputs, and files translate as the test phase translates them."""
    config = Config(**REFERENCE_CONFIG, phase='test', checkpoint_dir=str(tmp_path / 'checkpoint'),
                    result_dir=str(tmp_path / 'results'))
    assert config.model_dir == 'UGATIT_light_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing'
    shutil.copytree(os.path.join(REFERENCE, 'ckpt'),
                    os.path.join(config.checkpoint_dir, config.model_dir))
    keras.utils.set_random_seed(5)
    model = ugatit.UGATIT(config)
    arrays = np.load(os.path.join(REFERENCE, 'reference.npz'))
    photos = tmp_path / 'photos'
    photos.mkdir()
    rgb_write(str(photos / 'a0.png'), utils.to_uint8(arrays['input_A'][0]))
    rgb_write(str(photos / 'face.jpg'), small_photo('astronaut', (120, 100)))

    page = configure(model, config, input=str(photos)).translate_input()

    out_dir = os.path.join(config.result_dir, config.model_dir, 'custom_A2B')
    assert page == os.path.join(out_dir, 'index.html')
    for prefix, key in (('a2b', 'input_A'), ('b2a', 'input_B')):
        fake, heatmap = model.translate(arrays[key], prefix.upper())
        np.testing.assert_allclose(fake, arrays[f'{prefix}.fake'], atol=FORWARD_TOL, rtol=FORWARD_TOL)
        np.testing.assert_allclose(heatmap, arrays[f'{prefix}.heatmap'], atol=FORWARD_TOL,
                                   rtol=FORWARD_TOL)
    for name, out in (('a0.png', 'a0.png'), ('face.jpg', 'face.png')):
        source, translation = expected_translation(model, str(photos / name), 'A2B')
        np.testing.assert_array_equal(read_rgb(os.path.join(out_dir, 'input', out)), source)
        np.testing.assert_array_equal(read_rgb(os.path.join(out_dir, out)), translation)


# --- --input ----------------------------------------------------------------------------

def write_mixed_folder(folder):
    """Every format --input reads, a name clash, an unreadable file, a text file, a dot-file.
    Returns {input name: output name} of the files that translate."""
    os.makedirs(folder)
    photo, other = small_photo('astronaut'), small_photo('coffee', (64, 48))
    rgb_write(os.path.join(folder, 'photo.jpg'), photo)
    rgb_write(os.path.join(folder, 'photo.png'), other)
    rgb_write(os.path.join(folder, 'grey.bmp'), cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))
    rgb_write(os.path.join(folder, 'rgba.png'), np.dstack([other, np.full(other.shape[:2], 128, np.uint8)]))
    rgb_write(os.path.join(folder, 'deep.tiff'), photo.astype(np.uint16) * 257)
    rgb_write(os.path.join(folder, 'anim.gif'), other)
    rgb_write(os.path.join(folder, 'pic.WEBP'), cv2.resize(photo, (31, 77)))
    rgb_write(os.path.join(folder, '.hidden.png'), photo)
    with open(os.path.join(folder, 'broken.jpg'), 'wb') as f:
        f.write(b'not a JPEG at all')
    with open(os.path.join(folder, 'notes.txt'), 'w') as f:
        f.write('not an image\n')
    return {'anim.gif': 'anim.png', 'deep.tiff': 'deep.png', 'grey.bmp': 'grey.png',
            'photo.jpg': 'photo_jpg.png', 'photo.png': 'photo_png.png', 'pic.WEBP': 'pic.png',
            'rgba.png': 'rgba.png'}


def test_input_folder_of_mixed_formats(workspace, model, tmp_path, caplog):
    """A folder: every readable image is translated (batches of 3, one unreadable file among
    them) exactly as the test phase would translate it; the unreadable file and the text file
    are named in warnings; outputs are PNGs named after the inputs, with an index page."""
    _, config, _ = workspace
    folder = str(tmp_path / 'mixed')
    names = write_mixed_folder(folder)
    out_dir = str(tmp_path / 'out')

    page = configure(model, config, input=folder, output=out_dir, batch_size=3).translate_input()

    assert page == os.path.join(out_dir, 'index.html')
    outputs = sorted(names.values())
    assert files_under(out_dir) == sorted(
        ['index.html'] + outputs + [f'{kind}/{name}' for kind in ('attention', 'input')
                                    for name in outputs])
    for source_name, out_name in names.items():
        source, translation = expected_translation(model, os.path.join(folder, source_name), 'A2B')
        np.testing.assert_array_equal(read_rgb(os.path.join(out_dir, 'input', out_name)), source)
        np.testing.assert_array_equal(read_rgb(os.path.join(out_dir, out_name)), translation)
    with open(page, encoding='utf-8') as f:
        text = f.read()
    assert f'A2B: {folder}' in text
    assert re.findall(r'<td>([^<]+)</td>', text) == [names[k] for k in sorted(names)]
    logs = log_text(caplog)
    assert re.search(r'cannot read image \S*broken\.jpg.*skipped', logs), logs
    assert 'notes.txt' in logs and '.hidden.png' not in logs


def test_input_single_file_of_any_size(workspace, model, tmp_path):
    """One grey file of an odd size, B2A, default --output: result_dir/model_dir/custom_B2A."""
    _, config, _ = workspace
    path = str(tmp_path / 'odd.png')
    rgb_write(path, cv2.cvtColor(small_photo('astronaut', ODD_SHAPE[::-1]), cv2.COLOR_RGB2GRAY))
    config = dataclasses.replace(config, result_dir=str(tmp_path / 'results'))

    page = configure(model, config, input=path, direction='B2A').translate_input()

    out_dir = os.path.join(config.result_dir, config.model_dir, 'custom_B2A')
    assert page == os.path.join(out_dir, 'index.html')
    assert files_under(out_dir) == ['attention/odd.png', 'index.html', 'input/odd.png', 'odd.png']
    _, translation = expected_translation(model, path, 'B2A')
    output = read_rgb(os.path.join(out_dir, 'odd.png'))
    assert output.shape == (32, 32, 3)
    np.testing.assert_array_equal(output, translation)
    _, other_direction = expected_translation(model, path, 'A2B')
    assert not np.array_equal(output, other_direction)


def test_read_input_matches_load_test_image(tmp_path):
    """read_image_rgb + to_model_input are load_test_image split in two (for the face crop)."""
    path = str(tmp_path / 'p.png')
    rgb_write(path, np.dstack([small_photo('coffee'), np.zeros((41, 53), np.uint8)]))
    for img_ch in (1, 3):
        np.testing.assert_array_equal(
            utils.to_model_input(utils.read_image_rgb(path), 32, img_ch),
            utils.load_test_image(path, 32, img_ch))


def test_output_never_overwrites_an_input(workspace, model, tmp_path):
    """--output set to the --input folder: refused before anything is read or written."""
    _, config, _ = workspace
    path = tmp_path / 'me.png'
    rgb_write(str(path), small_photo('astronaut'))
    before = path.read_bytes()
    with pytest.raises(UserError, match='would overwrite the input .*me.png: choose another --output'):
        configure(model, config, input=str(tmp_path), output=str(tmp_path)).translate_input()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['me.png']


def test_output_names_resolve_stem_clashes():
    assert utils.output_names(['d/a.jpg', 'd/A.png', 'd/b.gif']) == {
        'd/a.jpg': 'a_jpg.png', 'd/A.png': 'A_png.png', 'd/b.gif': 'b.png'}


# --- --crop_face ------------------------------------------------------------------------

def test_crop_face_with_and_without_a_face(workspace, model, tmp_path, caplog):
    """astronaut: the generator sees the square around her face (FACE_CROP_SCALE × the box,
    centred on it); coffee: no face, said for that file, and the whole image is used."""
    _, config, _ = workspace
    folder = tmp_path / 'photos'
    folder.mkdir()
    astronaut, coffee = skimage.data.astronaut(), skimage.data.coffee()
    rgb_write(str(folder / 'astronaut.png'), astronaut)
    rgb_write(str(folder / 'coffee.png'), coffee)
    out_dir = str(tmp_path / 'out')

    configure(model, config, input=str(folder), output=out_dir, crop_face=True).translate_input()

    box = utils.find_face(astronaut, utils.face_detector())
    x, y, w, h = box
    assert abs(x - 177) <= 5 and abs(y - 66) <= 5 and 85 <= w <= 105, box  # her face
    crop = utils.square_crop(astronaut, box)
    side = round(utils.FACE_CROP_SCALE * max(w, h))
    assert crop.shape == (side, side, 3)
    top, left = round(y + h / 2 - side / 2), round(x + w / 2 - side / 2)
    np.testing.assert_array_equal(crop, astronaut[top:top + side, left:left + side])
    for name, seen in (('astronaut.png', crop), ('coffee.png', coffee)):
        expected = utils.to_uint8(utils.to_model_input(seen, 32))
        np.testing.assert_array_equal(read_rgb(os.path.join(out_dir, 'input', name)), expected)
    logs = log_text(caplog)
    assert re.findall(r'no face found in (\S+):', logs) == [str(folder / 'coffee.png')], logs


def test_find_face_takes_the_largest():
    """Two copies of the astronaut, full size and half size: the full-size face wins."""
    astronaut = skimage.data.astronaut()
    half = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    collage = np.concatenate([astronaut, np.pad(half, ((0, 256), (0, 0), (0, 0)), mode='edge')],
                             axis=1)
    x, y, w, h = utils.find_face(collage, utils.face_detector())
    assert x < 512 and w > 80, (x, y, w, h)
    assert utils.find_face(skimage.data.coffee(), utils.face_detector()) is None


def test_square_crop_shifts_inside_or_replicates_edges():
    square = (np.arange(100 * 100 * 3).reshape(100, 100, 3) % 251).astype(np.uint8)
    image = square[:30]
    # In a corner: shifted to start at row 0, column 0 (the face centre is at 10, the side 40).
    np.testing.assert_array_equal(utils.square_crop(square, (0, 0, 20, 20), 2.0), square[:40, :40])
    # Taller than the image: centred vertically on the face (rows −5…34), edges repeated.
    crop = utils.square_crop(image, (40, 5, 20, 20), 2.0)
    assert crop.shape == (40, 40, 3)
    np.testing.assert_array_equal(crop[5:35], image[:, 30:70])
    np.testing.assert_array_equal(crop[:5], np.repeat(image[:1, 30:70], 5, axis=0))
    np.testing.assert_array_equal(crop[35:], np.repeat(image[-1:, 30:70], 5, axis=0))
    # At the right edge: shifted left to end at the last column.
    crop = utils.square_crop(image, (90, 10, 10, 10), 2.0)
    np.testing.assert_array_equal(crop, image[5:25, 80:100])


# --- --phase export ---------------------------------------------------------------------

def tf_resized(images, size):
    """What the serving signature feeds the generator, before normalisation: uint8 values."""
    resized = tf.image.resize(tf.cast(images, tf.float32), [size, size], method='bilinear',
                              antialias=False)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def test_export_round_trip(workspace, model, capsys):
    """Export, reload with tf.saved_model.load, run the signature on uint8 images of an odd
    size: the same translation as in-process on the same resized input, generator weights
    only. Also measures the resize against the test phase's cv2 INTER_LINEAR."""
    _, config, _ = workspace
    configure(model, config)
    root = model.export()
    assert root == os.path.join(config.checkpoint_dir, config.model_dir, 'export')
    assert sorted(os.listdir(root)) == ['A2B', 'B2A']
    model.export()  # a second export replaces the first and leaves no temporary folder
    assert sorted(os.listdir(root)) == ['A2B', 'B2A']

    rng = np.random.default_rng(0)
    photos = np.stack([small_photo('astronaut', ODD_SHAPE[::-1]),
                       small_photo('coffee', ODD_SHAPE[::-1])])
    noise = rng.integers(0, 256, (1, *ODD_SHAPE, 3), dtype=np.uint8)
    images = np.concatenate([photos, noise])
    resized = tf_resized(images, config.img_size)
    # The test phase's cv2 INTER_LINEAR samples the same points; its 8-bit fixed point differs.
    cv = np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_LINEAR) for im in images])
    worst = {'resize: tf bilinear vs cv2 INTER_LINEAR': np.abs(cv.astype(int) - resized).max()}
    assert worst['resize: tf bilinear vs cv2 INTER_LINEAR'] <= 1
    for direction, generator in zip(ugatit.DIRECTIONS, model.generators):
        folder = os.path.join(root, direction)
        stored = tf.train.list_variables(os.path.join(folder, 'variables', 'variables'))
        stored = [(name, shape) for name, shape in stored if name != '_CHECKPOINTABLE_OBJECT_GRAPH']
        assert not [n for n, _ in stored if re.search(r'disc|adam|optimizer|iteration', n, re.I)]
        assert sum(int(np.prod(shape)) for _, shape in stored) == generator.count_params()

        serve = tf.saved_model.load(folder).signatures['serving_default']
        spec = serve.structured_input_signature[1]['images']
        assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
        out = serve(images=tf.constant(images))
        assert sorted(out) == ['attention', 'translation']
        assert out['translation'].dtype == tf.uint8 and out['attention'].dtype == tf.float32
        assert out['translation'].shape == (3, 32, 32, 3)
        assert out['attention'].shape == (3, 8, 8)

        fake, heatmap = model.translate(np.float32(resized / utils.PIXEL_HALF_RANGE - 1), direction)
        diff = np.abs(out['translation'].numpy().astype(int) - utils.to_uint8(fake).astype(int))
        worst[f'{direction} export vs in-process, same resized input'] = diff.max()
        assert diff.max() <= 1
        np.testing.assert_allclose(out['attention'].numpy(), heatmap, atol=1e-5, rtol=1e-5)

        # The test phase resizes with OpenCV instead: reported, not bounded (random weights).
        fake_cv, _ = model.translate(np.float32(cv / utils.PIXEL_HALF_RANGE - 1), direction)
        worst[f'{direction} export vs test phase (cv2 resize)'] = np.abs(
            out['translation'].numpy().astype(int) - utils.to_uint8(fake_cv).astype(int)).max()
    with capsys.disabled():
        print('\n' + '\n'.join(f'  max |Δ| {k}: {v} grey levels' for k, v in sorted(worst.items())))


# --- error paths --------------------------------------------------------------------------

def test_input_with_checkpoint_of_another_configuration(cli_run, workspace):
    """main.py --input with --ch 8 on a ch 4 checkpoint: exit 1, one stderr line saying
    --ch 4, nothing written."""
    root, _, _ = workspace
    code, _, err = cli_run()
    assert code == 1, err
    line = one_error_line(err)
    assert 'does not match' in line and '--ch 4' in line
    assert not os.path.exists(root / 'cli_results')


@pytest.fixture
def error_dirs(tmp_path):
    """Flags pointing every output folder under tmp_path/run (which must stay empty)."""
    run = tmp_path / 'run'
    return run, ['--checkpoint_dir', run / 'checkpoint', '--result_dir', run / 'results',
                 '--log_dir', run / 'logs', '--sample_dir', run / 'samples']


def test_export_with_checkpoint_of_another_configuration(workspace, error_dirs):
    """--phase export, --light False, --checkpoint of a light model: exit 1, the flag named,
    nothing written."""
    _, config, _ = workspace
    run, dirs = error_dirs
    code, _, err = run_main(*TINY_ARGS, *dirs, '--light', 'False', '--phase', 'export',
                            '--checkpoint', os.path.join(config.checkpoint_dir, config.model_dir))
    assert code == 1
    line = one_error_line(err)
    assert 'light' in line and '--light True' in line
    assert files_under(str(run)) == []


@pytest.mark.parametrize('case, words', [
    ('missing', ['--input', 'nowhere', 'does not exist']),
    ('unreadable_file', ['cannot read image', 'broken.jpg']),
    ('unreadable_folder', ['none of the 2 images', 'bad_folder']),
    ('no_images', ['holds no image']),
])
def test_bad_input_exits_1_with_one_line(workspace, error_dirs, tmp_path, case, words):
    _, config, _ = workspace
    run, dirs = error_dirs
    paths = {'missing': tmp_path / 'nowhere', 'unreadable_file': tmp_path / 'broken.jpg',
             'unreadable_folder': tmp_path / 'bad_folder', 'no_images': tmp_path / 'texts'}
    (tmp_path / 'broken.jpg').write_bytes(b'junk')
    (tmp_path / 'bad_folder').mkdir()
    for name in ('a.png', 'b.jpg'):
        (tmp_path / 'bad_folder' / name).write_bytes(b'junk')
    (tmp_path / 'texts').mkdir()
    (tmp_path / 'texts' / 'readme.txt').write_text('hello')
    code, _, err = run_main(*TINY_ARGS, *dirs, '--checkpoint_dir', config.checkpoint_dir,
                            '--phase', 'test', '--input', paths[case],
                            '--output', run / 'out')
    assert code == 1, err
    line = one_error_line(err)
    for word in words:
        assert word in line
    assert files_under(str(run)) == []


@pytest.mark.parametrize('phase_args', [['--phase', 'export'],
                                        ['--phase', 'test', '--input', 'PHOTO']])
def test_no_checkpoint_exits_1_and_writes_nothing(error_dirs, tmp_path, phase_args):
    """--phase export or --input with no checkpoint: exit 1, one line naming the folder."""
    run, dirs = error_dirs
    photo = str(tmp_path / 'p.png')
    rgb_write(photo, small_photo('astronaut'))
    args = [photo if a == 'PHOTO' else a for a in phase_args]
    code, _, err = run_main(*TINY_ARGS, *dirs, *args)
    assert code == 1
    line = one_error_line(err)
    assert 'no checkpoint folder' in line and str(run / 'checkpoint') in line
    assert files_under(str(run)) == []


@pytest.mark.parametrize('args, words', [
    (['--phase', 'test', '--crop_face', 'True'], ['--crop_face', '--input']),
    (['--phase', 'test', '--output', 'somewhere'], ['--output', '--input']),
    (['--phase', 'train', '--input', 'x.png'], ['--input', '--phase test']),
    (['--phase', 'export', '--input', 'x.png'], ['--input', '--phase test']),
    (['--phase', 'test', '--input', 'x.png', '--direction', 'A2A'], ['direction']),
])
def test_inference_flags_in_the_wrong_place_exit_2(error_dirs, args, words):
    run, dirs = error_dirs
    code, _, err = run_main(*TINY_ARGS, *dirs, *args)
    assert code == 2, err
    line = one_error_line(err)
    for word in words:
        assert word in line
    assert files_under(str(run)) == []


def test_config_rejects_an_unknown_direction():
    with pytest.raises(UserError, match='--direction must be A2B or B2A'):
        Config(direction='A2A').validate()
