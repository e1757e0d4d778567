"""The working grid: one µm/px range everywhere, the working shape rule, the resamplers, the slide level."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sgdc import grid
from napari_sgdc.config import ModelConfig
from napari_sgdc.model import tiny_config

INSIDE = (0.0101, 0.25, 99.9)
OUTSIDE = (0.01, 100, 0.0, -1.0, 1e9, True, "0.25", float("nan"))


@pytest.mark.parametrize("value", INSIDE)
def test_mpp_inside_the_range_is_accepted_everywhere(value, tmp_path):
    from _slides import synthetic_rgb, write_slide
    from napari_sgdc.slide import open_slide

    assert grid.check_mpp(value) == float(value) and grid.mpp_in_range(value)
    assert ModelConfig(encoder="mini", pretrained=False, mpp=value).mpp == value
    grid.check_image_mpp(value, tiny_config(mpp=0.25))
    path = write_slide(tmp_path / "s.ome.tif", synthetic_rgb((256, 256), n_nuclei=4), levels=1)
    with open_slide(path, mpp=value) as slide:
        assert slide.mpp == value


@pytest.mark.parametrize("value", OUTSIDE)
def test_mpp_outside_the_range_is_refused_everywhere_with_one_message(value, tmp_path):
    from _slides import synthetic_rgb, write_slide
    from napari_sgdc.slide import SlideError, open_slide

    expected = "must be a number of µm per pixel in (0.01, 100)"
    assert not grid.mpp_in_range(value)
    checks = [lambda: grid.check_mpp(value), lambda: grid.check_image_mpp(value, tiny_config(mpp=0.25))]
    if value != 0:  # a model's 0 means unknown
        checks.append(lambda: ModelConfig(encoder="mini", pretrained=False, mpp=value))
    for check in checks:
        with pytest.raises(ValueError) as error:
            check()
        assert expected in str(error.value) and "\n" not in str(error.value)
    path = write_slide(tmp_path / "s.ome.tif", synthetic_rgb((256, 256), n_nuclei=4), levels=1)
    if not isinstance(value, (bool, str)) and value == value:  # open_slide takes numbers
        with pytest.raises(SlideError, match=r"must be a number of µm per pixel in \(0.01, 100\)"):
            open_slide(path, mpp=value)


def test_model_mpp_zero_means_unknown():
    assert ModelConfig(encoder="mini", pretrained=False, mpp=0).mpp == 0.0


def test_layer_mpp_uses_the_same_range():
    pytest.importorskip("napari")
    from napari.layers import Image

    from napari_sgdc._napari._layers import layer_mpp

    data = np.zeros((8, 8))
    assert layer_mpp(Image(data, scale=(0.02, 0.02), units="µm")) == pytest.approx(0.02)
    assert layer_mpp(Image(data, scale=(60.0, 60.0), units="µm")) == pytest.approx(60.0)  # > the old 50 limit
    assert layer_mpp(Image(data, scale=(0.005, 0.005), units="µm")) is None
    assert layer_mpp(Image(data, scale=(150.0, 150.0), units="µm")) is None


def test_working_shape_ceil_exact_products_and_tolerance():
    config = tiny_config(mpp=0.25)
    assert grid.working_shape(60, 80, config, 0.5) == (120, 160)
    assert grid.working_shape(60, 80, config, 0.3) == (72, 96)  # 60 · 1.2 = 72.00000000000001: still 72
    assert grid.working_shape(61, 80, config, 0.125) == (31, 40)  # 30.5 → 31: the grid covers every pixel
    assert grid.working_shape(1000, 800, config, 0.251) == (1000, 800)  # within 0.5 %: not resampled
    assert grid.working_shape(1000, 800, config, 0.252) == (1008, 807)
    assert grid.working_shape(60, 80, config, None) == (60, 80)
    assert grid.working_shape(300, 600, tiny_config(resize_long_side=64), None) == (32, 64)
    assert grid.scaled_length(1, 0.01) == 1


def _pattern(n: int, pixel: float) -> np.ndarray:
    """Area-sampled 2-D sinusoid (period 37 source px) on a grid of `pixel`-sized pixels, in [0.2, 0.8]."""
    k = 1 / 37.0
    c = (np.arange(n) + 0.5) * pixel
    gain = np.sinc(k * pixel) ** 2
    return 0.5 + 0.3 * gain * np.cos(2 * np.pi * k * c)[:, None] * np.cos(2 * np.pi * k * c)[None, :]


@pytest.mark.parametrize("size", [100, 400, 206])
def test_resamplers_keep_shape_dtype_and_a_known_pattern(size):
    source = _pattern(200, 1.0)
    truth = _pattern(size, 200 / size)
    rgb = np.repeat(np.round(source * 255).astype(np.uint8)[..., None], 3, axis=-1)
    image = grid.resample_image(rgb, (size, size))
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert np.sqrt(np.mean((image[2:-2, 2:-2, 1] - truth[2:-2, 2:-2] * 255) ** 2)) < 1.5  # uint8 levels
    maps = grid.resample_maps(np.stack([source, 1 - source]).astype(np.float32), (size, size))
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert np.abs(maps[0, 2:-2, 2:-2] - truth[2:-2, 2:-2]).max() < 0.01
    np.testing.assert_allclose(maps[0] + maps[1], 1.0, atol=1e-5)


def test_map_halving_is_the_exact_2x2_mean_and_strong_shrinking_does_not_alias():
    rng = np.random.default_rng(0)
    maps = rng.random((1, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(grid.resample_maps(maps, (32, 32))[0], maps[0].reshape(32, 2, 32, 2).mean(axis=(1, 3)),
                               atol=1e-6)
    stripes = np.tile(np.array([0.0, 1.0], np.float32), 150)[None, None, :].repeat(300, axis=1)  # period 2 px
    shrunk = grid.resample_maps(stripes, (300, 100))[0]  # 3 source px per pixel: mean 1/3 or 2/3, never 0 or 1
    assert shrunk.shape == (300, 100) and 0.2 < shrunk[5:-5, 5:-5].min() and shrunk[5:-5, 5:-5].max() < 0.8


@pytest.mark.parametrize("factor", [0.5, 1.6, 2.0])
def test_window_resampler_is_the_image_filter_at_an_offset(factor):
    rng = np.random.default_rng(1)
    source = np.round(255 * np.clip(_pattern(240, 1.0)[..., None] + 0.05 * rng.standard_normal((240, 240, 3)), 0, 1))
    source = source.astype(np.uint8)

    def read(r0, c0, rows, cols):
        padded = np.pad(source, ((400, 400), (400, 400), (0, 0)), mode="edge")
        return padded[r0 + 400:r0 + 400 + rows, c0 + 400:c0 + 400 + cols]

    size = int(round(240 / factor))
    whole = grid.resample_image(source, (size, size))
    window = grid.resample_window(read, 240 / size, 7, 11, size // 2, size // 3)
    inner = np.abs(window[3:-3, 3:-3].astype(int) - whole[7:7 + size // 2, 11:11 + size // 3][3:-3, 3:-3]).max()
    assert window.shape == (size // 2, size // 3, 3) and inner <= 1
    np.testing.assert_array_equal(grid.resample_window(read, 1.003, 5, 6, 20, 30), source[5:25, 6:36])


def test_slide_level_choice_and_factor():
    mpps = [0.25, 0.5, 1.0, 2.0]
    assert grid.choose_level(mpps, 0.5) == 1 and grid.choose_level(mpps, 0.25) == 0
    assert grid.choose_level(mpps, 0.3) == 0 and grid.choose_level(mpps, 0.9) == 1
    assert grid.choose_level(mpps, 0.491) == 1  # level 1's pixels are 1.8 % larger than wanted: still chosen
    assert grid.choose_level(mpps, 0.489) == 0  # 2.2 % larger: the finer level
    assert grid.choose_level([None, None], 0.25) == 0 and grid.choose_level(mpps, 0) == 0
    assert grid.level_factor(0.5, 0.501) == 1.0 and grid.level_factor(0.5, 1.0) == 2.0
