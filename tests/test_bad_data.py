"""Bad data and bad input: each fault is either skipped and counted, or refused with one line naming the cause.

Faults are injected the way a user meets them (unusual image files, broken shards, NaN losses, wrong numbers on the
command line), at tiny sizes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from datamodules.convert import convert_image_folder
from datamodules.transforms import decode_image


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 8-bit 0, 1, 128, 255 times 257
    decoded = np.asarray(decode_image(png_bytes(Image.fromarray(values))))
    assert decoded.shape == (1, 4, 3)
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128, 255]])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_transparent_images_are_composited_over_white():
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black: white after compositing, not black
    np.testing.assert_array_equal(
        np.asarray(decode_image(png_bytes(Image.fromarray(rgba)))), [[[200, 0, 0], [255] * 3]]
    )

    grey_alpha = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA")
    np.testing.assert_array_equal(np.asarray(decode_image(png_bytes(grey_alpha))), [[[50] * 3, [255] * 3]])

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    decoded = np.asarray(decode_image(png_bytes(palette, transparency=1)))
    np.testing.assert_array_equal(decoded, [[[10, 20, 30], [255] * 3]])


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("1", 1, 255), ("L", 77, 77), ("CMYK", (0, 0, 0, 255), 0), ("P", 0, 0)],
)
def test_other_modes_convert_to_rgb(mode, value, expected):
    image = Image.new(mode, (3, 2), value)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = np.asarray(decode_image(buffer.getvalue()))
    assert decoded.shape == (2, 3, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected).max() <= 2  # JPEG rounding


@pytest.mark.parametrize("mode", ["F", "I"])
def test_images_of_unknown_range_are_rejected_by_mode(mode):
    buffer = io.BytesIO()
    Image.new(mode, (2, 2), 3).save(buffer, format="TIFF")
    with pytest.raises(ValueError, match=f"unsupported image mode '{mode}'"):
        decode_image(buffer.getvalue())


def test_converter_keeps_sixteen_bit_png_and_skips_float_tiff_by_name(tmp_path, caplog):
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("F", (4, 4), 0.5).save(folder / "float.tif")
    Image.new("LA", (4, 4), (9, 0)).save(folder / "clear.png")
    result = convert_image_folder(str(tmp_path / "images"), str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert (result.num_samples, result.num_skipped) == (2, 1)
    assert "float.tif" in caplog.text and "unsupported image mode 'F'" in caplog.text

    import webdataset as wds

    images = [np.asarray(decode_image(sample["png"])) for sample in wds.WebDataset(result.shards, shardshuffle=False)]
    assert [int(image.min()) for image in images] == [255, 255]  # 16-bit white stays white; transparent -> white
