"""The JPEG region decoder: the exact path decodes only the rows and columns its crop reads,
with the pixels of Pillow's whole decode; anything it declines goes the whole-decode way."""
import io
import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirror_core import jpeg_region, preprocess
from mirror_core.config import PreprocessConfig
from mirror_core.preprocess import center_crop, official_preprocess, resize_short_side

HEADER_DIRS = [sysconfig.get_path("include"), "/usr/include", "/usr/local/include"]
HAS_LIBJPEG_HEADERS = any((Path(d) / "jpeglib.h").exists() for d in HEADER_DIRS if d)
native = pytest.mark.skipif(not HAS_LIBJPEG_HEADERS, reason="libjpeg headers absent: the extension is not built")


def photo(w, h, seed=0):
    """Gradients plus noise: every 8x8 block has detail, chroma varies across iMCUs."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) % 256], axis=-1)
    return np.clip(base + np.random.default_rng(seed).normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(arr, mode="RGB", **options):
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=options.pop("quality", 90), **options)
    return buf.getvalue()


ENCODINGS = [dict(subsampling=2), dict(subsampling=1), dict(subsampling=0), dict(progressive=True),
             dict(mode="L"), dict(subsampling=2, quality=40), dict(restart_marker_blocks=5)]


def with_luma_sampling(data: bytes, factors: int) -> bytes:
    """The file with its luma sampling factors (h << 4 | v) replaced in the frame header: with
    the same blocks per MCU and as many MCUs (a square image, sides a multiple of 32) the data
    still decodes, as 4:4:0 (h1v2, from 4:2:2), 4:1:1 (h4v1, from 4:2:0) or h1v4. Pillow
    writes none of these; cameras and lossless rotations do."""
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    assert sof > 0
    edited = bytearray(data)
    edited[sof + 11] = factors  # marker, length, precision, height, width, components, first id
    return bytes(edited)


def pillow_whole(data, cfg):
    """The exact path as Pillow alone computes it: decode everything, resize, crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return center_crop(np.asarray(resize_short_side(img, cfg.resize_short_side)), cfg.crop_size)


def test_the_extension_is_built_wherever_libjpeg_headers_are():
    """Built at install next to the read-out; the test can only pass without it on a machine
    that has no libjpeg headers (then the exact path decodes whole JPEGs, still exact)."""
    assert (jpeg_region._native() is not None) or not HAS_LIBJPEG_HEADERS
    assert (jpeg_region.region_decoder() is not None) or not HAS_LIBJPEG_HEADERS


@native
def test_rectangles_equal_pillows_whole_decode():
    """Random rectangles (edges included) of every subsampling, progressive, greyscale,
    on sizes that are and are not multiples of the iMCU."""
    rng = np.random.default_rng(1)
    for w, h in ((61, 45), (640, 480), (517, 300), (33, 17)):
        arr = photo(w, h)
        for options in ENCODINGS:
            data = jpeg(arr, **dict(options))
            whole = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            rects = [((0, h), (0, w)), ((h - 1, h), (w - 1, w))]
            for _ in range(12):
                r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
                rects.append(((r0, int(rng.integers(r0 + 1, h + 1))), (c0, int(rng.integers(c0 + 1, w + 1)))))
            for rows, cols in rects:
                got = jpeg_region.decode_region(data, rows, cols)
                np.testing.assert_array_equal(got, whole[rows[0] : rows[1], cols[0] : cols[1]],
                                              err_msg=str((w, h, options, rows, cols)))


@native
def test_rarer_chroma_samplings_equal_pillows_whole_decode():
    rng = np.random.default_rng(2)
    arr = photo(320, 320)
    for subsampling, factors in ((1, 0x12), (2, 0x41), (2, 0x14)):
        for progressive in (False, True):
            data = with_luma_sampling(jpeg(arr, subsampling=subsampling, progressive=progressive), factors)
            whole = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            for _ in range(10):
                r0, c0 = (int(v) for v in rng.integers(0, 320, 2))
                rows, cols = (r0, int(rng.integers(r0 + 1, 321))), (c0, int(rng.integers(c0 + 1, 321)))
                np.testing.assert_array_equal(jpeg_region.decode_region(data, rows, cols),
                                              whole[rows[0] : rows[1], cols[0] : cols[1]],
                                              err_msg=str((hex(factors), progressive, rows, cols)))


@native
def test_exact_path_decodes_jpegs_by_region_with_the_whole_decodes_pixels(monkeypatch):
    """official_preprocess takes the region path for JPEGs (counted) and its crops equal
    Pillow's decode + resize + crop on photo sizes both ways round, no resize due, padded."""
    calls = []
    decode = jpeg_region.decode_region
    monkeypatch.setattr(preprocess, "decode_region", lambda *a: calls.append(a[1:3]) or decode(*a))
    cfg = PreprocessConfig(alignment="off")
    sizes = [(1920, 1080), (1080, 1920), (899, 1921), (1001, 700), (513, 600), (400, 300), (224, 300), (150, 90)]
    for i, (w, h) in enumerate(sizes):
        for options in (ENCODINGS[0], ENCODINGS[3], ENCODINGS[4]):
            data = jpeg(photo(w, h, seed=i), **dict(options))
            pre = official_preprocess(data, cfg)
            np.testing.assert_array_equal(pre.pixels, pillow_whole(data, cfg), err_msg=str((w, h, options)))
            assert (pre.width, pre.height, pre.format, pre.aligned) == (w, h, "JPEG", False)
            assert pre.pixels.flags.writeable  # torch.from_numpy warns on read-only arrays
    assert len(calls) == 3 * len(sizes)
    rows, cols = calls[0]  # 1920x1080 -> 910x512, crop 224: about a quarter of the columns, half the rows
    assert (rows[1] - rows[0]) < 0.5 * 1080 and (cols[1] - cols[0]) < 0.3 * 1920


@native
def test_alignment_and_mpo_follow_the_whole_decode_path():
    """By-extension alignment applies to the region path's crop alike; a camera MPO (format
    recorded as MPO) decodes its first picture, as Pillow does."""
    arr = photo(700, 600)
    data = jpeg(arr)
    for name in ("a.png", "a.jpg"):
        cfg = PreprocessConfig()
        region = official_preprocess(data, cfg, name=name)
        img, fmt, size = preprocess.decode_rgb(data, cfg.max_pixels)
        whole = preprocess.preprocess_rgb(img, cfg, name=name, fmt=fmt, size=size)
        np.testing.assert_array_equal(region.pixels, whole.pixels)
        assert region.aligned == whole.aligned == (name == "a.png")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(255 - arr)])
    mpo = buf.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    pre = official_preprocess(mpo, PreprocessConfig(alignment="off"))
    assert pre.region_decoded and pre.format == "MPO"
    np.testing.assert_array_equal(pre.pixels, pillow_whole(mpo, PreprocessConfig()))


@native
def test_declined_files_take_the_whole_decode_path():
    """CMYK, a truncated file, garbage after the JPEG marker: the region path declines and the
    exact path gives what Pillow's whole decode gives (pixels or the same error)."""
    cfg = PreprocessConfig(alignment="off")
    arr = photo(800, 600)
    cmyk = jpeg(arr, mode="CMYK")
    truncated = jpeg(arr)[:30_000]
    for data in (cmyk, truncated):
        pre = official_preprocess(data, cfg)
        assert not pre.region_decoded
        img, fmt, size = preprocess.decode_rgb(data, cfg.max_pixels)
        np.testing.assert_array_equal(pre.pixels, preprocess.preprocess_rgb(img, cfg, fmt=fmt, size=size).pixels)
    garbage = b"\xff\xd8" + b"\x00" * 100
    with pytest.raises(Exception) as region_error:
        official_preprocess(garbage, cfg)
    with pytest.raises(Exception) as whole_error:
        preprocess.decode_rgb(garbage, cfg.max_pixels)
    assert type(region_error.value) is type(whole_error.value)  # the message names a BytesIO by its address
    assert str(region_error.value).split(" <")[0] == str(whole_error.value).split(" <")[0]
    with pytest.raises(preprocess.ImageTooLargeError, match="800x600 = 480,000 pixels exceeds the limit of 1,000"):
        official_preprocess(jpeg(arr), PreprocessConfig(max_pixels=1000))


@native
def test_damage_below_the_crop_gives_the_whole_decodes_pixels():
    """Bytes overwritten in the last fifth of a file: the region decoder stops above them and
    never sees them; Pillow decodes the whole file (its rows above the damage are the same),
    so the crops agree."""
    cfg = PreprocessConfig(alignment="off")
    data = jpeg(photo(1200, 1000))
    rng = np.random.default_rng(4)
    for trial in range(6):
        damaged = bytearray(data)
        at = int(len(data) * 0.85) + 97 * trial
        damaged[at : at + 40] = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
        damaged = bytes(damaged)
        pre = official_preprocess(damaged, cfg)
        assert pre.region_decoded  # the region decoder never reached the damage
        np.testing.assert_array_equal(pre.pixels, pillow_whole(damaged, cfg))


@native
def test_a_decoder_that_disagrees_with_pillow_is_not_used(monkeypatch, caplog):
    """The start-up probe: a libjpeg whose pixels differ from Pillow's by one grey level in one
    probe file is caught, and the exact path then decodes whole JPEGs (still exact)."""
    real = jpeg_region._native()

    class OffByOne:
        def __init__(self):
            self.calls = 0

        def decode_region(self, data, *rect):
            self.calls += 1
            got = real.decode_region(data, *rect)
            if self.calls == len(jpeg_region.PROBE_OPTIONS):  # only the last probe file differs
                pixels, first_row, first_col, _, n_cols = got
                pixels = bytearray(pixels)
                (y0, _), (x0, _) = jpeg_region.PROBE_RECT  # the first pixel the caller keeps
                pixels[3 * ((y0 - first_row) * n_cols + x0 - first_col)] ^= 1
                got = (pixels, *got[1:])
            return got

        def library_version(self):
            return real.library_version()

    assert jpeg_region.agrees_with_pillow(real)
    monkeypatch.setattr(jpeg_region, "_native", OffByOne)
    jpeg_region.region_decoder.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mirror_core.jpeg_region"):
            assert jpeg_region.region_decoder() is None
        assert "decodes differently from Pillow" in caplog.text
        data = jpeg(photo(900, 700))
        pre = official_preprocess(data, PreprocessConfig(alignment="off"))
        assert not pre.region_decoded
        np.testing.assert_array_equal(pre.pixels, pillow_whole(data, PreprocessConfig()))
    finally:
        jpeg_region.region_decoder.cache_clear()


def mutated(data: bytes, rng) -> bytes:
    """A damaged copy: a few bytes flipped anywhere, cut short, a header byte changed, or a
    run of random bytes overwritten."""
    out = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:
        for at in rng.integers(2, len(out), int(rng.integers(1, 8))):
            out[at] = int(rng.integers(0, 256))
    elif kind == 1:
        out = out[: int(rng.integers(2, len(out)))]
    elif kind == 2:
        out[int(rng.integers(2, min(len(out), 700)))] = int(rng.integers(0, 256))
    else:
        at, n = int(rng.integers(2, len(out))), int(rng.integers(1, 200))
        out[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(out)


@native
def test_damaged_files_are_declined_or_decoded_as_pillow_decodes_them():
    """Untrusted input: 600 damaged files (every encoding above, random rectangles). The region
    decoder either declines (the whole decode then defines the result) or returns exactly the
    rectangle of Pillow's whole decode (truncated files loaded as far as they go, as the
    official script loads them); it never crashes."""
    rng = np.random.default_rng(11)
    decoder = jpeg_region.region_decoder()
    outcomes = {"declined": 0, "decoded": 0}
    with preprocess._truncated_images_allowed():
        for trial in range(600):
            w, h = (int(v) for v in rng.integers(16, 400, 2))
            options = dict(ENCODINGS[trial % len(ENCODINGS)])
            data = mutated(jpeg(photo(w, h, seed=trial), options.pop("mode", "RGB"), **options), rng)
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            rows, cols = (y0, int(rng.integers(y0 + 1, h + 1))), (x0, int(rng.integers(x0 + 1, w + 1)))
            got = jpeg_region.decode_region(data, rows, cols, decoder)
            if got is None:
                outcomes["declined"] += 1
                continue
            want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            np.testing.assert_array_equal(got, want[rows[0] : rows[1], cols[0] : cols[1]], err_msg=f"file {trial}")
            outcomes["decoded"] += 1
    assert min(outcomes.values()) > 100, outcomes  # both outcomes are exercised
