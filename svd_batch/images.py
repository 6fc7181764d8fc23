"""Loading a row's image the way diffusers' ``load_image`` does: open, apply EXIF orientation, RGB.

Local paths and http(s) URLs both work; URLs are fetched with a timeout and a size cap so one bad server
cannot stall or flood a run. Every failure becomes an ``ImageError`` with a reason a person can act on.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request

import PIL.Image
import PIL.ImageOps


class ImageError(Exception):
    """The row's image cannot be used; the row is recorded as failed and the run goes on."""


def fetch_bytes(url: str, timeout: float, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http/https only, checked)
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"could not fetch {url}: {reason} (timeout {timeout:g} s)") from None
    if len(data) > max_bytes:
        raise ImageError(f"{url} sends more than the {max_bytes} byte cap (images.max_bytes)")
    return data


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Bring any mode to 8-bit RGB the way a viewer shows it."""
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/APNG: the first frame
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: scale 0..65535 to 0..255 (a plain convert would clip nearly everything to white).
        image = image.point(lambda v: v / 257).convert("L")
    return image.convert("RGB")


def load_image(uri: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20, max_pixels: int | None = None) -> PIL.Image.Image:
    if uri.startswith(("http://", "https://")):
        source = io.BytesIO(fetch_bytes(uri, timeout, max_bytes))
    elif "://" in uri:
        raise ImageError(f"unsupported URL scheme in {uri!r} (use a local path or http(s)://)")
    else:
        if not os.path.exists(uri):
            raise ImageError(f"file not found: {uri}")
        if os.path.isdir(uri):
            raise ImageError(f"is a directory, not an image: {uri}")
        source = uri
    old_limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with PIL.Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except PIL.Image.DecompressionBombError as exc:
        raise ImageError(f"image too large for images.max_pixels={max_pixels}: {exc}") from None
    except PIL.UnidentifiedImageError:
        raise ImageError(f"not an image file PIL can read: {uri}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image {uri}: {exc}") from None
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = old_limit
