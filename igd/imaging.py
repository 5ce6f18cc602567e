"""Image bytes -> an 8-bit RGB ``PIL.Image``, with limits and errors a user understands.

Only raster formats users photograph or save are opened (JPEG, PNG, WebP, GIF, BMP,
TIFF); the pixel count is checked from the header, before any pixel is decoded, so a
decompression bomb costs nothing. Every failure is an :class:`ImageError` subclass whose
message says what was wrong and what is accepted.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import (  # noqa: F401 - importing a plugin registers its format
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from igd.request import DEFAULT_MAX_PIXELS

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Formats people send by mistake, recognised by their first bytes for a better message.
_NOT_RASTER = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"<svg", "an SVG (vector) image"),
    (b"<?xml", "an XML (perhaps SVG) document"),
)


# Our own pixel limit replaces Pillow's, whose warning would only be noise in the log.
# (A filter set once here: catch_warnings() is not thread-safe, and decoding runs in threads.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why."""


class EmptyImage(ImageError):
    pass


class UnsupportedImage(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class ImageTooLarge(ImageError):
    def __init__(self, size: str, max_pixels: int) -> None:
        super().__init__(f"the image is {size}; at most {max_pixels:,} pixels are accepted")
        self.max_pixels = max_pixels


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded."""

    width: int
    height: int
    mode: str  # Pillow's mode of the decoded pixels, e.g. "RGB", "I;16", "P"
    may_rotate: bool  # an EXIF orientation to apply (or one that may follow the pixels: PNG)
    transparent: bool = False  # a palette with a transparent colour

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decoding_bytes(self) -> int:
        """The most memory :func:`decode_image` holds at once for this image: the decoded
        pixels, the rotated copy an EXIF orientation makes, and the conversion to 8-bit
        RGB (a copy, through 32-bit integers for 16-bit samples, through RGBA with a white
        background for transparency)."""
        stored = _BYTES_PER_PIXEL.get(self.mode, 4)
        if self.mode == "RGB":
            converting = 0
        elif self.mode in _ALPHA_MODES or self.transparent:
            converting = 16
        elif self.mode.startswith("I") or self.mode == "F":
            converting = 10
        else:
            converting = 4
        return self.pixels * ((2 if self.may_rotate else 1) * stored + converting)


# Bytes per pixel of Pillow's image memory, by mode (everything else: 4).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ORIENTATION = 0x0112


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of the image in ``data`` (format, size and mode; no pixels), checked
    against ``max_pixels``; the errors of :func:`decode_image`."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    image = _open(data, max_pixels)
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: decoding will say what is wrong
        orientation = 1
    header = ImageHeader(image.width, image.height, image.mode, orientation != 1 or image.format == "PNG",
                         image.mode == "P" and "transparency" in image.info)
    if header.pixels > max_pixels:
        raise ImageTooLarge(f"{header.width} x {header.height} = {header.pixels:,} pixels", max_pixels)
    return header


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into an RGB image with EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images become 8-bit RGB; transparency is
    composited on white; animations give their first frame.
    """
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    image = _open(data, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width} x {height} = {width * height:,} pixels", max_pixels)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise CorruptImage(
            f"the {image.format} image is corrupt or truncated ({_reason(error)})"
        ) from error


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only: format, size and mode; no pixels yet."""
    head = data[:64].lstrip()
    for magic, what in _NOT_RASTER:
        if head.startswith(magic):
            raise UnsupportedImage(f"the file is {what}, not a {FORMAT_NAMES} image")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImage(
            f"the file ({len(data):,} bytes) is not a {FORMAT_NAMES} image"
        ) from None
    except Image.DecompressionBombError:
        # Pillow refuses headers over twice its own limit before we see the size.
        size = f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels"
        raise ImageTooLarge(size, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise CorruptImage(f"the image header is corrupt ({_reason(error)})") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples: Pillow's own convert would clip everything above 255 to white.
        samples = np.array(image, dtype=np.int32)  # a copy to work in: 4 bytes a pixel, in place
        np.clip(samples, 0, 65535, out=samples)
        samples += 128
        samples //= 257
        image = Image.fromarray(samples.astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).round().astype(np.uint8), mode="L")
    has_alpha = image.mode in _ALPHA_MODES or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__
