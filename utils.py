"""Small helpers shared by the model and the command line: errors, paths, data and image I/O,
pictures, and the InceptionV3 features of the evaluation (KID and FID).

Data follows the original release (spec §10): training images are decoded and resized
with TF ops (the legacy bilinear kernel), test images with OpenCV, and pixel values map to
[-1, 1] by x/127.5 − 1. One departure: training augmentation is drawn per image, not once
per run at trace time (see `build_dataset`).
"""

import collections
import contextlib
import errno
import glob
import html
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid

import cv2
import numpy as np
import tensorflow as tf
from absl import logging


class UserError(Exception):
    """Something the user can fix (a flag, a folder, a file): shown as one line, no traceback."""


def check_folder(path, flag=None):
    """Creates `path` (and parents) if missing; returns it. Raises UserError if it cannot be
    created or written, naming `flag` (the option that chose it) when given."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f'cannot create folder {path} ({err.strerror}): '
                        f'{_folder_fix(flag)}') from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f'cannot write in folder {path} (permission denied): {_folder_fix(flag)}')
    return path


def _folder_fix(flag):
    return f'choose another {flag}' if flag else 'fix its permissions or choose another folder'


# --- Listing image files ---------------------------------------------------------

# Extensions that both TF's `decode_image` (training) and OpenCV's `imread` (test) read.
# TIFF is left out: OpenCV reads it but TF 2.21 does not ("Unknown image file format").
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.webp')

# What the standard dataset folders hold, for error messages.
FOLDER_CONTENTS = {
    'trainA': 'the domain-A training images',
    'trainB': 'the domain-B training images',
    'testA': 'the domain-A test images',
    'testB': 'the domain-B test images',
}
NAMES_SHOWN = 3  # ignored file names quoted in the warning


def _fix_hint(folder):
    """The one-line fix for a missing or empty `folder`."""
    contents = FOLDER_CONTENTS.get(os.path.basename(os.path.normpath(folder)), 'the images')
    return f'put {contents} there, or pick another --dataset'


def _images_in(folder, extensions, problem, fix):
    """Sorted files directly in `folder` ending in `extensions` (any case), skipping dot-files
    and subfolders. The other files are ignored with one warning naming a few; if no image is
    there, raises UserError('`problem` (the ignored files): `fix`')."""
    images, ignored = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith('.') or not os.path.isfile(path):
            continue
        (images if name.lower().endswith(extensions) else ignored).append(path)
    shown = ', '.join(os.path.basename(p) for p in ignored[:NAMES_SHOWN])
    shown += ', ...' if len(ignored) > NAMES_SHOWN else ''
    if not images:
        others = f'; it holds only {len(ignored)} other file(s): {shown}' if ignored else ''
        raise UserError(f'{problem} (images end in {" ".join(extensions)}{others}): {fix}')
    if ignored:
        logging.warning('Ignoring %d non-image file(s) in %s (%s); images end in %s.',
                        len(ignored), folder, shown, ' '.join(extensions))
    return images


def list_images(folder):
    """Sorted paths of the image files directly in `folder` (no recursion, no dot-files).

    Like the original's `glob(folder + '/*.*')`, but sorted and limited to
    IMAGE_EXTENSIONS (any case); other files are ignored with one warning.
    Raises UserError if the folder is missing or holds no image.
    """
    if not os.path.isdir(folder):
        raise UserError(f'{folder} does not exist: {_fix_hint(folder)}')
    return _images_in(folder, IMAGE_EXTENSIONS, f'{folder} has no image', _fix_hint(folder))


# --- Training data (TF ops, spec §10 "Training") -----------------------------------

RGB_CHANNELS = 3
SUPPORTED_CHANNELS = (1, 3)  # --img_ch values we can decode every format to
PIXEL_HALF_RANGE = 127.5     # x / 127.5 - 1 maps 0..255 to [-1, 1]

# Augmentation resizes to S + margin before cropping back to S (the original's
# `30 if load_size == 256 else 15`).
AUGMENT_LARGE_SIZE = 256
AUGMENT_LARGE_MARGIN = 30
AUGMENT_MARGIN = 15


def augment_size(img_size):
    """Side the image is enlarged to before the random crop back to `img_size`."""
    return img_size + (AUGMENT_LARGE_MARGIN if img_size == AUGMENT_LARGE_SIZE else AUGMENT_MARGIN)


def legacy_resize_bilinear(image, size):
    """TF1 `resize_images` bilinear: [H, W, C] (any real dtype) → float32 [size, size, C].

    align_corners=False and no half-pixel centres: source = dest · in/out. TF2's
    `tf.image.resize` uses half-pixel centres and gives different values.
    """
    batch = tf.raw_ops.ResizeBilinear(images=image[tf.newaxis], size=[size, size],
                                      align_corners=False, half_pixel_centers=False)
    return batch[0]


def decode_image(contents, img_ch):
    """Encoded JPEG/PNG/BMP/GIF/WebP bytes → uint8 [H, W, img_ch].

    Gray, gray+alpha, RGBA, palette and 16-bit images all come out as 8-bit
    (16-bit PNGs keep their high byte, 0..255 scale); a GIF gives its first frame.
    TF's BMP, GIF and WebP decoders cannot give 1 channel, so img_ch 1 decodes to
    RGB and converts to gray.
    """
    image = tf.io.decode_image(contents, channels=RGB_CHANNELS, expand_animations=False)
    if img_ch == 1:
        image = tf.image.rgb_to_grayscale(image)
    image.set_shape([None, None, img_ch])
    return image


def normalize(image):
    """0..255 → [-1, 1] (float32)."""
    return tf.cast(image, tf.float32) / PIXEL_HALF_RANGE - 1


def load_train_image(path, img_size, img_ch):
    """Path → float32 [S, S, img_ch] in [-1, 1]: decode, legacy resize, normalise."""
    image = decode_image(tf.io.read_file(path), img_ch)
    return normalize(legacy_resize_bilinear(image, img_size))


def augment_image(image, seed):
    """The original's `augmentation()` on one [S, S, C] image, with a stateless [2] seed.

    Flip left-right with p = 0.5, legacy-resize (of the normalised image) to
    augment_size(S), then crop a random S × S window.
    """
    img_size, _, channels = image.shape
    flip_seed, crop_seed = tf.unstack(tf.random.split(seed, 2))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = legacy_resize_bilinear(image, augment_size(img_size))
    return tf.image.stateless_random_crop(image, [img_size, img_size, channels], crop_seed)


@contextlib.contextmanager
def native_stderr_silenced():
    """Points file descriptor 2 at /dev/null for a while: libjpeg and libpng print their
    complaints about a broken file there ("Unsupported marker type 0x6a"), and we report
    the file by name instead. Python's own stderr is flushed first."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _error_reason(path, img_ch):
    """Why `path` fails to load (eager), as one short line."""
    try:
        with native_stderr_silenced():
            decode_image(tf.io.read_file(path), img_ch)
    except tf.errors.OpError as err:
        message = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:\w+\]|\s*name:\s*$', '', err.message)
        return message.strip().splitlines()[0] if message.strip() else type(err).__name__
    return 'could not be decoded'


def validate_images(files, img_ch):
    """The files of `files` that TF reads and decodes, in order; warns once per other file.

    One parallel tf.data pass (decode, then drop failures with `ignore_errors`).
    Raises UserError if no file survives, naming a few of them with the reason (one line).
    """
    files = [os.fspath(f) for f in files]
    if not files:
        raise UserError('No image files to train on.')

    def decodes(path):
        # The shape depends on the decode, so the decode cannot be skipped.
        return path, tf.shape(decode_image(tf.io.read_file(path), img_ch))

    passed = (tf.data.Dataset.from_tensor_slices(files)
              .map(decodes, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
              .ignore_errors())
    with native_stderr_silenced():
        readable = {os.fsdecode(path.numpy()) for path, _ in passed}
    failed = [f for f in files if f not in readable]
    if len(failed) == len(files):
        folders = sorted({os.path.dirname(f) or '.' for f in files})
        reasons = '; '.join(f'{os.path.basename(f)}: {_error_reason(f, img_ch)}'
                            for f in failed[:NAMES_SHOWN])
        more = '; ...' if len(failed) > NAMES_SHOWN else ''
        raise UserError(f'None of the {len(files)} images in {", ".join(folders)} can be read '
                        f'({reasons}{more}): replace them with JPEG, PNG, BMP, GIF or WebP files.')
    for path in failed:
        logging.warning('Skipping unreadable image %s: %s', path, _error_reason(path, img_ch))
    return [f for f in files if f in readable]


def _substream_seeds(seed):
    """Two independent 32-bit seeds (shuffle, augmentation) from `seed`, or (None, None)."""
    if seed is None:
        return None, None
    return tuple(int(s) for s in np.random.SeedSequence(seed).generate_state(2))


def build_dataset(files, img_size, img_ch, batch_size, augment, seed=None):
    """An infinite tf.data.Dataset of float32 batches [batch_size, S, S, img_ch] in [-1, 1].

    One domain (build one per domain, with different seeds, for independent shuffles).
    Spec §10: full shuffle of the file list, reshuffled every pass, repeated forever;
    decode, legacy bilinear resize to S, x/127.5 − 1; if `augment`, the original's
    flip + enlarge + random crop. Departure: the original drew one coin per run at
    trace time (augment all images or none); here every image is augmented, with its
    own random flip and crop. Only TF random ops: with `seed` the batches of a new
    build repeat run to run (a second iterator over the same dataset reshuffles, so
    iterate once), without it they differ. Unreadable files are dropped first (with a
    warning each); fewer than `batch_size` readable files is a UserError.
    """
    if img_ch not in SUPPORTED_CHANNELS:
        raise UserError(f'--img_ch {img_ch} is not supported: use 1 or 3.')
    files = validate_images(files, img_ch)
    if len(files) < batch_size:
        raise UserError(f'Only {len(files)} readable image(s) for --batch_size {batch_size}: '
                        'add images or lower --batch_size.')
    logging.info('%d readable training images in %s', len(files),
                 ', '.join(sorted({os.path.dirname(f) for f in files})))
    shuffle_seed, augment_seed = _substream_seeds(seed)
    # A buffer of the whole list is a full shuffle (the original's max(len A, len B) is
    # the same thing for the smaller domain).
    paths = (tf.data.Dataset.from_tensor_slices(files)
             .shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
             .repeat())

    def load(path, element_seed=None):
        image = load_train_image(path, img_size, img_ch)
        return image if element_seed is None else augment_image(image, element_seed)

    if augment:
        # One stateless [2] seed per element, from a (seeded or random) random stream.
        element_seeds = tf.data.Dataset.random(seed=augment_seed).batch(2)
        paths = tf.data.Dataset.zip((paths, element_seeds))
    # The original used map_and_batch(num_parallel_batches=16) and prefetch_to_device.
    return (paths.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


# --- Test images and saving (OpenCV, spec §10 "Test" and "Saving images") ----------

JPEG_MAGIC = b'\xff\xd8'
JPEG_CHECK_RATIO = 8   # TF decodes at 1/8 scale: fast, and it still reads all the coded data


def _imread_bgr(path):
    """cv2.imread in colour, or None if the file cannot be read or decoded.

    A JPEG must also pass TF's decoder (the training one): OpenCV decodes a truncated
    JPEG, grey below the cut, with only a libjpeg warning on stderr.
    """
    path = os.fspath(path)
    try:
        with open(path, 'rb') as f:
            is_jpeg = f.read(len(JPEG_MAGIC)) == JPEG_MAGIC
    except OSError:
        return None
    with native_stderr_silenced():
        if is_jpeg:
            try:
                tf.io.decode_jpeg(tf.io.read_file(path), ratio=JPEG_CHECK_RATIO)
            except tf.errors.OpError:
                return None
        return cv2.imread(path, cv2.IMREAD_COLOR)


def load_test_image(path, img_size, img_ch=RGB_CHANNELS):
    """Image file → float32 [S, S, img_ch] in [-1, 1], as the original's `load_test_data`.

    cv2.imread (gray → 3 channels, alpha dropped, 16-bit → 8-bit), BGR → RGB,
    cv2.resize INTER_LINEAR (not the training resampler), /127.5 − 1 in float64.
    With img_ch 1 (which the original's test phase could not do) the RGB image is
    converted to grey. Raises UserError naming the file if it cannot be read (`_imread_bgr`).
    """
    image = _imread_bgr(path)
    if image is None:
        raise UserError(f'Cannot read image {path}: replace or remove it')
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_LINEAR)
    if img_ch == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    return np.float32(image / PIXEL_HALF_RANGE - 1)


def inverse_transform(images):
    """[-1, 1] floats → uint8 0..255 by ((x + 1) / 2) · 255, truncated as the original.

    The original truncates with astype(uint8) and does not clip; we clip to [0, 255]
    first, a no-op for tanh outputs that only guards against uint8 wraparound.
    """
    x = np.asarray(images)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)


def merge(images, size):
    """Tiles [N, H, W, C] into one [rows·H, cols·W, C] grid, `size` = (rows, cols).

    Image i goes to row i // cols, column i % cols; unused cells stay 0.
    """
    images = np.asarray(images)
    rows, cols = size
    n, h, w, c = images.shape
    if n > rows * cols:
        raise ValueError(f'{n} images do not fit a {rows}x{cols} grid')
    grid = np.zeros((h * rows, w * cols, c), dtype=images.dtype)
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        grid[h * row:h * (row + 1), w * col:w * (col + 1)] = image
    return grid


def save_images(images, size, path):
    """Writes float [N, H, W, C] RGB (or gray) images in [-1, 1] as one `size` grid to `path`.

    The format follows the extension (cv2.imwrite). Raises UserError if it fails.
    """
    grid = merge(inverse_transform(images), size)
    grid = cv2.cvtColor(grid, cv2.COLOR_RGB2BGR) if grid.shape[-1] == RGB_CHANNELS else grid
    if not cv2.imwrite(os.fspath(path), grid):
        raise UserError(f'Cannot write {path}: check that its folder exists and is writable.')


# --- Own images: --input and --crop_face (OpenCV) -----------------------------------

# What --input reads from a folder: the dataset formats plus those only OpenCV reads.
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + ('.tif', '.tiff', '.pbm', '.pgm', '.ppm', '.pnm')
OUTPUT_EXTENSION = '.png'    # --input results are lossless, whatever the input format

# Face crops (--crop_face). The selfie2anime photos are face-centred crops in which the face
# box of OpenCV's frontal-face cascade (brows to chin) spans about half the side.
FACE_CASCADE = 'haarcascade_frontalface_default.xml'   # ships with opencv-python(-headless)
FACE_CROP_SCALE = 1.8        # side of the square crop / the longer side of the face box
FACE_MIN_FRACTION = 0.05     # faces smaller than this share of the image's shorter side are ignored
FACE_SCALE_FACTOR = 1.1      # detectMultiScale: pyramid step
FACE_MIN_NEIGHBORS = 5       # detectMultiScale: overlapping detections needed to accept a face


def list_input_images(path):
    """--input: `[path]` for a file (any format OpenCV reads), or the image files directly in
    a folder (sorted, no recursion, no dot-files; INPUT_EXTENSIONS in any case). Other files
    of a folder are ignored with one warning. Raises UserError if nothing is there to read.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f'--input {path} does not exist: give an image file or a folder of images')
    return _images_in(path, INPUT_EXTENSIONS, f'--input {path} holds no image',
                      'put images there or name an image file')


def output_names(files):
    """{path: output file name}: `<stem>.png`, or `<stem>_<ext>.png` for the files whose
    stems collide (`me.jpg` and `me.webp` give `me_jpg.png` and `me_webp.png`)."""
    stems = [os.path.splitext(os.path.basename(f)) for f in files]
    counts = collections.Counter(stem.lower() for stem, _ in stems)
    return {f: (stem if counts[stem.lower()] == 1 else f'{stem}_{ext.lstrip(".").lower()}')
            + OUTPUT_EXTENSION for f, (stem, ext) in zip(files, stems)}


def read_image_rgb(path):
    """An image file → uint8 RGB [H, W, 3], read as `load_test_image` reads it: cv2.imread in
    colour (grey → 3 channels, alpha dropped, 16-bit → 8-bit, EXIF orientation applied).
    Raises UserError naming the file if it cannot be read (`_imread_bgr`)."""
    image = _imread_bgr(path)
    if image is None:
        raise UserError(f'cannot read image {path}: OpenCV cannot decode it (use JPEG, PNG, BMP, '
                        'WebP or TIFF)')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_model_input(rgb, img_size, img_ch=RGB_CHANNELS):
    """uint8 RGB [H, W, 3] → float32 [S, S, img_ch] in [-1, 1], the same steps as
    `load_test_image` after its read: cv2.resize INTER_LINEAR, /127.5 − 1 in float64."""
    image = cv2.resize(rgb, (img_size, img_size), interpolation=cv2.INTER_LINEAR)
    if img_ch == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    return np.float32(image / PIXEL_HALF_RANGE - 1)


def face_detector():
    """OpenCV's bundled Haar cascade for frontal faces. Raises UserError if it cannot load."""
    path = os.path.join(cv2.data.haarcascades, FACE_CASCADE)
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise UserError(f'cannot load the face detector {path}: reinstall opencv-python-headless')
    return detector


def find_face(rgb, detector):
    """The largest frontal face in uint8 RGB [H, W, 3]: (x, y, w, h) in pixels, or None.

    The cascade runs on the histogram-equalised grey image and ignores faces smaller than
    FACE_MIN_FRACTION of the shorter side (at least the cascade's own 24 px window).
    """
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    side = max(24, int(min(grey.shape) * FACE_MIN_FRACTION))
    faces = detector.detectMultiScale(grey, scaleFactor=FACE_SCALE_FACTOR,
                                      minNeighbors=FACE_MIN_NEIGHBORS, minSize=(side, side))
    if len(faces) == 0:
        return None
    return tuple(int(v) for v in max(faces, key=lambda f: int(f[2]) * int(f[3])))


def square_crop(rgb, box, scale=FACE_CROP_SCALE):
    """A square of side round(scale · max(w, h)) centred on `box` = (x, y, w, h).

    Along each axis where the square fits in the image it is shifted inside it (the face
    then sits off-centre but no pixel is invented); where it is larger than the image it
    stays centred on the face and the missing rows or columns repeat the edge pixels.
    """
    x, y, w, h = box
    side = max(1, int(round(scale * max(w, h))))
    starts = []
    for centre, extent in ((y + h / 2, rgb.shape[0]), (x + w / 2, rgb.shape[1])):
        start = int(round(centre - side / 2))
        starts.append(min(max(start, 0), extent - side) if side <= extent else start)
    top, left = starts
    crop = rgb[max(top, 0):top + side, max(left, 0):left + side]
    pad_top, pad_left = max(-top, 0), max(-left, 0)
    pad_bottom, pad_right = side - pad_top - crop.shape[0], side - pad_left - crop.shape[1]
    if pad_top or pad_left or pad_bottom or pad_right:
        crop = cv2.copyMakeBorder(crop, pad_top, pad_bottom, pad_left, pad_right,
                                  cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(crop)


def crop_face(rgb, detector):
    """(the square crop around the largest face, its box) or (rgb unchanged, None)."""
    box = find_face(rgb, detector)
    return (rgb, None) if box is None else (square_crop(rgb, box), box)


# --- Built-in demo dataset --------------------------------------------------------

DEMO_FOLDERS = ('trainA', 'trainB', 'testA', 'testB')
DEMO_SHAPES = {'A': 'disc', 'B': 'square'}   # domain letter → object drawn
DEMO_IMAGE_SIZE = 64
DEMO_TRAIN_COUNT = 400                       # images per domain
DEMO_TEST_COUNT = 50
DEMO_SEED = 20190731                         # the original's first-code date
DEMO_OBJECT_FRACTION = (0.3, 0.6)            # disc diameter / square side, over the image side
DEMO_MAX_TILT_DEG = 15                       # squares are tilted by at most this
DEMO_MARGIN = 2                              # pixels kept between the object and the border
DEMO_NOISE_CELLS = 4                         # smooth noise: a 4×4 grid upsampled
DEMO_NOISE_AMPLITUDE = 25
DEMO_STRIPE_PERIOD = (48.0, 128.0)           # pixels at 64 px, scaled with the size: soft waves
DEMO_BACKGROUND_LEVELS = (0, 110)            # background colours: dark (per RGB channel)
DEMO_OBJECT_LEVELS = (170, 255)              # object colours: light, so the shape always stands out
DEMO_SUBPIXEL_BITS = 4                       # cv2 drawing precision (shift)
DEMO_README = """\
U-GAT-IT demo dataset: discs (domain A) to squares (domain B).

A small synthetic unpaired problem, made by utils.make_demo_dataset with NumPy and
OpenCV, so the code can be tried without downloading data. Translating A to B needs
a change of shape, not only of colour: every image shows one flat-coloured object
(a disc in A, an axis-aligned or slightly tilted square in B) of random light colour,
size ({lo:.0%}-{hi:.0%} of the side) and position on a random dark background of soft
waves and smooth noise. Both domains draw colours, sizes and backgrounds the same way.

  trainA {train} discs      trainB {train} squares
  testA  {test} discs       testB  {test} squares
  {size}x{size} RGB PNG, seed {seed}. Generated deterministically: the same call
  writes the same bytes. Delete this folder to regenerate it.
"""


def _demo_background(rng, size):
    """Soft waves between two random dark colours plus smooth noise: float [S, S, 3]."""
    colours = rng.uniform(*DEMO_BACKGROUND_LEVELS, (2, 3))
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(*DEMO_STRIPE_PERIOD) * size / DEMO_IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size]
    offset = rng.uniform(0, 2 * np.pi)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + offset
    mix = ((np.sin(phase) + 1) / 2)[..., None]
    cells = rng.uniform(-1, 1, (DEMO_NOISE_CELLS, DEMO_NOISE_CELLS, 3)).astype(np.float32)
    noise = cv2.resize(cells, (size, size), interpolation=cv2.INTER_CUBIC)
    return colours[0] * (1 - mix) + colours[1] * mix + DEMO_NOISE_AMPLITUDE * noise


def _demo_image(rng, size, shape):
    """One demo image (uint8 [S, S, 3] RGB) with a `shape` ('disc' or 'square') on it."""
    image = np.ascontiguousarray(np.clip(np.rint(_demo_background(rng, size)), 0, 255)
                                 .astype(np.uint8))
    colour = tuple(int(v) for v in np.rint(rng.uniform(*DEMO_OBJECT_LEVELS, 3)))
    extent = rng.uniform(*DEMO_OBJECT_FRACTION) * size   # diameter or side
    tilt = 0.0
    if shape == 'square':
        tilt = np.deg2rad(rng.uniform(-DEMO_MAX_TILT_DEG, DEMO_MAX_TILT_DEG))
    half_span = extent / 2 * (abs(np.cos(tilt)) + abs(np.sin(tilt)))
    centre = rng.uniform(half_span + DEMO_MARGIN, size - half_span - DEMO_MARGIN, 2)
    scale = 1 << DEMO_SUBPIXEL_BITS
    if shape == 'disc':
        centre_fixed = tuple(int(v) for v in np.rint(centre * scale))
        cv2.circle(image, centre_fixed, int(round(extent / 2 * scale)), colour,
                   thickness=-1, lineType=cv2.LINE_AA, shift=DEMO_SUBPIXEL_BITS)
    else:
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * extent / 2
        rotation = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
        points = np.rint((corners @ rotation.T + centre) * scale).astype(np.int32)
        cv2.fillConvexPoly(image, points, colour, lineType=cv2.LINE_AA, shift=DEMO_SUBPIXEL_BITS)
    return image


def _demo_plan(root, train_count, test_count):
    """[(path, random-stream key)] of every demo image under `root`."""
    plan = []
    for folder_index, folder in enumerate(DEMO_FOLDERS):
        domain = folder[-1]
        count = train_count if folder.startswith('train') else test_count
        names = [f'{DEMO_SHAPES[domain]}_{i:04d}.png' for i in range(count)]
        plan += [(os.path.join(root, folder, name), (folder_index, i)) for i, name in enumerate(names)]
    return plan


def make_demo_dataset(root, image_size=DEMO_IMAGE_SIZE, train_count=DEMO_TRAIN_COUNT,
                      test_count=DEMO_TEST_COUNT, seed=DEMO_SEED):
    """Writes the disc → square demo dataset to root/{trainA,trainB,testA,testB}; returns root.

    Deterministic (same arguments, same bytes). Skipped if root/README.txt matches and
    every image exists; README.txt is written last, so an interrupted run is redone.
    """
    readme = DEMO_README.format(lo=DEMO_OBJECT_FRACTION[0], hi=DEMO_OBJECT_FRACTION[1],
                                train=train_count, test=test_count, size=image_size, seed=seed)
    readme_path = os.path.join(root, 'README.txt')
    plan = _demo_plan(root, train_count, test_count)
    if os.path.isfile(readme_path) and all(os.path.isfile(p) for p, _ in plan):
        with open(readme_path, encoding='utf-8') as f:
            if f.read() == readme:
                logging.info('Demo dataset already in %s', root)
                return root
    logging.info('Writing the demo dataset (%d images) to %s', len(plan), root)
    for folder in DEMO_FOLDERS:
        check_folder(os.path.join(root, folder))
    for path, (folder_index, index) in plan:
        # One random stream per image: the same image whatever the counts.
        rng = np.random.default_rng([seed, folder_index, index])
        shape = DEMO_SHAPES[DEMO_FOLDERS[folder_index][-1]]
        image = _demo_image(rng, image_size, shape)
        ok, data = cv2.imencode('.png', cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise UserError(f'Cannot encode demo image {path}.')
        with open(path, 'wb') as f:
            f.write(data.tobytes())
    with open(readme_path, 'w', encoding='utf-8') as f:
        f.write(readme)
    return root


# --- Pictures ------------------------------------------------------------------

HEATMAP_ALPHA = 0.5          # attention overlays: half colour map, half input
LABEL_HEIGHT = 14            # pixels of the caption strip above a sample sheet
SHEET_COLUMNS = ('input', 'attention', 'translation', 'cycle', 'identity')
SHEET_MIN_TILE = 96          # small images are enlarged (nearest) to at least this so captions fit


def to_uint8(images):
    """[-1, 1] floats -> uint8 by the original's ((x + 1) / 2 · 255) truncation."""
    return inverse_transform(images)


def write_image(path, rgb):
    """Writes an RGB uint8 array [H, W, 3] (or [H, W]) with OpenCV; the format follows the name."""
    check_folder(os.path.dirname(path) or '.')
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[-1] == 3 else rgb
    if not cv2.imwrite(path, image):
        raise UserError(f'cannot write {path}: check that the folder is writable and has space')


def heatmap_overlay(image, heatmap):
    """A CAM heatmap [h, w] stretched to [0, 1], coloured (jet) and laid over `image` [S, S, 3] uint8."""
    lo, hi = float(np.min(heatmap)), float(np.max(heatmap))
    scaled = (heatmap - lo) / (hi - lo) if hi > lo else np.zeros_like(heatmap)
    size = (image.shape[1], image.shape[0])
    coloured = cv2.applyColorMap(cv2.resize(np.uint8(scaled * 255), size), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    return np.uint8(HEATMAP_ALPHA * coloured + (1 - HEATMAP_ALPHA) * image)


def sample_sheet(rows):
    """The training sample picture: for each direction and image, one row of
    input | attention over the input | translation | cycle reconstruction | identity.

    `rows`: {'A2B': {'input', 'heatmap', 'translation', 'cycle', 'identity'}, 'B2A': ...}
    with images [B, S, S, C] in [-1, 1] and heatmaps [B, h, w]. Returns RGB uint8 with a
    caption strip on top; tiles smaller than SHEET_MIN_TILE are enlarged by a whole factor.
    """
    lines = []
    for direction in sorted(rows):
        part = rows[direction]
        inputs = to_uint8(part['input'])
        for i in range(inputs.shape[0]):
            tiles = [inputs[i], heatmap_overlay(inputs[i], part['heatmap'][i])]
            tiles += [to_uint8(part[k][i]) for k in ('translation', 'cycle', 'identity')]
            tiles = [np.repeat(t, 3, axis=-1) if t.shape[-1] == 1 else t for t in tiles]
            lines.append(np.concatenate(tiles, axis=1))
    sheet = np.concatenate(lines, axis=0)
    zoom = -(-SHEET_MIN_TILE // (sheet.shape[1] // len(SHEET_COLUMNS)))  # ceiling division
    sheet = np.repeat(np.repeat(sheet, zoom, axis=0), zoom, axis=1)
    strip = np.full((LABEL_HEIGHT, sheet.shape[1], 3), 255, np.uint8)
    width = sheet.shape[1] // len(SHEET_COLUMNS)
    for k, name in enumerate(SHEET_COLUMNS):
        cv2.putText(strip, name, (k * width + 2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_PLAIN,
                    0.8, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, sheet], axis=0)


# --- Progress and loss history ---------------------------------------------------

RATE_WINDOW = 20             # it/s and ETA from the last N step times (tracing drops out)


class Progress:
    """One progress line per step: epoch, step, it/s, ETA and the losses.

    On a terminal the line is rewritten in place; otherwise (a log file) every
    step prints a plain line, with no control codes. `quiet` prints nothing (a
    worker other than the chief of a multi-worker run).
    """

    def __init__(self, total, done, stream=None, quiet=False):
        self.total, self.done = total, done
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.step_times = collections.deque(maxlen=RATE_WINDOW)
        self.last = time.perf_counter()
        self.open_line = False

    def update(self, epoch, idx, iteration, d_loss, g_loss):
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        self.last = now
        self.done += 1
        seconds_per_step = sum(self.step_times) / len(self.step_times)
        eta = format_duration((self.total - self.done) * seconds_per_step)
        if self.quiet:
            return
        line = (f'Epoch: [{epoch:3d}] [{idx + 1:5d}/{iteration:5d}] step {self.done}/{self.total} '
                f'{1 / max(seconds_per_step, 1e-9):6.2f} it/s ETA {eta} '
                f'd_loss: {d_loss:.8f}, g_loss: {g_loss:.8f}')
        if self.tty:
            self.stream.write('\r\x1b[K' + line)
            self.open_line = True
        else:
            self.stream.write(line + '\n')
        self.stream.flush()

    def note(self, message):
        """A message on its own line (does not disturb the progress line)."""
        if self.quiet:
            return
        self.close()
        self.stream.write(message + '\n')
        self.stream.flush()

    def close(self):
        if self.open_line:
            self.stream.write('\n')
            self.open_line = False


BAR_WIDTH = 30               # characters of count_bar's bar


def count_bar(label, done, total, stream=None):
    """One progress report, `label [#####.....] done/total`: rewritten in place on a terminal
    (ending the line when done == total), a plain line in a log file (no control codes)."""
    stream = stream or sys.stdout
    filled = BAR_WIDTH * done // max(total, 1)
    line = f'{label} [{"#" * filled}{"." * (BAR_WIDTH - filled)}] {done}/{total}'
    if stream.isatty():
        stream.write('\r\x1b[K' + line + ('\n' if done >= total else ''))
    else:
        stream.write(line + '\n')
    stream.flush()


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = f'{rest // 3600:d}:{rest % 3600 // 60:02d}:{rest % 60:02d}'
    return f'{days}d {text}' if days else text


class LossHistory:
    """Losses per step, appended to a JSON-lines file (survives restarts) and plotted."""

    def __init__(self, path):
        self.path = path
        check_folder(os.path.dirname(path) or '.')

    def append(self, step, losses):
        with open(self.path, 'a') as f:
            f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in losses.items()}}) + '\n')

    def read(self):
        """{step: losses}, the last record of a step winning (a resumed run may repeat steps)."""
        records = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash
                    records[record.pop('step')] = record
        return records

    def plot(self, path):
        """A PNG of the totals and of each weighted G term, by step."""
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot as plt
        records = self.read()
        steps = sorted(records)
        panels = [('totals', ('Discriminator_loss', 'Generator_loss')),
                  ('D per domain', ('D_A_loss', 'D_B_loss')),
                  ('G_A (B→A) terms', ('G_A_gan', 'G_A_cycle', 'G_A_identity', 'G_A_cam')),
                  ('G_B (A→B) terms', ('G_B_gan', 'G_B_cycle', 'G_B_identity', 'G_B_cam'))]
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True)
        for ax, (title, names) in zip(axes, panels):
            for name in names:
                points = [(s, records[s][name]) for s in steps if name in records[s]]
                if points:
                    ax.plot(*zip(*points), label=name, linewidth=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_yscale('symlog', linthresh=1e-2)
            ax.legend(fontsize=7, loc='upper right')
        axes[-1].set_xlabel('step')
        fig.tight_layout()
        tmp = path + '.tmp.png'
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)


# --- Checkpoint files ----------------------------------------------------------------

CHECKPOINT_STATE = 'checkpoint'       # TF's state file: which checkpoints exist, the newest last
TMP_PREFIX = '.tmp-'
STATE_NEWEST = re.compile(r'^model_checkpoint_path:\s*"(.+)"\s*$', re.M)
SAVED_NAME = re.compile(r'\.model-\d+$')  # the original's (and our) checkpoint names
# Test-only fault injection, read in `_fault_point` and nowhere else: never set it for real
# runs. UGATIT_TEST_FAULT='<action>@<stage>@<checkpoint name>' acts when the save of that
# checkpoint reaches `stage` (one of FAULT_STAGES, see `write_checkpoint`): action 'kill'
# sends this process SIGKILL; 'enospc' ('written' or 'renamed') raises the OSError of a
# full disk.
FAULT_ENV = 'UGATIT_TEST_FAULT'
FAULT_STAGES = ('written', 'renamed', 'listed')


def _fault_point(stage, name):
    """Test-only: acts on UGATIT_TEST_FAULT at `stage` of saving checkpoint `name`."""
    action, _, where = os.environ.get(FAULT_ENV, '').partition('@')
    if where != f'{stage}@{name}':
        return
    if action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def _fsync(path):
    """Flushes a file, or a folder's entries (renames, deletions), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(paths):
    """Deletes `paths` in order, ignoring those already gone."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def checkpoint_files(prefix):
    """The index (first) and data files of the checkpoint `prefix`."""
    return [prefix + '.index'] + sorted(glob.glob(glob.escape(prefix) + '.data-*'))


def error_text(err):
    """An OSError's or TF error's message as one short line."""
    text = getattr(err, 'strerror', None) or getattr(err, 'message', None) or str(err)
    text = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:\w+\]', '', text).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_checkpoint(directory, name, tensors, max_to_keep, marker_key):
    """Writes a name-based (TF1 `Saver`-format) checkpoint `directory/name`; returns its prefix.

    `tensors`: {name: tensor or array}. The steps, each a `_fault_point` stage:
    1. SaveV2 writes `.tmp-<name>.{index,data-*}`, each file is fsynced ('written');
    2. leftovers of an abandoned save under `name` are deleted (index first), the data
       files and then the index take their final names, the folder is fsynced
       ('renamed'): an index always has its data;
    3. the `checkpoint` state file is replaced (temporary file, fsync, rename, fsync of
       the folder): only now is the checkpoint saved ('listed');
    4. the oldest checkpoints that hold `marker_key` (ours) beyond `max_to_keep` are
       deleted, index first; others are kept.
    A kill at any moment leaves the checkpoint that the state file names complete, and
    `remove_partial_checkpoints` clears what it left. A failure before step 3 ends (a full
    disk) deletes the new files, leaves the state file and the older checkpoints as they
    were, and raises UserError.
    """
    check_folder(directory, '--checkpoint_dir')
    tmp = os.path.join(directory, TMP_PREFIX + name)
    final = os.path.join(directory, name)
    names = sorted(tensors)
    try:
        tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[''] * len(names),
                          tensors=[tensors[n] for n in names])
        written = checkpoint_files(tmp)
        for path in written:
            _fsync(path)
        _fault_point('written', name)
        _remove(checkpoint_files(final))
        for path in written[1:] + written[:1]:  # data first, the index last
            os.replace(path, final + path[len(tmp):])
        _fsync(directory)
        _fault_point('renamed', name)
        state, stale = _checkpoint_state(directory, name, max_to_keep, marker_key)
        _replace_file(os.path.join(directory, CHECKPOINT_STATE), state)
    except BaseException as err:
        _remove(glob.glob(glob.escape(tmp) + '*'))
        if os.path.basename(newest_listed(directory) or '') != name:
            _remove(checkpoint_files(final))
        if isinstance(err, (OSError, tf.errors.OpError)):
            raise UserError(f'cannot save checkpoint {final} ({error_text(err)}): the partial '
                            'files are removed and the previous checkpoints kept; make room, '
                            'then run the same command to resume') from err
        raise
    _fault_point('listed', name)
    for prefix in stale:
        _remove(checkpoint_files(prefix))
    return final


def _replace_file(path, text):
    """Replaces `path` with `text` atomically and durably (temporary file, fsync, rename)."""
    folder = os.path.dirname(path) or '.'
    tmp = os.path.join(folder, TMP_PREFIX + os.path.basename(path))
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(folder)


def newest_listed(directory):
    """The newest checkpoint the state file of `directory` names (as written there, possibly
    an absolute path from another machine), or None: no state file, or a damaged one."""
    try:
        with open(os.path.join(directory, CHECKPOINT_STATE), encoding='utf-8',
                  errors='replace') as f:
            match = STATE_NEWEST.search(f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def complete_checkpoints(directory):
    """Complete checkpoints in `directory` (an index and its data), oldest first by counter."""
    prefixes = [p[:-len('.index')] for p in glob.glob(os.path.join(glob.escape(directory), '*.index'))
                if not os.path.basename(p).startswith(TMP_PREFIX)]
    step = lambda p: int(m.group(1)) if (m := re.search(r'-(\d+)$', p)) else -1
    return sorted((p for p in prefixes if len(checkpoint_files(p)) > 1), key=step)


def _checkpoint_state(directory, newest, max_to_keep, marker_key):
    """(the state file's text with `newest` last, the prefixes rotation deletes): the oldest
    of ours (holding `marker_key`) beyond `max_to_keep`."""
    prefixes = [p for p in complete_checkpoints(directory) if os.path.basename(p) != newest]
    prefixes.append(os.path.join(directory, newest))
    ours = []
    for prefix in prefixes:
        try:
            if tf.train.load_checkpoint(prefix).has_tensor(marker_key):
                ours.append(prefix)
        except (tf.errors.OpError, ValueError):
            continue
    stale = ours[:-max_to_keep] if max_to_keep else []
    kept = [p for p in prefixes if p not in stale]
    lines = [f'model_checkpoint_path: "{newest}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in kept]
    return '\n'.join(lines) + '\n', stale


def remove_partial_checkpoints(directory):
    """Deletes what an interrupted save left in `directory`: its temporary files, and data
    files of checkpoints (`*.model-<n>`) whose index is missing. Returns the paths deleted."""
    if not os.path.isdir(directory):
        return []
    partial = [p for p in glob.glob(os.path.join(glob.escape(directory), '.*'))
               if os.path.basename(p).startswith(TMP_PREFIX) and os.path.isfile(p)]
    for path in glob.glob(os.path.join(glob.escape(directory), '*.data-*')):
        prefix = path[:path.rindex('.data-')]
        if SAVED_NAME.search(prefix) and not os.path.exists(prefix + '.index'):
            partial.append(path)
    _remove(partial)
    if partial:
        logging.info('Removed %d file(s) of an interrupted checkpoint save in %s',
                     len(partial), directory)
    return partial


def checkpoints_size(directory):
    """Bytes held by the complete checkpoints in `directory`."""
    return sum(os.path.getsize(path) for prefix in complete_checkpoints(directory)
               for path in checkpoint_files(prefix))


def format_bytes(n):
    """1234567 -> '1.2 MB' (powers of 1000)."""
    for unit in ('B', 'KB', 'MB', 'GB'):
        if abs(n) < 1000:
            return f'{n:.3g} {unit}'
        n /= 1000
    return f'{n:.3g} TB'


def check_free_space(folder, needed, what):
    """Warns in one line, and returns the warning, if the disk holding `folder` has fewer
    than `needed` bytes free (`what` says what they are for); otherwise returns None."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):  # the folder may not exist yet
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free >= needed:
        return None
    message = (f'only {format_bytes(free)} free on the disk of {folder}, and {what} need '
               f'{format_bytes(needed)} more: free some space or choose another --checkpoint_dir')
    logging.warning(message)
    return message


# --- Stopping cleanly ------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """A stop request (SIGINT, SIGTERM) acted on between two training steps."""


class StopRequests:
    """From creation to `restore()`, the first SIGINT (Ctrl-C) or SIGTERM (pre-emption) only
    records `signal`; `check()` then raises `Interrupted`, at a point where the state is
    consistent. A second signal raises KeyboardInterrupt at once. Installs nothing outside
    the main thread (signals only reach the main thread)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NOTICE = b'\nstopping after this step; press Ctrl-C again to stop at once\n'

    def __init__(self):
        self.signal = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        os.write(sys.__stderr__.fileno(), self.NOTICE)  # no buffered I/O in a signal handler

    def check(self):
        if self.signal is not None:
            raise Interrupted(self.signal)

    def restore(self):
        """Puts back the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# --- Test-phase outputs ------------------------------------------------------------

def translation_paths(out_dir, name):
    """Where the test phase puts image `name`: {'name', 'input', 'attention', 'output'} (the
    translation `out_dir/<name>`, the model's input and the attention map in subfolders)."""
    return {'name': name,
            'input': os.path.join(out_dir, 'input', name),
            'attention': os.path.join(out_dir, 'attention', name),
            'output': os.path.join(out_dir, name)}


def save_translation(out_dir, name, image, fake, heatmap):
    """Writes `out_dir/<name>` (translation), `out_dir/input/<name>` (the model's input) and
    `out_dir/attention/<name>` (heatmap over the input); returns the paths for the index."""
    source = to_uint8(image)
    paths = translation_paths(out_dir, name)
    write_image(paths['input'], source)
    write_image(paths['attention'], heatmap_overlay(source, heatmap))
    write_image(paths['output'], to_uint8(fake))
    return paths


def current_translations(out_dir, files, since, img_size):
    """The index rows (`translation_paths`) of the test-phase outputs of `files` in `out_dir`
    if they can be reused, else None: every translation, input and attention picture exists,
    none is older than `since` (a time stamp: the checkpoint's), and every translation is
    img_size × img_size (a light model runs at any --img_size under one model_dir)."""
    rows = [translation_paths(out_dir, os.path.basename(f)) for f in files]
    for row in rows:
        for key in ('output', 'input', 'attention'):
            if not os.path.isfile(row[key]) or os.path.getmtime(row[key]) < since:
                return None
        image = cv2.imread(row['output'], cv2.IMREAD_UNCHANGED)
        if image is None or image.shape[:2] != (img_size, img_size):
            return None
    return rows


METRIC_COLUMNS = ('direction', 'KID×100', 'FID', 'translated', 'real')


def metric_rows(metrics):
    """[(direction, 'mean ± std', FID, images translated, real images)] as text, for
    `metrics` = {direction: {'kid_x100_mean', 'kid_x100_std' (None: one block), 'fid',
    'n_translated', 'n_real'}}."""
    rows = []
    for direction, m in metrics.items():
        std = m['kid_x100_std']
        spread = f'± {std:.2f}' if std is not None and np.isfinite(std) else '(one block: no std)'
        rows.append((direction, f'{m["kid_x100_mean"]:.2f} {spread}', f'{m["fid"]:.2f}',
                     str(m['n_translated']), str(m['n_real'])))
    return rows


def metrics_table(metrics):
    """`metrics` (as `metric_rows` takes) as a plain-text table under a header line."""
    rows = [METRIC_COLUMNS] + metric_rows(metrics)
    widths = [max(len(row[i]) for row in rows) for i in range(len(METRIC_COLUMNS))]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def write_index_html(root, sections, img_size, metrics=None, metrics_note=''):
    """`root/index.html`: per direction, one row per image (name, input, attention, output),
    every image linked relative to `root` so that the folder can be moved or zipped. With
    `metrics` (as `metric_rows` takes), a table of the KID and FID figures comes first,
    followed by `metrics_note`."""
    def img(path):
        rel = html.escape(os.path.relpath(path, root).replace(os.sep, '/'), quote=True)
        return f'<td><img src="{rel}" width="{img_size}" height="{img_size}" alt=""></td>'

    def cells(tag, values):
        return '<tr>' + ''.join(f'<{tag}>{html.escape(v)}</{tag}>' for v in values) + '</tr>'

    parts = ['<!DOCTYPE html>', '<html lang="en">', '<head><meta charset="utf-8">',
             '<title>U-GAT-IT results</title>',
             '<style>body{font-family:sans-serif} td{padding:2px} th{text-align:left}</style>',
             '</head>', '<body>']
    if metrics:
        parts += ['<h2>KID and FID</h2>', '<table>', cells('th', METRIC_COLUMNS)]
        parts += [cells('td', row) for row in metric_rows(metrics)]
        parts += ['</table>', f'<p>{html.escape(metrics_note)}</p>']
    for direction, rows in sections:
        parts += [f'<h2>{html.escape(direction)}</h2>', '<table>',
                  '<tr><th>name</th><th>input</th><th>attention</th><th>output</th></tr>']
        for row in rows:
            parts.append(f'<tr><td>{html.escape(row["name"])}</td>{img(row["input"])}'
                         f'{img(row["attention"])}{img(row["output"])}</tr>')
        parts.append('</table>')
    parts += ['</body>', '</html>']
    path = os.path.join(check_folder(root), 'index.html')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts) + '\n')
    return path


# --- Evaluation: InceptionV3 features for KID and FID ---------------------------------
#
# The paper's protocol: uint8 RGB images (as the test phase writes them), resized to
# 299 × 299 by tf.image.resize (bilinear), keras.applications.inception_v3.preprocess_input
# (x / 127.5 − 1), InceptionV3(include_top=False, pooling='avg'): one 2048-d vector each.

INCEPTION_SIZE = 299                 # InceptionV3's input side
INCEPTION_FEATURES = 2048            # the average-pooled last block
INCEPTION_BATCH = 16                 # images per forward pass (memory only: not the results)
INCEPTION_WEIGHTS_FILE = 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5'
# Where Keras downloads that file from, and its md5 (keras.applications.inception_v3).
INCEPTION_WEIGHTS_URL = ('https://storage.googleapis.com/tensorflow/keras-applications/'
                         'inception_v3/' + INCEPTION_WEIGHTS_FILE)
INCEPTION_WEIGHTS_MD5 = 'bcbd6486424b2319ff4ef7d526e38f63'
KERAS_CACHE_SUBDIR = 'models'
# Tests only: when set (to anything), InceptionV3(weights=None): random weights and no
# download. Such figures compare nothing; metrics.json and the log say so.
RANDOM_INCEPTION_ENV = 'UGATIT_TEST_RANDOM_INCEPTION'
FEATURE_CACHE = '.inception_features.npz'   # per image folder (a dot-file: no dataset image)


def keras_cache_dir():
    """Keras' cache folder, chosen as Keras chooses it: $KERAS_HOME, else ~/.keras (/tmp/.keras
    when the home folder is not writable)."""
    if 'KERAS_HOME' in os.environ:
        return os.environ['KERAS_HOME']
    home = os.path.expanduser('~')
    return os.path.join(home if os.access(home, os.W_OK) else '/tmp', '.keras')


def _first_line(err):
    text = str(getattr(err, 'message', err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_inception_weights(path=''):
    """The InceptionV3 weights to use: (a weights file, or None for random weights; a
    description for metrics.json).

    `path` (--inception_weights) if given; else the ImageNet file in Keras' cache, looked
    for before anything else so that offline machines that have it never try the network;
    else Keras downloads it there (once, checking its md5). With RANDOM_INCEPTION_ENV set
    (tests), random weights. Raises UserError, in one line giving both ways to get the
    weights, when the file is not cached and the download fails.
    """
    if os.environ.get(RANDOM_INCEPTION_ENV):
        return None, f'random (InceptionV3(weights=None) by {RANDOM_INCEPTION_ENV}: tests only)'
    if path:
        if not os.path.isfile(path):
            raise UserError(f'--inception_weights {path} is not a file: give the path of an '
                            f'InceptionV3 weights file such as {INCEPTION_WEIGHTS_FILE}')
        return path, os.path.abspath(path)
    cache_dir = keras_cache_dir()
    cached = os.path.join(cache_dir, KERAS_CACHE_SUBDIR, INCEPTION_WEIGHTS_FILE)
    if not os.path.isfile(cached):
        import keras
        logging.info('Downloading the InceptionV3 ImageNet weights (about 90 MB) into %s', cached)
        try:
            cached = keras.utils.get_file(INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL,
                                          cache_subdir=KERAS_CACHE_SUBDIR, cache_dir=cache_dir,
                                          file_hash=INCEPTION_WEIGHTS_MD5)
        except Exception as err:  # Keras raises a plain Exception for every download failure
            raise UserError(
                f'no InceptionV3 ImageNet weights: {cached} does not exist and downloading it '
                f'failed ({_first_line(err)}); connect to the internet once (Keras keeps the '
                f'file), or pass --inception_weights PATH with a copy of {INCEPTION_WEIGHTS_FILE}'
            ) from err
    return cached, f'imagenet ({cached})'


class InceptionFeatures:
    """The evaluation's feature extractor: uint8 RGB images → float32 [N, 2048].

    `weights`: a weights file (`resolve_inception_weights`) or None (random: tests).
    `description` names them in metrics.json; `tag` identifies them in feature caches
    (random weights get a tag of their own, so no other extractor reuses their features).
    """

    def __init__(self, weights=None, description='random'):
        import keras
        try:
            self.model = keras.applications.InceptionV3(
                include_top=False, pooling='avg', weights=weights,
                input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, RGB_CHANNELS))
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f'cannot load InceptionV3 weights from {weights}: {_first_line(err)} '
                            f'(use a copy of {INCEPTION_WEIGHTS_FILE})') from err
        self.description = description
        if weights is None:
            self.tag = f'random-{uuid.uuid4().hex}'
        else:
            stat = os.stat(weights)
            self.tag = f'{os.path.realpath(weights)}:{stat.st_size}:{stat.st_mtime_ns}'
        spec = tf.TensorSpec([None, INCEPTION_SIZE, INCEPTION_SIZE, RGB_CHANNELS], tf.float32)
        self._forward = tf.function(lambda x: self.model(x, training=False),
                                    input_signature=[spec], autograph=False)

    @staticmethod
    def preprocess(images):
        """uint8 images ([N, H, W, C] or a list of [H, W, C], any sizes; C = 3, or 1 for grey)
        → float32 [N, 299, 299, 3] in [-1, 1]: tf.image.resize (bilinear) of each, then
        inception_v3.preprocess_input."""
        from keras.applications import inception_v3
        resized = []
        for image in images:
            image = tf.cast(tf.convert_to_tensor(image), tf.float32)
            if image.shape[-1] == 1:
                image = tf.image.grayscale_to_rgb(image)
            resized.append(tf.image.resize(image, [INCEPTION_SIZE, INCEPTION_SIZE],
                                           method='bilinear'))
        return inception_v3.preprocess_input(tf.stack(resized))

    def __call__(self, images):
        """Features float32 [N, 2048] of uint8 images (as `preprocess` takes), in batches."""
        batches = [self._forward(self.preprocess(images[i:i + INCEPTION_BATCH])).numpy()
                   for i in range(0, len(images), INCEPTION_BATCH)]
        return np.concatenate(batches) if batches else np.zeros((0, INCEPTION_FEATURES), np.float32)

    def of_files(self, files):
        """Features float32 [N, 2048] of image files (read as the test phase reads them),
        cached per folder (`FeatureCache`): only new or changed files go through the network,
        in batches, under a progress bar."""
        by_folder = {}
        for path in files:
            by_folder.setdefault(os.path.dirname(path) or '.', []).append(path)
        features = {}
        for folder, paths in by_folder.items():
            cache = FeatureCache(folder, self.tag)
            todo = [p for p in paths if cache.get(p) is None]
            label = f'InceptionV3 features of {folder} ({len(paths) - len(todo)} cached)'
            for start in range(0, len(todo), INCEPTION_BATCH):
                batch = todo[start:start + INCEPTION_BATCH]
                for path, feature in zip(batch, self([read_image_rgb(p) for p in batch])):
                    cache.put(path, feature)
                count_bar(label, start + len(batch), len(todo))
            if todo:
                cache.save()
            features.update((p, cache.get(p)) for p in paths)
        return np.stack([features[p] for p in files])


def load_inception(weights_path=''):
    """`InceptionFeatures` with the weights `resolve_inception_weights(weights_path)` picks."""
    weights, description = resolve_inception_weights(weights_path)
    if weights is None:
        logging.warning('InceptionV3 with random weights (%s is set): the figures compare '
                        'nothing', RANDOM_INCEPTION_ENV)
    return InceptionFeatures(weights, description)


class FeatureCache:
    """The features of the images of one folder, in `folder/.inception_features.npz`.

    An entry is reused while its file keeps its size and modification time and the
    weights keep their tag; anything else is recomputed. A missing, unreadable or
    unwritable cache only costs time (a warning when it cannot be written).
    """

    def __init__(self, folder, tag):
        self.path, self.tag = os.path.join(folder, FEATURE_CACHE), tag
        self.entries = {}  # file name -> ((size, mtime_ns), feature [2048])
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data['tag']) == tag:
                    for name, size, mtime, feature in zip(data['names'], data['sizes'],
                                                          data['mtimes'], data['features']):
                        self.entries[str(name)] = ((int(size), int(mtime)), feature)
        except (OSError, ValueError, KeyError):
            pass  # no cache yet, or a broken one: everything is recomputed

    @staticmethod
    def _stamp(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns

    def get(self, path):
        """The cached feature of `path`, or None if absent or stale."""
        entry = self.entries.get(os.path.basename(path))
        return entry[1] if entry is not None and entry[0] == self._stamp(path) else None

    def put(self, path, feature):
        self.entries[os.path.basename(path)] = (self._stamp(path), feature)

    def save(self):
        """Writes the entries whose files still exist unchanged (atomically: tmp + rename)."""
        folder = os.path.dirname(self.path)
        names = [name for name, (stamp, _) in sorted(self.entries.items())
                 if os.path.isfile(os.path.join(folder, name))
                 and self._stamp(os.path.join(folder, name)) == stamp]
        tmp = os.path.join(folder, TMP_PREFIX + FEATURE_CACHE)
        try:
            with open(tmp, 'wb') as f:
                np.savez(f, tag=np.array(self.tag), names=np.array(names, dtype=str),
                         sizes=np.array([self.entries[n][0][0] for n in names], np.int64),
                         mtimes=np.array([self.entries[n][0][1] for n in names], np.int64),
                         features=np.array([self.entries[n][1] for n in names], np.float32
                                           ).reshape(len(names), -1))
            os.replace(tmp, self.path)
        except OSError as err:
            logging.warning('cannot write the feature cache %s (%s): features will be '
                            'recomputed next time', self.path, _first_line(err))


# --- Demo score: an independent domain classifier -----------------------------------
#
# How well did the demo learn? A small CNN, trained here on the REAL demo images only
# (nothing of U-GAT-IT's networks or losses), says which domain a picture belongs to;
# the score is the share of translations it assigns to the target domain.

DEMO_CLASSIFIER_FILTERS = (16, 32, 32)   # conv 3x3 + batch norm + ReLU + 2x2 max-pool each
DEMO_CLASSIFIER_EPOCHS = 3
DEMO_CLASSIFIER_BATCH = 32
DEMO_CLASSIFIER_LR = 3e-3


def load_images_for_classifier(files, img_size, img_ch=RGB_CHANNELS):
    """Image files → float32 [N, S, S, img_ch] in [-1, 1], read as the test phase reads them."""
    return np.stack([load_test_image(f, img_size, img_ch) for f in files])


def dihedral_copies(images):
    """The 8 flips and quarter turns of [N, S, S, C] images, stacked: [8N, S, S, C].
    A disc stays a disc and a square a square under all of them."""
    turned = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return np.concatenate(turned + [t[:, :, ::-1] for t in turned])


def train_domain_classifier(folder_a, folder_b, img_size, seed=0, img_ch=RGB_CHANNELS):
    """A small Keras CNN trained on the real images of `folder_a` (label 0) and `folder_b`
    (label 1) at `img_size` (and `img_ch`); returns it. Its sigmoid output is P(domain B).

    Independent of U-GAT-IT: its own layers, loss and optimizer, and real images only,
    augmented by their 8 flips and quarter turns. Seeds Keras, NumPy and Python's RNGs
    with `seed` (keras.utils.set_random_seed), so call it after any seeded work.
    About 10 s at 32 px on 2 CPU cores.
    """
    import keras
    keras.utils.set_random_seed(seed)
    files_a, files_b = list_images(folder_a), list_images(folder_b)
    x = dihedral_copies(load_images_for_classifier(files_a + files_b, img_size, img_ch))
    y = np.tile(np.array([0] * len(files_a) + [1] * len(files_b), np.float32), 8)
    layers = [keras.Input((img_size, img_size, img_ch))]
    for filters in DEMO_CLASSIFIER_FILTERS:
        layers += [keras.layers.Conv2D(filters, 3, padding='same', use_bias=False),
                   keras.layers.BatchNormalization(), keras.layers.ReLU(),
                   keras.layers.MaxPooling2D()]
    layers += [keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(1, activation='sigmoid')]
    model = keras.Sequential(layers, name='demo_domain_classifier')
    model.compile(optimizer=keras.optimizers.Adam(DEMO_CLASSIFIER_LR), loss='binary_crossentropy')
    model.fit(x, y, batch_size=DEMO_CLASSIFIER_BATCH, epochs=DEMO_CLASSIFIER_EPOCHS,
              shuffle=True, verbose=0)
    return model


def probability_of_b(classifier, files, img_size):
    """The classifier's P(domain B) for each image file: float [N]."""
    x = load_images_for_classifier(files, img_size, classifier.input_shape[-1])
    return classifier.predict(x, batch_size=DEMO_CLASSIFIER_BATCH, verbose=0).reshape(-1)


def domain_accuracy(classifier, files_a, files_b, img_size):
    """Share of `files_a` + `files_b` put in the right domain (A: P(B) < 0.5, B: >= 0.5)."""
    right = np.concatenate([probability_of_b(classifier, files_a, img_size) < 0.5,
                            probability_of_b(classifier, files_b, img_size) >= 0.5])
    return float(np.mean(right))


def domain_shares(classifier, a2b_files, b2a_files, img_size):
    """(share of A→B translations classified B, share of B→A translations classified A)."""
    to_b = float(np.mean(probability_of_b(classifier, a2b_files, img_size) >= 0.5))
    to_a = float(np.mean(probability_of_b(classifier, b2a_files, img_size) < 0.5))
    return to_b, to_a


DEMO_SCORE_FILE = 'demo_score.json'
DEMO_CLASSIFIER_SEED = 0                 # the score does not depend on --seed's classifier


def demo_score(dataset_root, a2b_files, b2a_files, img_size, img_ch=RGB_CHANNELS, path=None):
    """Scores the demo's translations: trains the classifier on dataset_root/trainA, trainB,
    checks it on testA, testB, and classifies the translations. Returns (and with `path`
    writes as JSON) {'A2B_classified_B', 'B2A_classified_A': shares in [0, 1],
    'classifier_accuracy_real_test', 'A2B_images', 'B2A_images', 'img_size'}."""
    folder = lambda split: os.path.join(dataset_root, split)
    classifier = train_domain_classifier(folder('trainA'), folder('trainB'), img_size,
                                         DEMO_CLASSIFIER_SEED, img_ch)
    accuracy = domain_accuracy(classifier, list_images(folder('testA')),
                               list_images(folder('testB')), img_size)
    to_b, to_a = domain_shares(classifier, a2b_files, b2a_files, img_size)
    score = {'A2B_classified_B': to_b, 'B2A_classified_A': to_a,
             'classifier_accuracy_real_test': accuracy,
             'A2B_images': len(a2b_files), 'B2A_images': len(b2a_files), 'img_size': img_size}
    if path:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(score, f, indent=2)
            f.write('\n')
    return score


# --- Benchmark helpers --------------------------------------------------------------
# Used by `--phase benchmark`; nothing here knows U-GAT-IT.

PEAK_MATMUL_SIZE = 2048       # the machine-peak probe: float32 [n, n] @ [n, n], 2n³ FLOP
PEAK_MATMUL_REPEATS = 5
# Ops whose work is counted (2 FLOP per multiply-add); elementwise ops, norms and
# reductions are left out: they are a few per cent of the convolutions here.
CONV_OPS = ('Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter')
MATMUL_OPS = ('MatMul', 'BatchMatMulV2')


def timing_summary(seconds):
    """{'median', 'min', 'max'} of a list of durations in seconds."""
    values = np.asarray(seconds, np.float64)
    return {'median': float(np.median(values)), 'min': float(values.min()),
            'max': float(values.max())}


def time_calls(fn, repeats):
    """Runs `fn()` `repeats` times; returns the durations (s). `fn` must return only when
    its work is done (fetch a result to the host on a GPU)."""
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return durations


def graph_flops(graph, batch):
    """FLOP of one run of a traced graph (`tf.function(...).get_concrete_function().graph`,
    gradients included), counting convolutions and matrix products only, at `batch`
    for an unknown batch dimension.

    Formula: 2·K_h·K_w·C_in·C_out·H_out·W_out·B for a 2-D convolution and for each of
    its two gradients (input and filter: the same multiply-adds), 2·m·k·n for a matrix
    product. Nested function calls (e.g. tf.recompute_grad) are counted through.
    """
    total = 0
    seen_functions = set()

    def dim(value):
        return batch if value is None else value

    def count(g):
        nonlocal total
        for op in g.get_operations():
            if op.type in CONV_OPS:
                # the forward conv's output (or the incoming gradient) [B, Ho, Wo, Co] and filter
                if op.type == 'Conv2D':
                    out_shape, kernel = op.outputs[0].shape, op.inputs[1].shape
                elif op.type == 'Conv2DBackpropInput':
                    out_shape, kernel = op.inputs[2].shape, op.inputs[1].shape
                else:
                    out_shape, kernel = op.inputs[2].shape, op.outputs[0].shape
                b, h, w, _ = (dim(v) for v in out_shape.as_list())
                kh, kw, cin, cout = kernel.as_list()
                total += 2 * kh * kw * cin * cout * h * w * b
            elif op.type in MATMUL_OPS:
                a, b_ = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
                transpose_a = op.get_attr('transpose_a' if op.type == 'MatMul' else 'adj_x')
                transpose_b = op.get_attr('transpose_b' if op.type == 'MatMul' else 'adj_y')
                m, k = (a[-1], a[-2]) if transpose_a else (a[-2], a[-1])
                n = b_[-2] if transpose_b else b_[-1]
                lead = int(np.prod([dim(v) for v in a[:-2]])) if len(a) > 2 else 1
                total += 2 * dim(m) * dim(k) * dim(n) * lead
            for attr in ('f', 'then_branch', 'else_branch', 'body', 'cond'):
                try:
                    name = op.get_attr(attr).name
                except (ValueError, AttributeError):
                    continue
                if name not in seen_functions:
                    seen_functions.add(name)
                    function = g._get_function(name)  # noqa: SLF001 — the graph's own library
                    if function is not None and hasattr(function, 'graph'):
                        count(function.graph)

    count(graph)
    return total


def machine_peak_gflops(device=None):
    """This machine's float32 matrix-product throughput (GFLOP/s): the median of
    PEAK_MATMUL_REPEATS products of two random [n, n] matrices, n = PEAK_MATMUL_SIZE."""
    n = PEAK_MATMUL_SIZE
    with tf.device(device):
        a = tf.random.uniform([n, n])
        b = tf.random.uniform([n, n])
        product = tf.function(lambda: tf.reduce_sum(tf.linalg.matmul(a, b)))
        product().numpy()  # warm-up and trace
        seconds = time_calls(lambda: product().numpy(), PEAK_MATMUL_REPEATS)
    return 2 * n ** 3 / np.median(seconds) / 1e9


GLIBC_M_ARENA_MAX = -8   # mallopt()'s parameter number for MALLOC_ARENA_MAX (malloc.h)
MALLOC_ARENAS = 2         # one per core of a small machine; glibc's default is 8 per core


def limit_malloc_arenas(arenas=MALLOC_ARENAS):
    """Caps glibc's malloc arenas, as MALLOC_ARENA_MAX does (unless that is set).

    TensorFlow's worker threads otherwise allocate from up to 8 arenas per core,
    and the freed activations of one step stay resident in them as fragments that
    the next step, running on other threads, does not reuse: at 256 px the
    process's peak grows by ~1 GB. Returns True when the cap is set; a no-op
    elsewhere than glibc (macOS, musl).
    """
    if os.environ.get('MALLOC_ARENA_MAX') or not sys.platform.startswith('linux'):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL('libc.so.6')
        return bool(libc.mallopt(GLIBC_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes():
    """The process's peak resident memory so far (bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024   # macOS reports bytes, Linux KiB


def write_noise_images(folder, count, size, seed=0):
    """`count` random-noise JPEGs of size×size under `folder` (for timing the pipeline)."""
    rng = np.random.default_rng(seed)
    check_folder(folder)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f'noise_{i:04d}.jpg')
        cv2.imwrite(path, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def benchmark_table(figures):
    """The benchmark's figures (UGATIT.benchmark) as a readable table: str."""
    c = figures['config']
    gib = lambda n: 'n/a' if n is None else f'{n / 2 ** 30:.2f} GiB'
    rows = [
        ('configuration', f"{'light' if c['light'] else 'full'}, img {c['img_size']}, ch "
                          f"{c['ch']}, batch {c['batch_size']}"
                          + (f" on each of {figures['replicas']} replicas"
                             if figures.get('replicas', 1) > 1 else f", on {figures['device']}")),
        ('tracing (once per run)', f"{figures['trace_s']:.1f} s"),
        ('training iteration (D + G)', '{:.3f} s  (range {:.3f}-{:.3f})'.format(
            figures['train_iteration_s'], *figures['train_iteration_s_range'])),
        ('  D update', f"{figures['d_update_s']:.3f} s"),
        ('  G update', f"{figures['g_update_s']:.3f} s"),
        ('training images/s (batch per iteration)', f"{figures['images_per_s']:.2f}"),
        ('translation A2B', '{:.4f} s  (range {:.4f}-{:.4f})'.format(
            figures['translate_s'], *figures['translate_s_range'])),
        ('FLOP: training iteration', f"{figures['train_iteration_gflop']:.1f} GFLOP"),
        ('FLOP: translation', f"{figures['translate_gflop']:.2f} GFLOP"),
        ('achieved (training)', f"{figures['achieved_gflops']:.1f} GFLOP/s"),
        ('machine peak (matmul)', f"{figures['machine_peak_gflops']:.1f} GFLOP/s"),
        ('share of peak', f"{figures['peak_share']:.0%}"),
        ('parameters', gib(figures['parameter_bytes'])),
        ('optimizer state', gib(figures['optimizer_state_bytes'])),
        ('peak host memory', gib(figures['peak_rss_bytes'])),
        ('peak device memory', gib(figures['peak_device_bytes'])),
        ('input pipeline', f"{figures['pipeline_images_per_s']:.0f} images/s"),
    ]
    width = max(len(name) for name, _ in rows)
    return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)
