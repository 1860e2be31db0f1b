"""Pillow's bicubic resize recomputed for a window of the output: bit-exact against Pillow."""
import numpy as np
import pytest
import torch
from PIL import Image

from mirror_core.resample import axis_taps, resized_windows


def pillow_resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC))


def chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@pytest.mark.parametrize("size,new_size", [((1920, 1080), (910, 512)), ((1080, 1920), (512, 910)),
                                           ((4000, 3000), (683, 512)), ((800, 800), (512, 512)),
                                           ((3000, 600), (2560, 512)), ((100, 100), (99, 100)),
                                           ((100, 100), (100, 37)), ((64, 48), (200, 150))])
def test_full_output_equals_pillow(size, new_size):
    """Downscales of every ratio, one axis only, and an upscale."""
    arr = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    got = resized_windows(chw(arr), new_size, 0, 0, new_size[1], new_size[0])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, pillow_resize(arr, new_size))


def test_a_window_equals_the_same_pixels_of_the_full_resize():
    arr = np.random.default_rng(3).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    full = pillow_resize(arr, (910, 512))
    for top, left, h, w in [(144, 343, 224, 224), (0, 0, 10, 910), (500, 900, 12, 10)]:
        got = resized_windows(chw(arr), (910, 512), top, left, h, w)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, full[top : top + h, left : left + w])


def test_window_taps_read_only_the_inputs_the_window_needs():
    taps = axis_taps(1920, 910, 343, 224)  # the centre crop's columns of a 1080p resize
    assert taps.weights.shape[0] == 224
    assert 720 < taps.first < 730 and taps.span < 224 * 1920 / 910 + 10
    # each output's weights sum to one in Pillow's fixed point (within rounding of its taps)
    assert np.all(np.abs(taps.weights.sum(axis=1) - (1 << 22)) <= taps.weights.shape[1])
