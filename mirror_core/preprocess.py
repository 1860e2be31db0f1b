"""Evaluation preprocessing: the `official` policy, exactly.

Steps (per image): decode -> RGB -> if the short side exceeds 512, bicubic resize
so it is 512 -> torchvision-style centre crop 224 (zero padding, ties-to-even
offsets) -> optional "format alignment" (JPEG q96 round trip) -> uint8 HWC.

The exact path computes only what the crop keeps, with the same pixels: a JPEG is decoded
only over the rows and columns the crop reads (`jpeg_region`), and the resize is computed
for the crop window alone (`resample`).

uint8 arrays leave this module; the model divides by 255 itself, which is
exactly what the official ToTensor step computes.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, UnidentifiedImageError

from .config import PreprocessConfig
from .jpeg import jpeg_round_trip
from .jpeg_region import decode_region, region_decoder
from .resample import pillow_pass_order, resize_window, resized_window
from .sniff import not_an_image
from .uri import image_name

# PreprocessConfig.max_pixels, checked from the header, decides what is too large; Pillow's
# own warning above its default 89M pixels would only repeat it on the console, per image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# HEIF/HEIC (what phones save) through pillow-heif's Pillow plugin, so every decode path here
# reads it. libheif applies the container's rotation and mirroring as part of the image
# (unlike EXIF orientation, which is metadata and ignored, as official); HDR is cut to 8 bits.
pillow_heif.register_heif_opener()

# File name suffixes of the formats decoded here (AVIF: Pillow's own plugin), the folder and
# tar-member default.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "avif", "heic", "heif")
# Formats whose cut-short files decode to nothing: pillow-heif gives an all-black image where
# Pillow's truncation switch is on, so these are decoded with it off (a decode error instead).
ALL_OR_NOTHING_FORMATS = ("HEIF",)
# The official script aligns by file name: these suffixes (case-insensitive).
ALIGN_EXTENSIONS = (".png", ".bmp", ".tiff")
# ... and `by-format` uses the decoded container instead.
ALIGN_FORMATS = ("PNG", "BMP", "TIFF")
# Pillow's names for JPEG files (MPO: a camera's multi-picture JPEG; the first picture is
# the file's start, and the one decoded).
JPEG_FORMATS = ("JPEG", "MPO")


@dataclass
class Preprocessed:
    pixels: np.ndarray  # uint8 [crop, crop, 3]
    width: int  # of the decoded image, before any resize
    height: int
    format: str | None  # container format PIL detected (JPEG, PNG, ...)
    aligned: bool  # whether the JPEG q96 round trip was applied
    region_decoded: bool = False  # a JPEG decoded only where its crop reads (`jpeg_region`)


@contextmanager
def _truncated_images_allowed(allowed: bool = True):
    # Official evaluation decodes truncated files as far as they go. Pillow only
    # offers a module-level switch; scope it to our own decode calls.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = allowed
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


class ImageTooLargeError(ValueError):
    pass


def open_image(data: bytes) -> Image.Image:
    """`Image.open` of bytes (lazy: the header only); bytes that no decoder identifies raise
    Pillow's UnidentifiedImageError saying what they are instead (`sniff.not_an_image`)."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(not_an_image(data)) from None


def check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse an image whose header says it exceeds PreprocessConfig.max_pixels."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")


def decode_rgb(data: bytes, max_pixels: int | None = None, draft_short_side: int | None = None
               ) -> tuple[Image.Image, str | None, tuple[int, int]]:
    """Bytes -> (RGB image, detected format, original size). No EXIF rotation, as
    official; animated files give their first frame. With `draft_short_side`, a JPEG
    whose short side is at least twice that is decoded at a reduced DCT scale (libjpeg
    1/2, 1/4 or 1/8) that keeps the short side >= draft_short_side."""
    with _truncated_images_allowed():
        img = open_image(data)  # not closed: closing would discard the pixels we return
    w, h = img.size
    check_pixels(img.size, max_pixels)
    fmt = img.format
    with _truncated_images_allowed(fmt not in ALL_OR_NOTHING_FORMATS):
        if draft_short_side and fmt == "JPEG" and min(w, h) >= 2 * draft_short_side:
            scale = draft_short_side / min(w, h)
            img.draft("RGB", (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
        if img.mode == "RGB":
            img.load()  # decoded in place; convert() would copy every pixel once more
        else:
            img = img.convert("RGB")
    return img, fmt, (w, h)


def short_side_size(size: tuple[int, int], short_side: int) -> tuple[int, int] | None:
    """(w, h) after resizing so the short side equals `short_side`; None when the
    short side is already at most that (the official policy never upsamples)."""
    w, h = size
    short = min(w, h)
    if short <= short_side:
        return None
    new_w = short_side if w == short else int(round(w * short_side / short))
    new_h = short_side if h == short else int(round(h * short_side / short))
    return new_w, new_h


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """If min(w, h) > short_side, bicubic-resize so the short side equals it."""
    new_size = short_side_size(img.size, short_side)
    return img if new_size is None else img.resize(new_size, Image.BICUBIC)


def resized_center_crop(img: Image.Image, short_side: int, size: int) -> np.ndarray | None:
    """resize_short_side + center_crop in one bicubic resample of just the cropped box
    (fast mode): ~7x less resampling, within a few grey levels of the exact path (the
    two-pass filter rounds in between on a different grid). None when no resize is due."""
    new_size = short_side_size(img.size, short_side)
    if new_size is None or min(new_size) < size:
        return None
    (w, h), (new_w, new_h) = img.size, new_size
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box))


def crop_window(size: int, crop: int) -> tuple[int, int, int]:
    """One axis of torchvision's CenterCrop: (first kept index, kept length, zero padding
    before). Round-half-even offsets; a short axis is kept whole and padded, low side first."""
    if size >= crop:
        return int(round((size - crop) / 2)), crop, 0
    return 0, size, (crop - size) // 2


class CropPlan(NamedTuple):
    """A centre crop of an image, after an optional resize, as a window of the resized image."""

    new_size: tuple[int, int] | None  # (w, h) after the resize; None: no resize
    top: int  # the window: rows top..top+height-1, columns left..left+width-1 of the resized image
    height: int
    left: int
    width: int
    pads: tuple[tuple[int, int], tuple[int, int]]  # zeros (before, after) along rows, columns

    @property
    def padded(self) -> bool:
        return any(n for pair in self.pads for n in pair)


def crop_plan(size: tuple[int, int], new_size: tuple[int, int] | None, crop: int) -> CropPlan:
    """torchvision's CenterCrop(crop) of a (w, h) image resized to new_size (None: as is)."""
    w, h = new_size or size
    top, height, pad_top = crop_window(h, crop)
    left, width, pad_left = crop_window(w, crop)
    return CropPlan(new_size, top, height, left, width,
                    ((pad_top, crop - height - pad_top), (pad_left, crop - width - pad_left)))


def official_crop_plan(size: tuple[int, int], cfg: PreprocessConfig) -> CropPlan:
    """Where the policy's crop of a (w, h) image comes from (the CPU and GPU paths)."""
    return crop_plan(size, short_side_size(size, cfg.resize_short_side), cfg.crop_size)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision CenterCrop on HWC: zero-pad short sides, round-half-even offsets."""
    plan = crop_plan((arr.shape[1], arr.shape[0]), None, size)
    return padded(arr[plan.top : plan.top + plan.height, plan.left : plan.left + plan.width], plan)


def padded(window: np.ndarray, plan: CropPlan) -> np.ndarray:
    """A plan's window (HWC) -> the crop: zeros where the image is shorter than the crop."""
    return np.pad(window, (*plan.pads, (0, 0))) if plan.padded else window


class ImageRegions:
    """Rectangles of an image as uint8 RGB, with the pixels of Pillow's decode (truncated
    files as far as they go), made from encoded bytes (`of_bytes`) or from an image already
    decoded (`of_image`). Of bytes, a JPEG that the region decoder takes (`jpeg_region`) is
    decoded only over each rectangle asked for; anything else (other formats, CMYK, damaged
    data the region decoder declines) is decoded whole by Pillow, once."""

    def __init__(self, size: tuple[int, int], fmt: str | None, image: Image.Image | None = None,
                 data: bytes | None = None, jpeg_decoder=None):
        self.size, self.format = size, fmt
        self._image, self._data, self._jpeg_decoder = image, data, jpeg_decoder

    @classmethod
    def of_bytes(cls, data: bytes, max_pixels: int | None = None) -> ImageRegions:
        """Reads the header only (raising what decode_rgb raises for it, and ImageTooLargeError)."""
        with _truncated_images_allowed():
            header = open_image(data)
        check_pixels(header.size, max_pixels)
        by_region = header.format in JPEG_FORMATS and header.mode in ("RGB", "L")
        return cls(header.size, header.format, data=data, jpeg_decoder=region_decoder() if by_region else None)

    @classmethod
    def of_image(cls, img: Image.Image) -> ImageRegions:
        return cls(img.size, img.format, image=img if img.mode == "RGB" else img.convert("RGB"))

    @property
    def region_decoded(self) -> bool:
        """Whether every rectangle read so far came from the JPEG region decoder."""
        return self._jpeg_decoder is not None

    def whole(self) -> Image.Image:
        """The whole RGB image (decoded on first use; later rectangles are cut from it)."""
        if self._image is None:
            self._image, self._jpeg_decoder = decode_rgb(self._data)[0], None
        return self._image

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """uint8 [r1 - r0, c1 - c0, 3]: rows r0..r1-1 and columns c0..c1-1."""
        if self._jpeg_decoder is not None:
            arr = decode_region(self._data, rows, cols, self._jpeg_decoder)
            if arr is not None:
                return arr
        # declined (or not a JPEG): Pillow decodes it whole
        return np.asarray(self.whole().crop((cols[0], rows[0], cols[1], rows[1])))

    def crop(self, plan: CropPlan) -> np.ndarray:
        """A crop plan's window (of the image resized, where the plan resizes), zero-padded."""
        if plan.new_size is None:
            window = self.read((plan.top, plan.top + plan.height), (plan.left, plan.left + plan.width))
        else:
            window = self.resized_window(plan.new_size, plan.top, plan.left, plan.height, plan.width)
        return padded(window, plan)

    def resized_window(self, new_size: tuple[int, int], top: int, left: int, height: int, width: int) -> np.ndarray:
        """Rows top..top+height-1 and columns left..left+width-1 of Pillow's BICUBIC resize to
        new_size, exactly: resampled (`resample`) from just the rows and columns they read,
        unless this Pillow's resize is not reproduced (then Pillow resizes the whole image)."""
        if pillow_pass_order() is None:
            return np.asarray(self.whole().resize(new_size, Image.BICUBIC))[top : top + height, left : left + width]
        window = resize_window(self.size, new_size, top, left, height, width)
        return resized_window(self.read(window.rows, window.cols), window)


def official_crop(image: ImageRegions, cfg: PreprocessConfig) -> np.ndarray:
    """The policy's resize and centre crop, computing only the pixels the crop keeps (and, of a
    JPEG, decoding only the rows and columns they read): equal to
    center_crop(resize_short_side(img)) pixel for pixel, several times less work on photos."""
    return image.crop(official_crop_plan(image.size, cfg))


def wants_alignment(cfg: PreprocessConfig, name: str | None, fmt: str | None) -> bool:
    """by-extension: the official rule on the file name (no name -> no alignment; a web
    URL's query is no part of it); by-format: the decoded container; off: never."""
    if cfg.alignment == "by-extension":
        return name is not None and image_name(name).lower().endswith(ALIGN_EXTENSIONS)
    if cfg.alignment == "by-format":
        return fmt in ALIGN_FORMATS
    return False


def official_preprocess(
    data: bytes, cfg: PreprocessConfig, name: str | None = None, perturbation: str | None = None
) -> Preprocessed:
    """Encoded image bytes (+ its file name for by-extension alignment) -> model input.

    `perturbation` (robustness sweeps, e.g. 'jpeg:75') is applied to the decoded image
    before the policy; width/height stay those of the original."""
    if not cfg.fast_decode and not perturbation:
        image = ImageRegions.of_bytes(data, cfg.max_pixels)
        return _finish(official_crop(image, cfg), cfg, name, image.format, image.size, image.region_decoded)
    draft = cfg.resize_short_side if cfg.fast_decode else None
    img, fmt, size = decode_rgb(data, cfg.max_pixels, draft)
    if perturbation:
        from .perturb import apply_perturbation

        img = apply_perturbation(img, perturbation)
    return preprocess_rgb(img, cfg, name=name, fmt=fmt, size=size)


def preprocess_rgb(
    img: Image.Image, cfg: PreprocessConfig, name: str | None = None, fmt: str | None = None, size=None
) -> Preprocessed:
    """The policy applied to an already-decoded image."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    arr = resized_center_crop(img, cfg.resize_short_side, cfg.crop_size) if cfg.fast_decode else None
    if arr is None:
        arr = official_crop(ImageRegions.of_image(img), cfg)
    return _finish(arr, cfg, name, fmt, size or img.size)


def _finish(arr: np.ndarray, cfg: PreprocessConfig, name: str | None, fmt: str | None,
            size: tuple[int, int], region_decoded: bool = False) -> Preprocessed:
    """The crop -> the model input: format alignment where the policy asks for it."""
    width, height = size
    aligned = wants_alignment(cfg, name, fmt)
    if aligned:
        arr = jpeg_round_trip(np.ascontiguousarray(arr), cfg.jpeg_quality, optimize=True)
    return Preprocessed(np.ascontiguousarray(arr), width, height, fmt, aligned, region_decoded)


def read_bytes(path: str | Path) -> bytes:
    """Local path or fsspec URI -> bytes."""
    import fsspec

    with fsspec.open(str(path), "rb") as f:
        return f.read()
