import io

import numpy as np
import pytest
from PIL import Image

from mirror_core.config import PreprocessConfig
from mirror_core.preprocess import center_crop, official_preprocess, resize_short_side, wants_alignment

# what a repository cloned without its large files holds in place of each
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5"
               b"e2ca24d17e2393\nsize 12345\n")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def column_image(h, w):
    """Pixel value = column index (mod 256) in R, row index in G: offsets are visible."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w)[None, :] % 256
    arr[..., 1] = np.arange(h)[:, None] % 256
    arr[..., 2] = 200
    return arr


def test_smaller_than_crop_is_zero_padded_centered():
    arr = column_image(100, 301)  # pad rows: 62 top, 62 bottom; columns: crop offset round(38.5)=38
    out = center_crop(arr, 224)
    assert out.shape == (224, 224, 3)
    assert (out[:62] == 0).all() and (out[162:] == 0).all()
    assert out[62, 0, 0] == 38 and out[62, 0, 1] == 0 and out[161, 0, 1] == 99


def test_odd_padding_puts_the_extra_pixel_bottom_right():
    out = center_crop(np.full((223, 221, 3), 255, np.uint8), 224)
    assert (out[:223, 1:222] == 255).all()
    assert (out[223] == 0).all()  # rows: 0 on top, 1 at the bottom
    assert (out[:, :1] == 0).all() and (out[:, 222:] == 0).all()  # columns: 1 left, 2 right


@pytest.mark.parametrize("w, left", [(225, 0), (227, 2), (226, 1), (229, 2)])
def test_crop_offsets_round_half_to_even(w, left):
    out = center_crop(column_image(224, w), 224)
    assert out[0, 0, 0] == left  # round(0.5)=0, round(1.5)=2, round(2.5)=2


def test_resize_only_above_512_and_rounds_long_side():
    img = Image.new("RGB", (700, 513))
    assert resize_short_side(img, 512).size == (699, 512)  # 700*512/513 = 698.6 -> 699
    assert resize_short_side(Image.new("RGB", (512, 900)), 512).size == (512, 900)
    assert resize_short_side(Image.new("RGB", (1001, 2000)), 512).size == (512, 1023)  # 1022.98 -> 1023


def test_resize_uses_pil_bicubic():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (600, 800, 3), np.uint8))
    expected = np.asarray(img.resize((683, 512), Image.BICUBIC))
    cfg = PreprocessConfig(alignment="off")
    got = official_preprocess(encode(img, "PNG"), cfg, name="x.png").pixels
    np.testing.assert_array_equal(got, center_crop(expected, 224))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_modes_convert_like_pil(mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (240, 260, 3), np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65535, (240, 260), np.uint16))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    data = encode(img, fmt)
    out = official_preprocess(data, PreprocessConfig(alignment="off"))
    expected = center_crop(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 224)
    np.testing.assert_array_equal(out.pixels, expected)
    assert (out.width, out.height, out.format) == (260, 240, fmt)


def test_alignment_modes():
    by_ext, by_fmt, off = (PreprocessConfig(alignment=a) for a in ("by-extension", "by-format", "off"))
    assert wants_alignment(by_ext, "a/B.PNG", "JPEG")  # the official rule trusts the name
    assert wants_alignment(by_ext, "x.TiFF", None) and wants_alignment(by_ext, "x.bmp", None)
    assert not wants_alignment(by_ext, "x.tif", "TIFF")  # official list has .tiff only
    assert not wants_alignment(by_ext, "x.jpg", "PNG") and not wants_alignment(by_ext, None, "PNG")
    assert wants_alignment(by_fmt, "x.jpg", "PNG") and not wants_alignment(by_fmt, "x.png", "JPEG")
    assert not wants_alignment(off, "x.png", "PNG")


def test_alignment_is_a_jpeg_q96_round_trip():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), np.uint8))
    data = encode(img, "PNG")
    aligned = official_preprocess(data, PreprocessConfig(), name="x.PNG")
    plain = official_preprocess(data, PreprocessConfig(), name="x.webp")
    assert aligned.aligned and not plain.aligned
    np.testing.assert_array_equal(plain.pixels, np.asarray(img))
    expected = np.asarray(Image.open(io.BytesIO(encode(img, "JPEG", quality=96, optimize=True))))
    np.testing.assert_array_equal(aligned.pixels, expected)


def test_truncated_jpeg_decodes_as_far_as_it_goes():
    img = Image.fromarray(np.full((300, 300, 3), 128, np.uint8))
    data = encode(img, "JPEG", quality=90)
    out = official_preprocess(data[: len(data) * 2 // 3], PreprocessConfig())
    assert out.pixels.shape == (224, 224, 3)


def test_unknown_policy_and_alignment_are_errors():
    with pytest.raises(ValueError, match="alignment"):
        PreprocessConfig(alignment="sometimes")
    with pytest.raises(ValueError, match="policy"):
        PreprocessConfig(policy="fancy")


def test_fast_decode_is_opt_in_reduced_scale_and_close():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (270, 480, 3), np.uint8)
    img = Image.fromarray(base).resize((1920, 1080), Image.BICUBIC)
    data = encode(img, "JPEG", quality=92)
    exact = official_preprocess(data, PreprocessConfig(alignment="off"))
    fast_cfg = PreprocessConfig(alignment="off", fast_decode=True)
    fast = official_preprocess(data, fast_cfg)
    assert fast_cfg.name == "official/align=off/fast-decode" and PreprocessConfig().fast_decode is False
    assert (fast.width, fast.height) == (exact.width, exact.height) == (1920, 1080)
    assert not np.array_equal(fast.pixels, exact.pixels)
    assert np.abs(fast.pixels.astype(int) - exact.pixels.astype(int)).mean() < 6
    small = encode(Image.fromarray(base), "JPEG")  # short side 270 < 2 x 512: untouched
    np.testing.assert_array_equal(official_preprocess(small, fast_cfg).pixels,
                                  official_preprocess(small, PreprocessConfig(alignment="off")).pixels)


def test_fast_mode_resamples_only_the_crop_box():
    from mirror_core.preprocess import center_crop, resize_short_side, resized_center_crop

    rng = np.random.default_rng(6)
    for size in ((1920, 1080), (700, 1333), (513, 600), (600, 600)):
        img = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), np.uint8)).resize(size, Image.BICUBIC)
        exact = center_crop(np.asarray(resize_short_side(img, 512)), 224)
        fast = resized_center_crop(img, 512, 224)
        assert fast.shape == exact.shape == (224, 224, 3)
        assert np.abs(fast.astype(int) - exact.astype(int)).max() <= 4  # same box, other rounding grid
    assert resized_center_crop(Image.new("RGB", (500, 375)), 512, 224) is None  # nothing to resize


def test_exact_path_resamples_only_the_crop_and_equals_pillow_resize_then_crop():
    """The exact path computes only the crop's pixels of the short-side resize; they equal
    Pillow's full resize then the centre crop on every size tried: photo sizes in both
    orientations, random ones, just above the resize threshold, none due, padded."""
    from mirror_core.preprocess import ImageRegions, official_crop

    rng = np.random.default_rng(7)
    sizes = [(1920, 1080), (1080, 1920), (4032, 3024), (3024, 4032), (1280, 720), (513, 513), (512, 900),
             (300, 200), (2000, 517), (517, 2000), (899, 1921), (1001, 2000)]
    sizes += [tuple(int(v) for v in rng.integers(200, 2600, 2)) for _ in range(24)]
    for crop, short in ((224, 512), (600, 512)):  # the second: the crop is padded after the resize
        cfg = PreprocessConfig(alignment="off", crop_size=crop, resize_short_side=short)
        for w, h in sizes:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
            want = center_crop(np.asarray(resize_short_side(img, short)), crop)
            np.testing.assert_array_equal(official_crop(ImageRegions.of_image(img), cfg), want, err_msg=str((w, h, crop)))


def test_bytes_that_are_no_image_say_what_they_are():
    """An error row names what came instead of an image: a web link's HTML page, an
    archive to scan as the input, a video; else that no decoder identifies them."""
    import io
    import tarfile
    import zipfile

    from PIL import UnidentifiedImageError

    from mirror_core.preprocess import decode_rgb

    zipped, tarred = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a.txt", "a")
    with tarfile.open(fileobj=tarred, mode="w") as archive:
        archive.addfile(tarfile.TarInfo("a.txt"), io.BytesIO(b""))
    cases = {b"  <!DOCTYPE HTML><html><body>404</body></html>": "an HTML page (a web link that answers with a page?)",
             zipped.getvalue(): "a zip archive (scan it as the input: `mirror scan --input FILE.zip`)",
             tarred.getvalue(): "a tar archive (scan it as the input: `mirror scan --input FILE.tar`)",
             b"%PDF-1.7\n...": "a PDF document", b"\x00\x00\x00\x20ftypmp42" + bytes(20): "a video (MP4 / QuickTime)",
             b'{"error": "not found"}': "JSON text", b"Access denied\n": "text",
             LFS_POINTER: "a Git LFS pointer: the file's content was never downloaded (run `git lfs pull` in its "
                          "repository)"}
    for data, what in cases.items():
        with pytest.raises(UnidentifiedImageError) as err:
            decode_rgb(data)
        assert str(err.value) == f"not an image: {what} ({len(data):,} bytes, starting {data[:16]!r})"
    with pytest.raises(UnidentifiedImageError, match=r"^not an image any installed decoder identifies \(256 bytes"):
        decode_rgb(bytes(range(256)))
