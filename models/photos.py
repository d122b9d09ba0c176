"""A fixed set of real photos for measuring image-model fidelity.

Every photo comes from a package installed from a registry, so the set is the
same on every machine:

- scikit-image (``skimage.data``): astronaut, coffee, chelsea, rocket,
  motorcycle (left view of ``stereo_motorcycle``), hubble_deep_field,
  immunohistochemistry, retina, camera (greyscale)
- scikit-learn (``load_sample_images``): china, flower
- Debian ``mate-backgrounds`` (/usr/share/backgrounds/mate/nature): Aqua, Blinds,
  Dune, FreshFlower, Garden, GreenMeadow, LadyBird, RainDrops, Storm, TwoWings,
  Wood, YellowFlower
- Debian ``opencv-doc`` (/usr/share/doc/opencv-doc/examples/data): aero1, aero3,
  aloeL, apple, baboon, basketball1 (greyscale), board, box_in_scene (greyscale),
  building, butterfly, chicky_512, ela_original, fruits, graf1, home, leuvenA,
  licenseplate_motion, messi5, orange, pca_test1, rubberwhale1, smarties,
  squirrel_cls, stuff

Drawings, renders and synthetic test patterns shipped beside them are left out.

The photos are split into two disjoint sets by source photo (views of the same
scene, aero1/aero3, stay on one side):

- calibration (16 photos): coffee, rocket, hubble_deep_field, china, Aqua, Dune,
  GreenMeadow, RainDrops, aero1, aero3, apple, basketball1, board, fruits,
  leuvenA, stuff
- evaluation (31 photos): all the others

Each photo gives CROPS_PER_PHOTO deterministic square crops (see ``_crop_boxes``):
the standard centre crop (shorter side resized to 256/224 of the crop size),
its mirror image, the whole shorter side, and five crops (four corners and the
centre) at a closer zoom (shorter side at 320/224). So there are 128
calibration crops and 248 evaluation crops. Calibration crops are ordered
round-robin over photos, so ``calibration_images(32)`` covers every calibration
photo twice rather than four photos eight times.

Images come back as float32 NCHW, RGB, normalised as ``(pixel / 255 - mean) / std``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.errors import EdgeqError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MATE_NATURE_DIR = Path("/usr/share/backgrounds/mate/nature")
OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
INSTALL_HINT = {
    "scikit-image": "pip install scikit-image",
    "scikit-learn": "pip install scikit-learn",
    "mate-backgrounds": "apt-get install mate-backgrounds",
    "opencv-doc": "apt-get install opencv-doc",
}


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a model wants its images: square crop size and per-channel mean/std (0..1 units)."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 NHWC RGB crops -> float32 NCHW normalised input."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        scaled = (crops.astype(np.float32) / 255.0 - mean) / std
        return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2), dtype=np.float32)


IMAGENET = ImagePreprocessing()


@dataclass(frozen=True)
class Photo:
    name: str
    package: str  # the registry package that ships it (a key of INSTALL_HINT)
    load: Callable[[], np.ndarray]  # -> uint8 HxWx3 RGB


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _file(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    return load


def _mate(name: str) -> Photo:
    return Photo(name, "mate-backgrounds", _file(MATE_NATURE_DIR / f"{name}.jpg"))


def _opencv(filename: str) -> Photo:
    return Photo(Path(filename).stem, "opencv-doc", _file(OPENCV_DATA_DIR / filename))


PHOTOS: tuple[Photo, ...] = (
    *(Photo(name, "scikit-image", _skimage(name)) for name in (
        "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field",
        "immunohistochemistry", "retina", "camera",
    )),
    Photo("china", "scikit-learn", _sklearn("china.jpg")),
    Photo("flower", "scikit-learn", _sklearn("flower.jpg")),
    *(_mate(name) for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
        "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower",
    )),
    *(_opencv(filename) for filename in (
        "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
        "board.jpg", "box_in_scene.png", "building.jpg", "butterfly.jpg", "chicky_512.png",
        "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "leuvenA.jpg",
        "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "pca_test1.jpg",
        "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "stuff.jpg",
    )),
)  # fmt: skip

CALIBRATION_PHOTOS: tuple[str, ...] = (
    "coffee", "rocket", "hubble_deep_field", "china", "Aqua", "Dune", "GreenMeadow",
    "RainDrops", "aero1", "aero3", "apple", "basketball1", "board", "fruits", "leuvenA", "stuff",
)  # fmt: skip
EVALUATION_PHOTOS: tuple[str, ...] = tuple(
    photo.name for photo in PHOTOS if photo.name not in CALIBRATION_PHOTOS
)

# (shorter side as a multiple of the crop size, where the crop sits, mirrored)
_CROP_SCALES = ((256 / 224, "center", False), (256 / 224, "center", True), (1.0, "center", False))
_ZOOM = 320 / 224
_ZOOM_POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
CROPS_PER_PHOTO = len(_CROP_SCALES) + len(_ZOOM_POSITIONS)


def _load_rgb(photo: Photo) -> np.ndarray:
    try:
        pixels = photo.load()
    except (ImportError, FileNotFoundError) as error:
        raise EdgeqError(
            f"photo {photo.name!r} needs the {photo.package} package "
            f"({INSTALL_HINT[photo.package]}): {error}"
        ) from error
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)


def _crop_boxes() -> list[tuple[float, str, bool]]:
    return [*_CROP_SCALES, *((_ZOOM, position, False) for position in _ZOOM_POSITIONS)]


def _crop(pixels: np.ndarray, size: int, scale: float, position: str, mirror: bool) -> np.ndarray:
    """Resize so the shorter side is round(size * scale), then cut a size x size square."""
    from PIL import Image

    height, width = pixels.shape[:2]
    short = round(size * scale)
    if height <= width:
        new_w, new_h = round(width * short / height), short
    else:
        new_w, new_h = short, round(height * short / width)
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR))
    top = {"top": 0, "bottom": new_h - size}.get(position.split("-")[0], (new_h - size) // 2)
    left = {"left": 0, "right": new_w - size}.get(position.split("-")[-1], (new_w - size) // 2)
    crop = resized[top : top + size, left : left + size]
    return crop[:, ::-1] if mirror else crop


@functools.lru_cache(maxsize=4)
def _photo_crops(names: tuple[str, ...], size: int) -> np.ndarray:
    """uint8 [len(names) * CROPS_PER_PHOTO, size, size, 3], ordered crop kind first, then photo."""
    by_name = {photo.name: photo for photo in PHOTOS}
    rgb = [_load_rgb(by_name[name]) for name in names]
    crops = [
        _crop(pixels, size, scale, position, mirror)
        for scale, position, mirror in _crop_boxes()
        for pixels in rgb
    ]
    stacked = np.stack(crops)
    stacked.flags.writeable = False
    return stacked


def calibration_images(
    n: int | None = None, preprocessing: ImagePreprocessing = IMAGENET
) -> np.ndarray:
    """The first ``n`` calibration crops (all 128 when None), float32 NCHW."""
    crops = _photo_crops(CALIBRATION_PHOTOS, preprocessing.size)
    if n is not None:
        if not 0 < n <= len(crops):
            raise EdgeqError(f"asked for {n} calibration photos; there are 1 to {len(crops)}")
        crops = crops[:n]
    return preprocessing.normalize(crops)


def evaluation_images(preprocessing: ImagePreprocessing = IMAGENET) -> np.ndarray:
    """All evaluation crops (disjoint from the calibration photos), float32 NCHW."""
    return preprocessing.normalize(_photo_crops(EVALUATION_PHOTOS, preprocessing.size))


def evaluation_image_names() -> list[str]:
    """One "photo/crop-index" label per row of :func:`evaluation_images`."""
    return [
        f"{name}/{kind}" for kind in range(CROPS_PER_PHOTO) for name in EVALUATION_PHOTOS
    ]
