"""Tests of utils.py: file listing, the training pipeline, test-image I/O and the demo data.

Spec §10. Every image is generated here in tmp_path (PIL for the formats OpenCV
cannot write, such as palette PNG and animated GIF). Expected pixels come from the
arrays we wrote and from a NumPy version of the legacy bilinear kernel, not from utils.
"""
import hashlib
import json
import logging
import os
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import utils

SIZE = 8                      # training side S in most tests
SRC_H, SRC_W = 6, 10          # source images: non-square, and S/H, S/W are exact in binary
NORM_ATOL = 1e-5              # float32 round-off on the [-1, 1] scale
ONE_LEVEL = 1 / 127.5         # one 8-bit level on the [-1, 1] scale
JPEG_ATOL = 10 * ONE_LEVEL    # TF decodes JPEG with libjpeg's fast integer IDCT (as the original);
                              # OpenCV's accurate IDCT differs by up to 8 levels on sharp edges
PALETTE = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 200, 0], [0, 0, 255],
                    [250, 220, 20], [30, 180, 200], [140, 60, 170]], dtype=np.uint8)


# --- helpers ---------------------------------------------------------------------

def pattern(seed=0, h=SRC_H, w=SRC_W):
    """uint8 [h, w, 3] of PALETTE colours: lossless in every format, GIF included."""
    return PALETTE[np.random.default_rng(seed).integers(0, len(PALETTE), (h, w))]


def write_rgb(path, rgb, **options):
    Image.fromarray(rgb).save(path, **options)
    return str(path)


def np_legacy_resize(img, size):
    """TF1 bilinear (align_corners=False, no half-pixel centres) in float64: [H, W, C] → [S, S, C]."""
    img = np.float64(img)
    h, w = img.shape[:2]

    def taps(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo)

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    fx = fx[None, :, None]
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx
    return top + (bottom - top) * fy[:, None, None]


def expected_train(rgb, size=SIZE):
    """What the pipeline should give for decoded pixels `rgb` without augmentation."""
    return np_legacy_resize(rgb, size) / 127.5 - 1


def batches(files, n=1, size=SIZE, img_ch=3, batch_size=1, augment=False, seed=0):
    """The first `n` batches of a fresh build_dataset, as a NumPy [n, B, S, S, C] array."""
    ds = utils.build_dataset([str(f) for f in files], size, img_ch, batch_size, augment, seed=seed)
    return np.stack([b.numpy() for b in ds.take(n)])


def warnings_text(caplog):
    return '\n'.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --- list_images -----------------------------------------------------------------

def test_list_images_sorted_skips_dotfiles_dirs_and_counts_non_images(tmp_path, caplog):
    """Images of any extension case, sorted; dot-files and folders skipped; others counted."""
    for name in ('b.png', 'a.JPG', 'c.webp', 'd.jpeg', 'e.bmp', 'f.gif', '.hidden.png',
                 'notes.txt', 'labels.csv', 'scan.tif'):
        (tmp_path / name).write_bytes(b'x')
    (tmp_path / 'folder.png').mkdir()
    with caplog.at_level(logging.WARNING):
        found = utils.list_images(str(tmp_path))
    names = [os.path.basename(f) for f in found]
    assert names == ['a.JPG', 'b.png', 'c.webp', 'd.jpeg', 'e.bmp', 'f.gif']
    assert all(os.path.dirname(f) == str(tmp_path) for f in found)
    text = warnings_text(caplog)
    assert 'Ignoring 3 non-image file(s)' in text and 'labels.csv' in text
    assert '.hidden' not in text and 'folder.png' not in text


def test_list_images_missing_folder_names_folder_and_fix(tmp_path):
    folder = tmp_path / 'foo' / 'trainA'
    with pytest.raises(utils.UserError) as err:
        utils.list_images(str(folder))
    message = str(err.value)
    assert str(folder) in message and 'does not exist' in message
    assert 'domain-A training images' in message and '--dataset' in message
    assert '\n' not in message


@pytest.mark.parametrize('contents', [(), ('readme.txt', '.DS_Store')])
def test_list_images_without_images_is_user_error(tmp_path, contents):
    folder = tmp_path / 'testB'
    folder.mkdir()
    for name in contents:
        (folder / name).write_bytes(b'x')
    with pytest.raises(utils.UserError, match='has no image.*domain-B test images'):
        utils.list_images(str(folder))


# --- the legacy resize -------------------------------------------------------------

def test_legacy_resize_matches_hand_values_and_tf1_not_tf2():
    """2×3 ramp f = 3·row + col → 4×4: source = dest · in/out, clamped at the last pixel."""
    ramp = np.float32([[0, 1, 2], [3, 4, 5]])[..., None]
    # rows sample 0, .5, 1, 1(.5 clamped); columns 0, .75, 1.5, 2(.25 clamped)
    hand = np.float32([[0, .75, 1.5, 2], [1.5, 2.25, 3, 3.5], [3, 3.75, 4.5, 5], [3, 3.75, 4.5, 5]])
    ours = utils.legacy_resize_bilinear(tf.constant(ramp), 4).numpy()
    np.testing.assert_allclose(ours[..., 0], hand, atol=1e-6)
    tf1 = tf.compat.v1.image.resize_bilinear(ramp[None], [4, 4], align_corners=False,
                                             half_pixel_centers=False)[0].numpy()
    np.testing.assert_array_equal(ours, tf1)
    tf2 = tf.image.resize(ramp, [4, 4]).numpy()
    assert np.abs(tf2 - ours).max() > 0.3


def test_legacy_resize_of_uint8_gives_float32_like_numpy_oracle():
    rgb = pattern(3)
    ours = utils.legacy_resize_bilinear(tf.constant(rgb), 7)
    assert ours.dtype == tf.float32 and ours.shape == (7, 7, 3)
    np.testing.assert_allclose(ours.numpy(), np_legacy_resize(rgb, 7), rtol=1e-6, atol=1e-4)


# --- decoding every format -------------------------------------------------------

def _jpeg(path, rgb):
    write_rgb(path, rgb, quality=95)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _png_gray(path, rgb):
    write_rgb(path, rgb[..., 1])
    return np.repeat(rgb[..., 1:2], 3, axis=-1)


def _png_rgba(path, rgb):
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    write_rgb(path, np.concatenate([rgb, alpha], axis=-1))
    return rgb


def _png_gray_alpha(path, rgb):
    Image.fromarray(np.stack([rgb[..., 2], np.full(rgb.shape[:2], 90, np.uint8)], -1), 'LA').save(path)
    return np.repeat(rgb[..., 2:3], 3, axis=-1)


def _png_palette(path, rgb):
    Image.fromarray(rgb).convert('P').save(path)
    return np.asarray(Image.open(path).convert('RGB'))


def _png_16bit(path, rgb):
    deep = rgb.astype(np.uint16) * 257 + np.uint16(200)   # not a multiple of 257
    cv2.imwrite(str(path), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    return deep / 257                                     # the 0..255 scale, ± 1 level


def _gif_animated(path, rgb):
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return rgb                                            # first frame only


FORMATS = {   # name: (file name, writer returning the expected RGB pixels, atol)
    'jpeg': ('img.jpg', _jpeg, JPEG_ATOL),
    'png_rgb': ('img.png', lambda p, rgb: (write_rgb(p, rgb), rgb)[1], NORM_ATOL),
    'png_gray': ('img.png', _png_gray, NORM_ATOL),
    'png_rgba': ('img.png', _png_rgba, NORM_ATOL),
    'png_gray_alpha': ('img.png', _png_gray_alpha, NORM_ATOL),
    'png_palette': ('img.png', _png_palette, NORM_ATOL),
    'png_16bit': ('img.png', _png_16bit, ONE_LEVEL + NORM_ATOL),
    'bmp': ('img.bmp', lambda p, rgb: (write_rgb(p, rgb), rgb)[1], NORM_ATOL),
    'gif_animated': ('img.gif', _gif_animated, NORM_ATOL),
    'webp_lossless': ('img.webp', lambda p, rgb: (write_rgb(p, rgb, lossless=True), rgb)[1], NORM_ATOL),
}


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_every_format_decodes_to_rgb_in_range(tmp_path, fmt):
    """Each format/mode gives [1, S, S, 3] float32 in [-1, 1] equal to the written pixels."""
    name, writer, atol = FORMATS[fmt]
    expected_rgb = writer(tmp_path / name, pattern())
    out = batches([tmp_path / name])[0]
    assert out.dtype == np.float32 and out.shape == (1, SIZE, SIZE, 3)
    assert out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out[0], expected_train(expected_rgb), atol=atol)


@pytest.mark.parametrize('fmt', ['png_rgb', 'png_gray', 'bmp', 'gif_animated', 'webp_lossless'])
def test_one_channel_output_for_every_format(tmp_path, fmt):
    """img_ch 1 works even where TF's decoder has no 1-channel mode (BMP, GIF, WebP)."""
    name, writer, _ = FORMATS[fmt]
    expected_rgb = writer(tmp_path / name, pattern())
    out = batches([tmp_path / name], img_ch=1)[0]
    assert out.shape == (1, SIZE, SIZE, 1)
    assert out.min() >= -1 and out.max() <= 1
    gray = expected_rgb @ np.float64([0.2989, 0.5870, 0.1140])   # tf.image.rgb_to_grayscale
    np.testing.assert_allclose(out[0, ..., 0], expected_train(gray[..., None])[..., 0],
                               atol=ONE_LEVEL + NORM_ATOL)


def test_unsupported_img_ch_is_user_error(tmp_path):
    with pytest.raises(utils.UserError, match='img_ch 4'):
        utils.build_dataset([write_rgb(tmp_path / 'a.png', pattern())], SIZE, 4, 1, False)


# --- unreadable files ------------------------------------------------------------

def test_unreadable_files_are_skipped_by_name(tmp_path, caplog):
    good = [write_rgb(tmp_path / f'good{i}.png', pattern(i)) for i in range(2)]
    jpeg = (tmp_path / 'whole.jpg')
    write_rgb(jpeg, pattern(), quality=90)
    bad = {'empty.png': b'', 'truncated.jpg': jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2],
           'garbage.gif': b'this is not a gif' * 8}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    files = utils.list_images(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        usable = utils.validate_images(files, 3)
    assert usable == sorted(good + [str(jpeg)])
    text = warnings_text(caplog)
    for name in bad:
        assert f'Skipping unreadable image {tmp_path / name}' in text
    assert 'Input is empty' in text                 # the decoder's reason is kept
    assert 'good0' not in text and 'whole.jpg' not in text
    out = batches(files, n=4, batch_size=3)         # training goes on with the rest
    assert out.shape == (4, 3, SIZE, SIZE, 3)


def test_no_readable_file_is_user_error(tmp_path):
    (tmp_path / 'a.png').write_bytes(b'')
    (tmp_path / 'b.jpg').write_bytes(b'\xff\xd8\xff')
    with pytest.raises(utils.UserError, match=f'None of the 2 images in {tmp_path}'):
        utils.build_dataset(utils.list_images(str(tmp_path)), SIZE, 3, 1, False)


def test_fewer_readable_files_than_batch_is_user_error(tmp_path):
    files = [write_rgb(tmp_path / f'{i}.png', pattern(i)) for i in range(3)]
    (tmp_path / 'bad.png').write_bytes(b'')
    with pytest.raises(utils.UserError, match='Only 3 readable image.*--batch_size 4'):
        utils.build_dataset(files + [str(tmp_path / 'bad.png')], SIZE, 3, 4, False)


# --- shuffling, batching, seeds --------------------------------------------------

def gray_files(tmp_path, n):
    """n flat gray images with levels 0, 50, 100, ...: the level identifies the file."""
    return [write_rgb(tmp_path / f'{i}.png', np.full((4, 4, 3), 50 * i, np.uint8)) for i in range(n)]


def test_each_pass_is_a_full_permutation_reshuffled(tmp_path):
    """Batch = file count: every batch holds every file once, in a new order."""
    n = 5
    out = batches(gray_files(tmp_path, n), n=8, batch_size=n)
    levels = np.rint((out[..., 0, 0, 0] + 1) * 127.5 / 50).astype(int)   # [passes, n]
    for order in levels:
        assert sorted(order) == list(range(n))
    assert len({tuple(order) for order in levels}) > 1


def test_drop_remainder_gives_static_batch_shape(tmp_path):
    ds = utils.build_dataset(gray_files(tmp_path, 5), SIZE, 3, 3, True, seed=0)
    assert ds.element_spec.shape == (3, SIZE, SIZE, 3)
    assert ds.element_spec.dtype == tf.float32
    for batch in ds.take(4):   # 4 × 3 crosses two passes of 5 files
        assert batch.shape == (3, SIZE, SIZE, 3)


def test_seed_reproduces_batches_and_other_seeds_differ(tmp_path):
    files = [write_rgb(tmp_path / f'{i}.png', pattern(i)) for i in range(6)]
    first = batches(files, n=3, batch_size=2, augment=True, seed=7)
    np.testing.assert_array_equal(first, batches(files, n=3, batch_size=2, augment=True, seed=7))
    assert not np.array_equal(first, batches(files, n=3, batch_size=2, augment=True, seed=8))
    unseeded = [batches(files, n=3, batch_size=2, augment=True, seed=None) for _ in range(2)]
    assert not np.array_equal(*unseeded)


# --- augmentation ----------------------------------------------------------------

def test_augment_size_rule():
    assert utils.augment_size(256) == 286
    assert utils.augment_size(128) == 143
    assert utils.augment_size(SIZE) == SIZE + 15


def test_unaugmented_output_is_deterministic(tmp_path):
    rgb = pattern(5)
    path = write_rgb(tmp_path / 'a.png', rgb)
    out = batches([path], n=4, seed=None)
    for image in out.reshape(-1, SIZE, SIZE, 3):
        np.testing.assert_allclose(image, expected_train(rgb), atol=NORM_ATOL)


def test_augmentation_is_drawn_per_image_and_follows_the_spec(tmp_path):
    """Every image: random flip, legacy resize of the normalised image to S+15, random crop.

    The original's trace-time coin augments all images or none for a whole run; here
    each image must be a crop of the enlarged image, some flipped and some not.
    """
    ramp = np.uint8(np.linspace(0, 255, SRC_W))[None, :, None]
    rgb = np.broadcast_to(ramp, (SRC_H, SRC_W, 3)) // np.uint8([1, 2, 3])   # rising left to right
    out = batches([write_rgb(tmp_path / 'ramp.png', rgb)], n=32, augment=True, seed=3)[:, 0]
    plain = expected_train(rgb)

    def enlarge(image):   # the legacy kernel is not mirror-symmetric: flip first, then resize
        return tf.compat.v1.image.resize_bilinear(
            np.float32(image)[None], [SIZE + 15] * 2, align_corners=False,
            half_pixel_centers=False)[0].numpy()

    windows = {}
    for flipped, source in ((False, enlarge(plain)), (True, enlarge(plain[:, ::-1]))):
        for y in range(16):
            for x in range(16):
                windows[(flipped, y, x)] = source[y:y + SIZE, x:x + SIZE]
    found = []
    for image in out:
        assert not np.allclose(image, plain, atol=1e-3)            # augmented, every one
        matches = [k for k, w in windows.items() if np.allclose(image, w, atol=NORM_ATOL)]
        assert matches, 'not a crop of the (flipped) enlarged image'
        found.append(matches[0])
    assert {k[0] for k in found} == {False, True}                   # flip is per image
    assert len({k[1:] for k in found}) > 1                          # crop is per image


# --- test images and saving ------------------------------------------------------

def test_load_test_image_equals_cv2_hand_computation(tmp_path):
    rgb = pattern(9, 20, 30)
    path = write_rgb(tmp_path / 'a.png', rgb)
    hand = cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_LINEAR) / 127.5 - 1
    out = utils.load_test_image(path, 16)
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, hand, atol=1e-6)
    square = pattern(9, 12, 12)   # at its own size cv2.resize copies the pixels
    np.testing.assert_array_equal(utils.load_test_image(write_rgb(tmp_path / 'sq.png', square), 12),
                                  np.float32(square / 127.5 - 1))
    red = write_rgb(tmp_path / 'red.png', np.full((4, 4, 3), [255, 0, 0], np.uint8))
    np.testing.assert_array_equal(utils.load_test_image(red, 4)[0, 0], [1, -1, -1])   # RGB order


def test_load_test_image_gray_and_rgba_give_three_channels(tmp_path):
    rgb = pattern(2)
    gray = utils.load_test_image(write_rgb(tmp_path / 'g.png', rgb[..., 0]), SIZE)
    assert gray.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    rgba = np.concatenate([rgb, np.zeros(rgb.shape[:2] + (1,), np.uint8)], axis=-1)
    np.testing.assert_array_equal(utils.load_test_image(write_rgb(tmp_path / 'a.png', rgba), SIZE),
                                  utils.load_test_image(write_rgb(tmp_path / 'b.png', rgb), SIZE))


@pytest.mark.parametrize('data', [None, b'', b'not an image at all'])
def test_load_test_image_unreadable_is_user_error(tmp_path, data):
    path = tmp_path / 'broken.png'
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(utils.UserError, match=f'Cannot read image {path}'):
        utils.load_test_image(str(path), SIZE)


def test_inverse_transform_truncates_and_clips():
    x = np.float32([-1.5, -1, -0.999, 0, 0.999, 1, 1.5])
    out = utils.inverse_transform(x)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 0, 127, 254, 255, 255])


def test_merge_puts_image_i_at_row_i_div_cols_col_i_mod_cols():
    images = np.stack([np.full((2, 3, 3), i + 1, np.uint8) for i in range(5)])
    grid = utils.merge(images, (2, 3))
    assert grid.shape == (4, 9, 3) and grid.dtype == np.uint8
    cells = grid.reshape(2, 2, 3, 3, 3).transpose(0, 2, 1, 3, 4)[..., 0, 0, 0]   # [row, col]
    np.testing.assert_array_equal(cells, [[1, 2, 3], [4, 5, 0]])
    with pytest.raises(ValueError):
        utils.merge(images, (2, 2))


def test_save_images_writes_rgb_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = np.float32(rng.uniform(-1, 1, (3, 4, 5, 3)))
    images[0, 0, 0] = [1, -1, -1]                                   # a red pixel
    path = str(tmp_path / 'grid.png')
    utils.save_images(images, [3, 1], path)
    written = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(written, utils.merge(utils.inverse_transform(images), (3, 1)))
    np.testing.assert_array_equal(written[0, 0], [255, 0, 0])
    with pytest.raises(utils.UserError, match='Cannot write'):
        utils.save_images(images, [3, 1], str(tmp_path / 'missing' / 'grid.png'))



# --- pictures ----------------------------------------------------------------------

def sheet_rows(size, batch=1):
    """Sample-sheet rows whose tiles are known constants: input -1, translation 0,
    cycle 1 (white), identity -1, heatmap a left-to-right ramp."""
    ones = np.ones((batch, size, size, 3), np.float32)
    part = {'input': -ones, 'translation': 0 * ones, 'cycle': ones, 'identity': -ones,
            'heatmap': np.tile(np.arange(size // 4, dtype=np.float32), (batch, size // 4, 1))}
    return {'A2B': part, 'B2A': part}


@pytest.mark.parametrize('size,zoom', [(32, 3), (48, 2), (96, 1), (128, 1)])
def test_sample_sheet_layout_and_small_tiles_enlarged(size, zoom):
    sheet = utils.sample_sheet(sheet_rows(size, batch=2))
    tile = size * zoom
    assert sheet.shape == (utils.LABEL_HEIGHT + 4 * tile, 5 * tile, 3)
    body = sheet[utils.LABEL_HEIGHT:]
    np.testing.assert_array_equal(body[:, :tile], 0)                    # input -1 → black
    np.testing.assert_array_equal(body[:, 2 * tile:3 * tile], 127)      # translation 0 → 127
    np.testing.assert_array_equal(body[:, 3 * tile:4 * tile], 255)      # cycle 1 → white
    attention = body[:tile, tile:2 * tile].astype(int)
    assert np.abs(attention[:, 0] - attention[:, -1]).max() > 50        # the ramp shows
    assert (sheet[:utils.LABEL_HEIGHT] < 128).any()                     # captions drawn


# --- demo dataset ----------------------------------------------------------------

def tree_hashes(root):
    """{relative path: sha256} of every file under `root`."""
    hashes = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return utils.make_demo_dataset(str(tmp_path_factory.mktemp('demo')))


def test_demo_dataset_has_folders_counts_and_readme(demo_root):
    for folder, count in (('trainA', utils.DEMO_TRAIN_COUNT), ('trainB', utils.DEMO_TRAIN_COUNT),
                          ('testA', utils.DEMO_TEST_COUNT), ('testB', utils.DEMO_TEST_COUNT)):
        files = utils.list_images(os.path.join(demo_root, folder))
        assert len(files) == count
    image = cv2.imread(files[0])
    assert image.shape == (utils.DEMO_IMAGE_SIZE, utils.DEMO_IMAGE_SIZE, 3)
    readme = open(os.path.join(demo_root, 'README.txt')).read()
    assert 'disc' in readme and 'square' in readme


def test_demo_dataset_is_deterministic_and_skipped_when_complete(demo_root, tmp_path):
    second = utils.make_demo_dataset(str(tmp_path / 'again'))
    assert tree_hashes(demo_root) == tree_hashes(second)
    victim = os.path.join(second, 'testB', 'square_0003.png')
    stamps = {p: os.stat(os.path.join(second, p)).st_mtime_ns for p in tree_hashes(second)}
    utils.make_demo_dataset(second)                                      # complete: nothing written
    assert stamps == {p: os.stat(os.path.join(second, p)).st_mtime_ns for p in stamps}
    os.remove(victim)
    utils.make_demo_dataset(second)                                      # incomplete: redone
    assert tree_hashes(demo_root) == tree_hashes(second)


def object_fill_ratio(path):
    """Object pixels / area of their minimum rotated rectangle (disc ≈ π/4, square ≈ 1).

    The object is the largest blob of the image's most frequent colour (it is drawn
    flat on a noisy background).
    """
    image = cv2.imread(path).astype(int)
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    mask = (np.abs(image - colours[counts.argmax()]).max(-1) <= 2).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    blob = (labels == 1 + stats[1:, cv2.CC_STAT_AREA].argmax()).astype(np.uint8)
    (_, _), (w, h), _ = cv2.minAreaRect(cv2.findNonZero(blob))
    return blob.sum() / ((w + 1) * (h + 1))   # +1: pixel centres to pixel extent


def test_demo_objects_are_light_on_dark_backgrounds(demo_root):
    """Every object's colour is in DEMO_OBJECT_LEVELS and most background pixels are darker."""
    for path in utils.list_images(os.path.join(demo_root, 'testA'))[:5] + \
            utils.list_images(os.path.join(demo_root, 'testB'))[:5]:
        image = cv2.imread(path).astype(int)
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        object_colour = colours[counts.argmax()]
        assert object_colour.min() >= utils.DEMO_OBJECT_LEVELS[0], path
        darker = (image.max(-1) < utils.DEMO_OBJECT_LEVELS[0]).mean()
        assert darker > 1 - utils.DEMO_OBJECT_FRACTION[1] ** 2 - 0.05, path


def test_demo_domains_differ_in_shape(demo_root):
    discs = [object_fill_ratio(f) for f in utils.list_images(os.path.join(demo_root, 'trainA'))[:10]]
    squares = [object_fill_ratio(f) for f in utils.list_images(os.path.join(demo_root, 'testB'))[:10]]
    np.testing.assert_allclose(discs, np.pi / 4, atol=0.06)
    assert min(squares) > 0.88


# --- evaluation: InceptionV3 features, weights, caches, result page ---------------------

def np_resize_half_pixel(img, size):
    """tf.image.resize bilinear (half-pixel centres, no antialias) in float64: [H, W, C] → [S, S, C]."""
    img = np.float64(img)

    def taps(n_in):
        src = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        lo = np.floor(src).astype(int)
        return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), src - np.floor(src)

    y0, y1, fy = taps(img.shape[0])
    x0, x1, fx = taps(img.shape[1])
    fx = fx[None, :, None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]


@pytest.fixture(scope='module')
def inception():
    """An extractor with random weights (InceptionV3(weights=None): no download)."""
    return utils.InceptionFeatures(None)


def counting(extractor, monkeypatch):
    """Counts the images that go through `extractor`'s network (a list: [count])."""
    seen, forward = [0], extractor._forward

    def spy(batch):
        seen[0] += int(batch.shape[0])
        return forward(batch)

    monkeypatch.setattr(extractor, '_forward', spy)
    return seen


def test_inception_preprocess_resizes_to_299_bilinear_in_unit_range():
    """Each image (any size; grey → RGB) is resized to 299 with half-pixel bilinear weights and
    mapped by x / 127.5 − 1; a flat image stays flat."""
    rgb = np.random.default_rng(50).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    grey = np.random.default_rng(51).integers(0, 256, (20, 30, 1), dtype=np.uint8)
    flat = np.full((256, 256, 3), 200, np.uint8)
    out = utils.InceptionFeatures.preprocess([rgb, grey, flat]).numpy()
    assert out.shape == (3, 299, 299, 3) and out.dtype == np.float32
    assert out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out[0], np_resize_half_pixel(rgb, 299) / 127.5 - 1, atol=1e-5)
    np.testing.assert_allclose(out[1], np.repeat(np_resize_half_pixel(grey, 299), 3, -1) / 127.5 - 1,
                               atol=1e-5)
    np.testing.assert_allclose(out[2], 200 / 127.5 - 1, atol=1e-6)


def test_inception_features_shapes_batches_and_files(inception, tmp_path, monkeypatch):
    """[N, 2048] non-negative float32 (ReLU, then average pooling), in batches of
    INCEPTION_BATCH that do not change a row; the features of image files equal those of
    the same pixels in memory."""
    monkeypatch.setattr(utils, 'INCEPTION_BATCH', 2)
    seen = counting(inception, monkeypatch)
    images = [pattern(60 + i, 32, 32) for i in range(2)]
    features = inception([images[0], images[1], images[0]])
    assert features.shape == (3, utils.INCEPTION_FEATURES) and features.dtype == np.float32
    assert np.all(np.isfinite(features)) and features.min() >= 0 and features.max() > 0
    np.testing.assert_allclose(features[2], features[0], rtol=1e-5, atol=1e-7)
    assert seen == [3]
    files = [write_rgb(tmp_path / f'{i}.png', image) for i, image in enumerate(images)]
    np.testing.assert_allclose(inception.of_files(files), features[:2], rtol=1e-5, atol=1e-7)


def test_feature_cache_recomputes_only_new_changed_or_other_weights(inception, tmp_path, monkeypatch):
    """A second pass over a folder computes nothing; a rewritten file is recomputed alone;
    the cache is a dot-file that list_images skips; other weights recompute everything."""
    files = [write_rgb(tmp_path / f'{i}.png', pattern(70 + i, 16, 16)) for i in range(3)]
    seen = counting(inception, monkeypatch)
    first = inception.of_files(files)
    assert seen == [3]
    np.testing.assert_array_equal(inception.of_files(files), first)
    assert seen == [3]
    assert utils.list_images(str(tmp_path)) == files
    assert os.path.isfile(tmp_path / utils.FEATURE_CACHE)
    write_rgb(files[1], pattern(99, 16, 16))
    later = os.stat(files[1]).st_mtime_ns + 10 ** 9
    os.utime(files[1], ns=(later, later))
    second = inception.of_files(files)
    assert seen == [4]
    np.testing.assert_array_equal(second[[0, 2]], first[[0, 2]])
    assert not np.array_equal(second[1], first[1])
    monkeypatch.setattr(inception, 'tag', 'other weights')
    inception.of_files(files)
    assert seen == [7]


def test_weights_from_the_keras_cache_need_no_download(tmp_path, monkeypatch):
    """The ImageNet file already in $KERAS_HOME/models is used without calling Keras' download."""
    import keras
    monkeypatch.delenv(utils.RANDOM_INCEPTION_ENV, raising=False)
    monkeypatch.setenv('KERAS_HOME', str(tmp_path))
    cached = tmp_path / 'models' / 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5'
    cached.parent.mkdir()
    cached.write_bytes(b'weights')

    def no_download(*args, **kwargs):
        raise AssertionError('no download expected')

    monkeypatch.setattr(keras.utils, 'get_file', no_download)
    weights, description = utils.resolve_inception_weights('')
    assert weights == str(cached) and 'imagenet' in description


def test_missing_weights_one_line_gives_both_ways(tmp_path, monkeypatch):
    """Not cached and the download fails: one line naming the cache file, the internet and
    --inception_weights (Keras' download is replaced here: nothing touches the network)."""
    import keras
    monkeypatch.delenv(utils.RANDOM_INCEPTION_ENV, raising=False)
    monkeypatch.setenv('KERAS_HOME', str(tmp_path))
    calls = []

    def offline(fname, origin, **kwargs):
        calls.append((fname, origin, kwargs.get('cache_dir')))
        raise Exception(f'URL fetch failure on {origin}: None -- [Errno -3] Temporary failure '
                        'in name resolution')

    monkeypatch.setattr(keras.utils, 'get_file', offline)
    with pytest.raises(utils.UserError) as info:
        utils.load_inception('')
    message = str(info.value)
    assert '\n' not in message
    assert '--inception_weights' in message and 'internet' in message
    assert str(tmp_path / 'models' / utils.INCEPTION_WEIGHTS_FILE) in message
    assert 'Temporary failure in name resolution' in message
    assert calls == [(utils.INCEPTION_WEIGHTS_FILE, utils.INCEPTION_WEIGHTS_URL, str(tmp_path))]


def test_inception_weights_flag_missing_or_unloadable_file_is_user_error(tmp_path, monkeypatch):
    """--inception_weights: a missing path and a file that is no weights file, one line each."""
    monkeypatch.delenv(utils.RANDOM_INCEPTION_ENV, raising=False)
    with pytest.raises(utils.UserError, match='--inception_weights .*absent.h5 is not a file'):
        utils.load_inception(str(tmp_path / 'absent.h5'))
    junk = tmp_path / 'junk.h5'
    junk.write_bytes(b'not HDF5')
    with pytest.raises(utils.UserError, match='cannot load InceptionV3 weights') as info:
        utils.load_inception(str(junk))
    assert '\n' not in str(info.value)


# Keras' save_weights converts each variable with np.array(x, copy=False), which NumPy 2
# warns about once per variable (Keras' code, not ours).
@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
def test_inception_weights_flag_loads_a_saved_weights_file(inception, tmp_path, monkeypatch):
    """A file InceptionV3(weights=PATH) loads (here one saved from a random network) sets
    every weight of the extractor's network; metrics.json's description names it."""
    monkeypatch.delenv(utils.RANDOM_INCEPTION_ENV, raising=False)
    path = str(tmp_path / 'inception.weights.h5')
    inception.model.save_weights(path)
    loaded = utils.load_inception(path)
    for ours, saved in zip(loaded.model.weights, inception.model.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), saved.numpy(), err_msg=ours.path)
    assert loaded.description == os.path.abspath(path) and loaded.tag != inception.tag


def translation_outputs(out_dir, names, side):
    """Writes the three test-phase pictures of each name at side × side."""
    for name in names:
        for path in utils.translation_paths(out_dir, name).values():
            if path != name:
                utils.write_image(path, np.zeros((side, side, 3), np.uint8))


def test_current_translations_need_every_file_new_and_the_right_size(tmp_path):
    """Rows when all outputs exist, are not older than `since` and are img_size square;
    None when one is missing, older, or of another size."""
    out_dir = str(tmp_path / 'A2B')
    files = ['/data/testA/a.png', '/data/testA/b.png']
    translation_outputs(out_dir, ['a.png', 'b.png'], 8)
    since = os.path.getmtime(os.path.join(out_dir, 'a.png')) - 1
    rows = utils.current_translations(out_dir, files, since, 8)
    assert [r['output'] for r in rows] == [os.path.join(out_dir, n) for n in ('a.png', 'b.png')]
    assert rows[0]['attention'] == os.path.join(out_dir, 'attention', 'a.png')
    assert utils.current_translations(out_dir, files, since, 16) is None
    assert utils.current_translations(out_dir, files + ['/data/testA/c.png'], since, 8) is None
    os.utime(os.path.join(out_dir, 'input', 'b.png'), (since - 10, since - 10))
    assert utils.current_translations(out_dir, files, since, 8) is None


def test_metrics_table_and_result_page():
    """The table's rows, the missing std of a single block, and the page's figures table."""
    metrics = {'A2B': {'kid_x100_mean': 11.614, 'kid_x100_std': 0.566, 'fid': 95.2,
                       'n_translated': 100, 'n_real': 100},
               'B2A': {'kid_x100_mean': -0.25, 'kid_x100_std': None, 'fid': 3.0,
                       'n_translated': 3, 'n_real': 4}}
    lines = utils.metrics_table(metrics).splitlines()
    assert lines[0].split() == ['direction', 'KID×100', 'FID', 'translated', 'real']
    assert lines[1].split() == ['A2B', '11.61', '±', '0.57', '95.20', '100', '100']
    assert lines[2].split() == ['B2A', '-0.25', '(one', 'block:', 'no', 'std)', '3.00', '3', '4']


def test_result_page_shows_the_figures_first(tmp_path):
    """write_index_html with metrics: a KID and FID table with the note, before the images."""
    metrics = {'A2B': {'kid_x100_mean': 1.5, 'kid_x100_std': 0.25, 'fid': 7.0,
                       'n_translated': 2, 'n_real': 2}}
    rows = [utils.translation_paths(str(tmp_path / 'A2B'), 'a.png')]
    page = utils.write_index_html(str(tmp_path), [('A2B', rows)], 8, metrics, 'note & more')
    text = open(page, encoding='utf-8').read()
    assert text.index('<h2>KID and FID</h2>') < text.index('<h2>A2B</h2>')
    assert '<td>1.50 ± 0.25</td><td>7.00</td><td>2</td><td>2</td>' in text
    assert '<p>note &amp; more</p>' in text


def test_count_bar_in_a_log_file_is_plain_lines():
    """Not a terminal: one plain line per report, no control codes."""
    import io
    stream = io.StringIO()
    utils.count_bar('features', 1, 4, stream)
    utils.count_bar('features', 4, 4, stream)
    lines = stream.getvalue().splitlines()
    assert lines == ['features [#######.......................] 1/4',
                     'features [##############################] 4/4']


# --- benchmark helpers --------------------------------------------------------------

def test_graph_flops_counts_convolutions_matmuls_and_their_gradients():
    """A 3x3 conv (8 -> 4 channels, VALID on 10x10: 8x8 out) and a [5, 6] @ [6, 7] product,
    with the gradients of both inputs: by the formula 2·k²·Cin·Cout·Ho·Wo·B per conv
    (forward, input gradient, filter gradient) and 2·m·k·n per product (forward, two grads)."""
    batch = 3
    conv_flop = 2 * 3 * 3 * 8 * 4 * 8 * 8 * batch
    matmul_flop = 2 * 5 * 6 * 7

    @tf.function(input_signature=[tf.TensorSpec([None, 10, 10, 8]), tf.TensorSpec([3, 3, 8, 4]),
                                  tf.TensorSpec([5, 6]), tf.TensorSpec([6, 7])])
    def step(x, w, a, b):
        with tf.GradientTape() as tape:
            tape.watch([x, w, a, b])
            loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, 'VALID')) + tf.reduce_sum(a @ b)
        return tape.gradient(loss, [x, w, a, b])

    graph = step.get_concrete_function().graph
    assert utils.graph_flops(graph, batch) == 3 * conv_flop + 3 * matmul_flop


def test_timing_summary_and_peak_rss():
    assert utils.timing_summary([3.0, 1.0, 2.0, 10.0]) == {'median': 2.5, 'min': 1.0, 'max': 10.0}
    assert utils.peak_rss_bytes() > 10 * 2 ** 20   # this process holds TensorFlow


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_limit_malloc_arenas_sets_the_cap_unless_the_user_did(monkeypatch):
    monkeypatch.delenv('MALLOC_ARENA_MAX', raising=False)
    assert utils.limit_malloc_arenas() is True        # glibc accepted mallopt(M_ARENA_MAX, 2)
    monkeypatch.setenv('MALLOC_ARENA_MAX', '4')
    assert utils.limit_malloc_arenas() is False       # the user's own setting stands


def test_demo_score_on_real_and_swapped_images(demo_root, tmp_path):
    """The demo score, given real target-domain images as 'translations', is near 100 %
    (and the classifier is right on the real test images). Written as JSON too."""
    test_a = utils.list_images(os.path.join(demo_root, 'testA'))
    test_b = utils.list_images(os.path.join(demo_root, 'testB'))
    path = str(tmp_path / 'score.json')
    score = utils.demo_score(demo_root, test_b, test_a, 32, path=path)
    assert score['classifier_accuracy_real_test'] >= 0.9
    assert score['A2B_classified_B'] >= 0.9 and score['B2A_classified_A'] >= 0.9
    assert json.load(open(path)) == score
