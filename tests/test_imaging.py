"""Image decoding: every accepted kind becomes 8-bit RGB; every bad file a clear error.

All test images are made here, byte for byte, with Pillow and struct.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igd.imaging import (
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
)


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.dstack([x, y, 255 - x]), "RGB")


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_supported_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(encoded(gradient(), fmt))
    assert image.mode == "RGB" and image.size == (40, 30)
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless: exact pixels
        assert np.array_equal(np.asarray(image), np.asarray(gradient()))


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    pixels = np.asarray(decode_image(encoded(rgba, "PNG")))
    assert tuple(pixels[0, 0]) == (0, 0, 255)  # opaque stays
    assert tuple(pixels[1, 1]) == (255, 255, 255)  # transparent becomes white
    assert 120 <= pixels[0, 1, 0] <= 135  # half-transparent black is mid grey


def test_palette_and_palette_with_transparency() -> None:
    palette = gradient().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert decode_image(encoded(palette, "PNG")).mode == "RGB"
    transparent = Image.new("P", (3, 3), 0)
    transparent.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    transparent.putpixel((1, 1), 1)
    pixels = np.asarray(decode_image(encoded(transparent, "PNG", transparency=0)))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[1, 1]) == (200, 100, 50)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    pixels = np.asarray(decode_image(encoded(cmyk, "JPEG", quality=95))).astype(int)
    assert pixels[..., 0].min() > 230 and pixels[..., 1:].max() < 30


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    pixels = np.asarray(decode_image(encoded(image, "PNG")))
    assert pixels.shape == (1, 3, 3)
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_grayscale_becomes_three_equal_channels() -> None:
    pixels = np.asarray(decode_image(encoded(gradient().convert("L"), "PNG")))
    assert pixels.shape == (30, 40, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encoded(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (20, 40)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[2, 10, 0] > 200 and pixels[-3, 10, 0] < 60  # red is now on top


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    pixels = np.asarray(decode_image(data))
    assert tuple(pixels[3, 3]) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_corrupt(fmt: str) -> None:
    data = encoded(gradient(200, 150), fmt)
    with pytest.raises(CorruptImage, match=rf"the {fmt} image is corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupted_png_checksum_is_corrupt() -> None:
    data = bytearray(encoded(gradient(), "PNG"))
    data[60] ^= 0xFF  # inside the pixel data: the CRC no longer matches
    with pytest.raises((CorruptImage, UnsupportedImage)):
        decode_image(bytes(data))


def test_empty_bytes() -> None:
    with pytest.raises(EmptyImage, match="empty"):
        decode_image(b"")


def test_text_file_is_not_an_image() -> None:
    with pytest.raises(UnsupportedImage, match=r"not a JPEG, PNG, WebP, GIF, BMP or TIFF image"):
        decode_image(b"airplane,automobile,bird\n" * 20)


@pytest.mark.parametrize(
    "data,what",
    [(b"%PDF-1.7\n%...", "a PDF document"), (b"PK\x03\x04rest", "a ZIP archive"),
     (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG")],
)
def test_documents_are_named_in_the_error(data: bytes, what: str) -> None:
    with pytest.raises(UnsupportedImage, match=what):
        decode_image(data)


def test_header_declaring_100000_by_100000_is_too_large_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="at most 50,000,000 pixels"):
        decode_image(png_declaring(100_000, 100_000))


def test_pixel_limit_is_configurable() -> None:
    data = png_declaring(8000, 8000)
    with pytest.raises(ImageTooLarge, match=r"8000 x 8000 = 64,000,000 pixels; at most 50,000,000"):
        decode_image(data)
    with pytest.raises(ImageTooLarge, match="at most 1,000 pixels"):
        decode_image(encoded(gradient(), "PNG"), max_pixels=1000)
    assert decode_image(encoded(gradient(), "PNG"), max_pixels=1200).size == (40, 30)


def test_fixture_photo_decodes(fixtures: Path) -> None:
    image = decode_image((fixtures / "images" / "chelsea.jpg").read_bytes())
    assert image.size == (451, 300) and image.mode == "RGB"


# In a fresh process (without torch, whose import would cost seconds): the peak resident
# memory decoding adds, against what the header predicts.
_DECODING_PROBE = """
import sys
from igd.imaging import decode_image, probe

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

data = open(sys.argv[1], "rb").read()
header = probe(data)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
decode_image(data)
print(header.decoding_bytes(), status("VmHWM:") - before)
"""


def _large(mode: str) -> Image.Image:
    """A 2000 x 1500 image in ``mode`` with content that does not compress away."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (1500, 2000), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode) if mode != "P" else rgb.quantize(64)


@pytest.mark.parametrize("mode, fmt, exif", [("RGB", "JPEG", False), ("RGB", "JPEG", True), ("L", "PNG", False),
                                             ("P", "PNG", False), ("RGBA", "PNG", False), ("I;16", "PNG", False),
                                             ("CMYK", "JPEG", False)])
def test_decoding_takes_no_more_memory_than_the_header_predicts(mode: str, fmt: str, exif: bool,
                                                                 tmp_path: Path) -> None:
    # The daemon reserves header.decoding_bytes() of its memory budget before decoding (igd.serve.ledger).
    image = _large(mode)
    params: dict[str, object] = {}
    if exif:
        tags = Image.Exif()
        tags[0x0112] = 6  # rotated: decoding makes a turned copy
        params["exif"] = tags.tobytes()
    path = tmp_path / f"large.{fmt.lower()}"
    path.write_bytes(encoded(image, fmt, **params))
    out = subprocess.run([sys.executable, "-c", _DECODING_PROBE, str(path)], capture_output=True, text=True,
                         check=True).stdout
    predicted, grown = map(int, out.split())
    assert grown <= predicted + 4 * 2**20, (mode, fmt, exif, predicted / 2**20, grown / 2**20)
    assert predicted < 2.5 * grown + 8 * 2**20, "the prediction should not be far above what decoding takes"
