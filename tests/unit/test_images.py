from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from lmm.config import ImageLimits
from lmm.errors import BadRequest, PayloadTooLarge
from lmm.images import decode_base64, load_image

pytestmark = pytest.mark.unit
LIMITS = ImageLimits(max_bytes=200_000, max_pixels=500 * 500)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def two_tone() -> Image.Image:
    """Left half red, right half blue: orientation and colour are both visible."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    return img


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_supported_formats_decode_to_rgb(fmt):
    out = load_image(encode(two_tone(), fmt), LIMITS)
    assert out.mode == "RGB" and out.size == (40, 20)
    r, g, b = out.getpixel((5, 10))
    assert r > 200 and b < 60


def test_gif_animation_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue(), LIMITS).getpixel((4, 4))[1] > 200


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(encode(two_tone(), "JPEG", exif=exif), LIMITS)
    assert out.size == (20, 40)
    assert out.getpixel((10, 5))[0] > 200  # red (the left half) is now on top


def test_transparency_becomes_white():
    out = load_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"), LIMITS)
    assert out.getpixel((1, 1)) == (255, 255, 255)


def test_non_image_truncated_and_unsupported_are_400():
    png = encode(two_tone(), "PNG")
    with pytest.raises(BadRequest, match="not a readable image"):
        load_image(b"%PDF-1.4 hello", LIMITS)
    with pytest.raises(BadRequest, match="truncated"):
        load_image(png[: len(png) // 2], LIMITS)
    with pytest.raises(BadRequest, match="not supported"):
        load_image(encode(two_tone(), "BMP"), LIMITS)
    with pytest.raises(BadRequest, match="empty"):
        load_image(b"", LIMITS)


def test_size_limits_are_413_and_checked_before_decoding():
    with pytest.raises(PayloadTooLarge, match="byte limit"):
        load_image(b"\x89PNG" + b"\0" * 300_000, LIMITS)
    big = encode(Image.new("RGB", (600, 600)), "PNG")  # small file, too many pixels
    with pytest.raises(PayloadTooLarge, match="600x600"):
        load_image(big, LIMITS)


def test_base64_and_data_urls():
    png = encode(two_tone(), "PNG")
    b64 = base64.b64encode(png).decode()
    assert decode_base64(b64, LIMITS) == png
    assert decode_base64("data:image/png;base64," + b64, LIMITS) == png
    with pytest.raises(BadRequest, match="image/\\* data URL"):
        decode_base64("data:text/plain;base64," + b64, LIMITS)
    with pytest.raises(BadRequest, match="base64 encoded"):
        decode_base64("data:image/png,rawbytes", LIMITS)
    with pytest.raises(BadRequest, match="not valid base64"):
        decode_base64("***", LIMITS)
    with pytest.raises(PayloadTooLarge):
        decode_base64("A" * 400_000, LIMITS)
