"""Image decoding with bounded cost: size limits before decode, a format allow-list, EXIF, RGB."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps

from lmm.config import ImageLimits
from lmm.errors import BadRequest, PayloadTooLarge

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]+)*?);base64,", re.I)


def decode_base64(value: str, limits: ImageLimits, param: str = "images_b64") -> bytes:
    """Bytes of a ``data:image/...;base64,`` URL or of bare base64 text."""
    value = value.strip()
    match = _DATA_URL.match(value)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise BadRequest(f"data URL has media type {mime!r}; send an image/* data URL.", param)
        value = value[match.end() :]
    elif value.startswith("data:"):
        raise BadRequest("data URLs must be base64 encoded: data:image/png;base64,<...>.", param)
    # base64 inflates by 4/3: refuse oversized input before decoding it.
    if len(value) * 3 // 4 > limits.max_bytes + 3:
        raise PayloadTooLarge(_too_large(limits), param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64; send base64 text or a data URL.", param)


def _too_large(limits: ImageLimits) -> str:
    return f"image is larger than the {limits.max_bytes} byte limit; resize or recompress it."


def check_size(size: int, limits: ImageLimits, param: str = "images") -> None:
    """413 for an encoded image over the byte limit (checked before it is read)."""
    if size > limits.max_bytes:
        raise PayloadTooLarge(_too_large(limits), param)


def load_image(data: bytes, limits: ImageLimits, param: str = "images") -> Image.Image:
    """Decode one image into RGB, refusing non-images, truncated files and oversized inputs."""
    check_size(len(data), limits, param)
    if not data:
        raise BadRequest("image is empty.", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            # The header gives the size before any pixel is decoded.
            if image.width * image.height > limits.max_pixels:
                raise PayloadTooLarge(
                    f"image is {image.width}x{image.height} pixels, over the "
                    f"{limits.max_pixels} pixel limit; downscale it.",
                    param,
                )
            if fmt not in FORMATS:
                raise BadRequest(
                    f"image format {fmt} is not supported; send JPEG, PNG, WebP or GIF.", param
                )
            if fmt == "GIF":
                image.seek(0)  # the first frame stands for an animation
            image.load()
    except (PayloadTooLarge, BadRequest):
        raise
    except Image.UnidentifiedImageError:
        raise BadRequest(
            "file is not a readable image; send JPEG, PNG, WebP or GIF.", param
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadRequest(f"image could not be decoded ({exc}); is the file truncated?", param) from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Transparent pixels become white rather than whatever colour hides behind alpha.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")
