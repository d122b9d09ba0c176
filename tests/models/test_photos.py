"""The real-photo sets: disjoint, deterministic, correctly cropped and normalised."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import EdgeqError
from models import photos

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")
if not (photos.MATE_NATURE_DIR.is_dir() and photos.OPENCV_DATA_DIR.is_dir()):
    pytest.skip(
        "needs Debian packages mate-backgrounds and opencv-doc", allow_module_level=True
    )


def test_calibration_and_evaluation_photos_are_disjoint_and_cover_the_set():
    calibration, evaluation = set(photos.CALIBRATION_PHOTOS), set(photos.EVALUATION_PHOTOS)
    assert not calibration & evaluation
    assert calibration | evaluation == {photo.name for photo in photos.PHOTOS}
    assert len({photo.name for photo in photos.PHOTOS}) == len(photos.PHOTOS)
    # Two views of one scene must not straddle the split.
    assert {"aero1", "aero3"} <= calibration


def test_shapes_counts_and_dtype():
    evaluation = photos.evaluation_images()
    assert evaluation.shape == (len(photos.EVALUATION_PHOTOS) * photos.CROPS_PER_PHOTO, 3, 224, 224)
    assert evaluation.shape[0] >= 100
    assert evaluation.dtype == np.float32 and evaluation.flags.c_contiguous
    assert len(photos.evaluation_image_names()) == len(evaluation)
    calibration = photos.calibration_images(32)
    assert calibration.shape == (32, 3, 224, 224)
    assert len(photos.calibration_images()) == len(photos.CALIBRATION_PHOTOS) * photos.CROPS_PER_PHOTO


def test_deterministic_and_normalised_with_the_given_mean_and_std():
    first = photos.calibration_images(20)
    again = photos.calibration_images(20)
    np.testing.assert_array_equal(first, again)
    preprocessing = photos.IMAGENET
    pixels = first * np.array(preprocessing.std)[:, None, None] + np.array(preprocessing.mean)[:, None, None]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Real photos use most of the range.
    assert pixels.min() < 0.05 and pixels.max() > 0.95
    other = photos.ImagePreprocessing(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(photos.calibration_images(20, other), pixels * 2 - 1, atol=1e-5)


def test_calibration_order_visits_every_photo_before_repeating_one():
    """The first crops are the centre crops of distinct photos (round-robin order)."""
    count = len(photos.CALIBRATION_PHOTOS)
    centre = photos.calibration_images(count)
    mirrored = photos.calibration_images(2 * count)[count:]
    # The second round is the mirror image of the first.
    np.testing.assert_array_equal(mirrored, centre[..., ::-1])
    flat = centre.reshape(count, -1)
    assert len({row.tobytes() for row in flat}) == count


def test_crop_geometry():
    pixels = np.arange(300 * 400 * 3, dtype=np.uint32).reshape(300, 400, 3).astype(np.uint8)
    for scale, position, mirror in photos._crop_boxes():
        crop = photos._crop(pixels, 224, scale, position, mirror)
        assert crop.shape == (224, 224, 3)
    # Scale 1: the shorter side is the crop, so a centre crop keeps the whole height.
    tall = np.zeros((400, 224, 3), np.uint8)
    tall[:88] = 255  # the top 88 rows are cut away by a centre crop of 224 out of 400
    centre = photos._crop(tall, 224, 1.0, "center", False)
    assert centre.max() == 0
    top = photos._crop(tall, 224, 1.0, "top-left", False)
    assert top[:80].min() == 255


def test_bad_count_is_a_user_error():
    with pytest.raises(EdgeqError, match="calibration photos"):
        photos.calibration_images(0)
    with pytest.raises(EdgeqError, match="calibration photos"):
        photos.calibration_images(10_000)
