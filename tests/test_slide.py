"""Slide: both backends, lazy levels, mpp, bad inputs (one line naming the file), tissue detection."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from _slides import synthetic_rgb, write_slide
from napari_sgdc.slide import SlideError, detect_tissue, is_slide, open_slide


@pytest.fixture(scope="module")
def rgb():
    return synthetic_rgb((640, 768), n_nuclei=60)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, rgb):
    folder = tmp_path_factory.mktemp("slides")
    return {"ome": write_slide(folder / "s.ome.tif", rgb), "generic": write_slide(folder / "g.tif", rgb, ome=False)}


@pytest.mark.parametrize("kind, backend", [("ome", "tifffile"), ("generic", "tifffile"), ("generic", "openslide")])
def test_levels_pixels_and_mpp(slides, rgb, kind, backend):
    with open_slide(slides[kind], backend=backend) as slide:
        assert slide.backend == backend
        assert slide.level_shapes == [(640, 768), (320, 384), (160, 192)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(100, 50, 300, 200), rgb[50:250, 100:400])
        np.testing.assert_array_equal(slide.read_region(200, 100, 50, 40, level=1), rgb[::2, ::2][50:90, 100:150])
        outside = slide.read_region(700, 600, 100, 100)  # white beyond the slide
        assert (outside[40:, 68:] == 255).all() and np.array_equal(outside[:40, :68], rgb[600:, 700:])
        lazy = slide.level_array(1)
        assert type(lazy).__name__ == "Array" and lazy.shape == (320, 384, 3)
        np.testing.assert_array_equal(np.asarray(lazy), rgb[::2, ::2])
        assert slide.best_level(0.5) == 1 and slide.best_level(0.25) == 0 and slide.best_level(0.3) == 0


def test_openslide_and_tifffile_read_identical_pixels(slides):
    with open_slide(slides["generic"], backend="openslide") as a, open_slide(slides["generic"], backend="tifffile") as b:
        for level in range(3):
            h, w = a.level_shapes[level]
            d = int(a.level_downsamples[level])
            np.testing.assert_array_equal(a.read_region(0, 0, w, h, level), b.read_region(0, 0, w, h, level))
            np.testing.assert_array_equal(a.read_region(37 * d, 11 * d, 99, 57, level),
                                          b.read_region(37 * d, 11 * d, 99, 57, level))


def _one_line_naming(error, path):
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


def test_bad_inputs_one_line_naming_the_file(tmp_path, slides, rgb):
    truncated = tmp_path / "cut.ome.tif"
    data = slides["ome"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "junk.svs"
    corrupt.write_bytes(b"not a slide at all" * 100)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, rgb[:100, :100])
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG")
    for path in (truncated, corrupt, plain, png, tmp_path / "missing.svs"):
        with pytest.raises(SlideError) as error:
            open_slide(path)
        _one_line_naming(error, path)
    assert not is_slide(plain) and is_slide(slides["ome"]) and is_slide(slides["generic"])
    with pytest.raises(SlideError) as error:
        open_slide(slides["ome"], mpp=-1)
    _one_line_naming(error, slides["ome"])


def test_missing_mpp_is_none_and_can_be_given(tmp_path, rgb):
    path = write_slide(tmp_path / "nompp.tif", rgb, mpp=None, ome=False)
    with open_slide(path) as slide:
        assert slide.mpp is None
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_tissue_detection(slides, rgb):
    with open_slide(slides["ome"]) as slide:
        tissue = detect_tissue(slide)
    truth = (rgb != 255).any(axis=-1)
    assert tissue.mask.shape == truth.shape and tissue.downsample == 1.0
    agreement = (tissue.mask == truth).mean()
    assert agreement > 0.97, agreement
    assert 0.3 < tissue.mask.mean() < 0.7
    assert not tissue.any_in(0, 0, 40, 40) and tissue.any_in(300, 300, 340, 340)


def _gray_pyramid(path, gray, levels=3, tile=256):
    import tifffile

    with tifffile.TiffWriter(str(path)) as writer:
        for k in range(levels):
            writer.write(gray[:: 2 ** k, :: 2 ** k], tile=(tile, tile), photometric="minisblack", compression="zlib",
                         subfiletype=1 if k else 0, resolution=(1e4 / (0.25 * 2 ** k),) * 2,
                         resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("kind", ["gray8", "rgb12in16", "gray10in16"])
def test_slides_as_scanners_write_them_give_objects(kind, tmp_path):
    """Grayscale and 10/12-bit-in-uint16 slides: tissue is found and objects too (issue 26, finding 6)."""
    from _slides import PixelModel, synthetic_rgb, write_slide
    from napari_sgdc.wholeslide import segment_slide

    rgb = synthetic_rgb(size=(512, 768), n_nuclei=60)
    gray = rgb.mean(axis=-1).round().astype(np.uint8)
    if kind == "gray8":
        path = _gray_pyramid(tmp_path / "g.tif", gray)
    elif kind == "gray10in16":
        path = _gray_pyramid(tmp_path / "g.tif", gray.astype(np.uint16) * 4)
    else:
        path = write_slide(tmp_path / "c.ome.tif", rgb.astype(np.uint16) * 16)
    with open_slide(path) as slide:
        pixels = slide.read_region(0, 0, 768, 512)
        expected = np.repeat(gray[..., None], 3, -1) if kind != "rgb12in16" else rgb
        assert np.abs(pixels.astype(int) - expected).max() <= 2  # the full range, not 1/16 of it
        tissue = detect_tissue(slide)
        assert 0.2 < tissue.mask.mean() < 0.8
    result = segment_slide(PixelModel(), path, tmp_path / "s.ome.zarr", tile=256, margin=32)
    assert result.n_objects > 30


def test_to_float_rgb_reads_sensor_bit_depths_in_uint16():
    from napari_sgdc.data.transforms import to_float_rgb

    assert np.allclose(to_float_rgb(np.full((2, 2), 4095, np.uint16)), 1.0)   # 12-bit white
    assert np.allclose(to_float_rgb(np.full((2, 2), 1023, np.uint16)), 1.0)   # 10-bit white
    assert np.allclose(to_float_rgb(np.full((2, 2), 65535, np.uint16)), 1.0)


def test_a_large_untiled_tiff_is_read_in_strips_and_tissue_decodes_each_tile_once(tmp_path, monkeypatch):
    """Findings 10 and 11: an untiled (strip) TIFF over LARGE_PLAIN_SIDE is a slide read in parts;
    tissue detection reads bands aligned to the stored tiles (benchmarks/big_tiff.py: 12000²)."""
    import tifffile

    import napari_sgdc.slide as slide_module
    from _slides import synthetic_rgb

    monkeypatch.setattr(slide_module, "LARGE_PLAIN_SIDE", 512)
    rgb = synthetic_rgb(size=(640, 768), n_nuclei=20)
    strips = tifffile.imwrite(tmp_path / "strips.tif", rgb, rowsperstrip=32, photometric="rgb",
                              resolution=(4e4, 4e4), resolutionunit="CENTIMETER") or tmp_path / "strips.tif"
    assert slide_module.is_slide(strips)
    with open_slide(strips) as slide:
        np.testing.assert_array_equal(slide.read_region(100, 200, 300, 50), rgb[200:250, 100:400])
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, rgb, tile=(128, 128), photometric="rgb", resolution=(4e4, 4e4),
                     resolutionunit="CENTIMETER")
    with open_slide(tiled) as slide:
        band = slide.band_rows(0, 3)
        assert band % 3 == 0 and band % 128 == 0
        reads = []
        real = slide._read_level
        monkeypatch.setattr(slide, "_read_level", lambda level, r0, r1, c0, c1: reads.append((r0, r1)) or
                            real(level, r0, r1, c0, c1))
        detect_tissue(slide, max_side=256)
        assert all(r0 % 128 == 0 for r0, _ in reads) and len(reads) == len({r for r in reads})
