"""One image reader for the CLI, eval and the nodes: every pixel mode scaled to 8 bits correctly
or refused with the reason (issue 12: PIL's convert('RGB') clips 16-bit pictures to white)."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from g4seg_core.errors import G4SegError
from g4seg_core.files.image_files import file_size_hw, open_image, read_rgb

GREY16 = (np.arange(48 * 40).reshape(48, 40) * 34).astype(np.uint16)  # 0 .. 65246


def _grey(values):
    return np.repeat(values[..., None], 3, axis=-1)


def _png48(path, rgb16):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) from numpy."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "g.png")
    pic = read_rgb(tmp_path / "g.png")
    assert pic.source == "16-bit greyscale (I;16)" and pic.channels_converted and "16-bit" in pic.note
    np.testing.assert_array_equal(pic.pixels, _grey(np.round(GREY16 / 257.0).astype(np.uint8)))


def test_32bit_integer_greyscale(tmp_path):
    Image.fromarray(GREY16.astype(np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(read_rgb(tmp_path / "i.tif").pixels,
                                  _grey(np.round(GREY16 / 257.0).astype(np.uint8)))
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(G4SegError, match=r"values in \[0, 70000\]"):
        read_rgb(tmp_path / "big.tif")


def test_float_greyscale(tmp_path):
    f = (GREY16 / 65535.0).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(read_rgb(tmp_path / "f.tif").pixels, _grey(np.round(f * 255.0).astype(np.uint8)))
    Image.fromarray(f * 255).save(tmp_path / "f255.tif")
    with pytest.raises(G4SegError, match="float pictures must hold 0..1"):
        read_rgb(tmp_path / "f255.tif")


def test_16bit_rgb_png_and_npy(tmp_path):
    rgb16 = np.stack([GREY16, GREY16 // 2, 65535 - GREY16], axis=-1)
    expected = np.round(rgb16 / 257.0).astype(np.uint8)
    _png48(tmp_path / "rgb48.png", rgb16)
    pic = read_rgb(tmp_path / "rgb48.png")  # Pillow keeps the high byte: within 1 of the exact scaling
    assert pic.pixels.shape == (48, 40, 3) and np.abs(pic.pixels.astype(int) - expected).max() <= 1
    np.save(tmp_path / "rgb16.npy", rgb16)
    pic = read_rgb(tmp_path / "rgb16.npy")
    assert not pic.channels_converted and "16-bit" in pic.note
    np.testing.assert_array_equal(pic.pixels, expected)
    np.save(tmp_path / "rgbf.npy", rgb16 / 65535.0)
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgbf.npy").pixels,
                                  np.round(rgb16 / 65535.0 * 255.0).astype(np.uint8))
    np.save(tmp_path / "bad.npy", np.zeros((4, 4, 5)))
    with pytest.raises(G4SegError, match="shape"):
        read_rgb(tmp_path / "bad.npy")


def test_8bit_modes_and_plain_rgb(tmp_path):
    rgb = (np.random.default_rng(0).random((6, 5, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    pic = read_rgb(tmp_path / "rgb.png")
    assert pic.note is None and not pic.channels_converted
    np.testing.assert_array_equal(pic.pixels, rgb)
    pic.pixels[0, 0] = 0  # writable (DenseCRF needs it)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    pic = read_rgb(tmp_path / "l.png")
    assert pic.channels_converted and "L" in pic.source
    np.testing.assert_array_equal(pic.pixels, _grey(rgb[..., 0]))


def test_files_that_are_not_pictures(tmp_path):
    with pytest.raises(G4SegError, match="not found"):
        read_rgb(tmp_path / "nope.png")
    with pytest.raises(G4SegError, match="folder"):
        open_image(tmp_path)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(G4SegError, match="not a regular file"):  # never blocks waiting for a writer
        open_image(fifo)
    Image.fromarray(GREY16).save(tmp_path / "g.png")
    data = (tmp_path / "g.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert file_size_hw(tmp_path / "cut.png") == (48, 40)  # the header is enough for the size
    with pytest.raises(G4SegError, match="cannot read image") as e:
        read_rgb(tmp_path / "cut.png")
    assert "cut.png" in str(e.value) and "\n" not in str(e.value)
