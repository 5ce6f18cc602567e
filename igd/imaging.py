"""Image bytes -> an 8-bit RGB ``PIL.Image``, with limits and errors a user understands.

Only raster formats users photograph or save are opened (JPEG, PNG, WebP, GIF, BMP,
TIFF); the pixel count is checked from the header, before any pixel is decoded, so a
decompression bomb costs nothing. Every failure is an :class:`ImageError` subclass whose
message says what was wrong and what is accepted.
"""

from __future__ import annotations

import io
import warnings

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
        image = ImageOps.exif_transpose(image)
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
        samples = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((samples + 128) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).round().astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__
