"""Pillow's bicubic resize recomputed for a window of the output: bit-exact against Pillow,
in the C++ extension and numpy (the CPU decode path) and in torch (the GPU decode path,
run here on CPU)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mirror_core.gpu_decode import resized_windows
from mirror_core.resample import axis_taps, resize_window, resized_full, resized_window, vertical_first


def pillow_resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC))


def chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def cpu_window(arr: np.ndarray, new_size, top, left, height, width, native=True) -> np.ndarray:
    window = resize_window((arr.shape[1], arr.shape[0]), new_size, top, left, height, width)
    (r0, r1), (c0, c1) = window.rows, window.cols
    return resized_window(arr[r0:r1, c0:c1], window, native)


def numpy_window(arr: np.ndarray, *window) -> np.ndarray:
    return cpu_window(arr, *window, native=False)


def torch_window(arr: np.ndarray, new_size, top, left, height, width) -> np.ndarray:
    return resized_windows(chw(arr), new_size, top, left, height, width)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size,new_size", [((1920, 1080), (910, 512)), ((1080, 1920), (512, 910)),
                                           ((4000, 3000), (683, 512)), ((800, 800), (512, 512)),
                                           ((3000, 600), (2560, 512)), ((100, 100), (99, 100)),
                                           ((100, 100), (100, 37)), ((64, 48), (200, 150)),
                                           ((517, 2000), (512, 1981)), ((899, 1921), (512, 1094)),
                                           ((2489, 691), (2503, 374))])
def test_full_output_equals_pillow(size, new_size):
    """Downscales of every ratio, one axis only, an upscale, and sizes Pillow 13 resizes
    vertical pass first (the last three)."""
    arr = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    want = pillow_resize(arr, new_size)
    np.testing.assert_array_equal(resized_full(arr, new_size), want)
    np.testing.assert_array_equal(resized_full(arr, new_size, native=False), want)
    np.testing.assert_array_equal(torch_window(arr, new_size, 0, 0, new_size[1], new_size[0]), want)


def test_every_size_pair_of_a_small_image_equals_pillow():
    """The pass order rule on a grid of down- and upscales in both axes: each pair's pixels
    equal Pillow's (where the two orders differ, only the right one does)."""
    arr = np.random.default_rng(5).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    orders = set()
    for new_w in range(7, 90, 3):
        for new_h in range(5, 80, 3):
            np.testing.assert_array_equal(resized_full(arr, (new_w, new_h)), pillow_resize(arr, (new_w, new_h)),
                                          err_msg=str((new_w, new_h)))
            orders.add(vertical_first((60, 50), (new_w, new_h)))
    assert orders == {True, False} or not vertical_first((40, 40), (39, 20))  # both orders ran (Pillow 13+)


@pytest.mark.parametrize("window_of", [cpu_window, numpy_window, torch_window])
def test_a_window_equals_the_same_pixels_of_the_full_resize(window_of):
    for size, new_size, windows in [((1920, 1080), (910, 512), [(144, 343, 224, 224), (0, 0, 10, 910),
                                                                 (500, 900, 12, 10)]),
                                    ((899, 1921), (512, 1094), [(435, 144, 224, 224), (0, 500, 1094, 12)])]:
        arr = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        full = pillow_resize(arr, new_size)
        for top, left, h, w in windows:
            np.testing.assert_array_equal(window_of(arr, new_size, top, left, h, w),
                                          full[top : top + h, left : left + w], err_msg=str((size, top, left)))


def test_the_extension_is_built_and_equals_numpy_on_random_windows():
    """The C++ passes (Pillow's integer arithmetic) against the numpy ones (float64 products
    of the same integer weights) on random sizes, windows and both pass orders, upscales and
    one-axis resizes included."""
    from mirror_core import resample

    assert resample._native() is not None, "mirror_core._resample was not built: pip install -e . needs a C++ compiler"
    rng = np.random.default_rng(11)
    for _ in range(150):
        w, h, new_w, new_h = (int(v) for v in rng.integers(1, 400, 4))
        new_w, new_h = (w, new_h) if rng.random() < 0.1 else (new_w, new_h)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        top, left = int(rng.integers(0, new_h)), int(rng.integers(0, new_w))
        height, width = int(rng.integers(1, new_h - top + 1)), int(rng.integers(1, new_w - left + 1))
        for vertical_pass_first in (False, True):
            window = resample._window((w, h), (new_w, new_h), top, left, height, width, vertical_pass_first)
            (r0, r1), (c0, c1) = window.rows, window.cols
            region = arr[r0:r1, c0:c1]
            np.testing.assert_array_equal(resized_window(region, window), resized_window(region, window, native=False),
                                          err_msg=str((w, h, new_w, new_h, top, left, height, width)))


def test_window_taps_read_only_the_inputs_the_window_needs():
    taps = axis_taps(1920, 910, 343, 224)  # the centre crop's columns of a 1080p resize
    assert taps.weights.shape[0] == 224
    assert 720 < taps.first < 730 and taps.span < 224 * 1920 / 910 + 10
    # each output's weights sum to one in Pillow's fixed point (within rounding of its taps)
    assert np.all(np.abs(taps.weights.sum(axis=1) - (1 << 22)) <= taps.weights.shape[1])
    for outputs, inputs, weights in taps.bands:  # bands hold every nonzero weight
        assert np.array_equal(weights.T, taps.weights[outputs, inputs])
        assert not taps.weights[outputs, : inputs.start].any() and not taps.weights[outputs, inputs.stop :].any()


def test_the_probe_finds_this_pillows_pass_order_and_refuses_a_wrong_rule(monkeypatch):
    """The exact CPU path resamples windows only when the probe resizes are reproduced
    (here they must be: the pinned Pillow), and a rule one pixel off is caught."""
    from mirror_core import resample

    assert resample.pillow_pass_order() in resample.PASS_ORDERS
    resample.pillow_pass_order.cache_clear()
    monkeypatch.setattr(resample, "_by_size", lambda size, new: new[1] < size[1] and 2 * (size[0] - new[0]) <= size[1] - new[1])
    try:
        assert resample.pillow_pass_order() is None
    finally:
        resample.pillow_pass_order.cache_clear()


def test_without_a_reproduced_pillow_the_exact_path_lets_pillow_resize(monkeypatch):
    from mirror_core import preprocess
    from mirror_core.config import PreprocessConfig

    monkeypatch.setattr(preprocess, "pillow_pass_order", lambda: None)
    arr = np.random.default_rng(9).integers(0, 256, (1921, 899, 3), dtype=np.uint8)
    want = preprocess.center_crop(pillow_resize(arr, (512, 1094)), 224)
    cfg = PreprocessConfig(alignment="off")
    got = preprocess.official_crop(preprocess.ImageRegions.of_image(Image.fromarray(arr)), cfg)
    np.testing.assert_array_equal(got, want)
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    np.testing.assert_array_equal(preprocess.official_preprocess(png.getvalue(), cfg).pixels, want)
    Image.fromarray(arr).save(jpeg, "JPEG")  # decoded whole too: its crop needs Pillow's whole resize
    pre = preprocess.official_preprocess(jpeg.getvalue(), cfg)
    decoded = np.asarray(Image.open(jpeg).convert("RGB"))
    np.testing.assert_array_equal(pre.pixels, preprocess.center_crop(pillow_resize(decoded, (512, 1094)), 224))
    assert not pre.region_decoded
