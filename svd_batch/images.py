"""Loading a row's image the way diffusers' ``load_image`` does: open, apply EXIF orientation, RGB.

Local paths and http(s) URLs both work; URLs are fetched with a deadline and a size cap so one bad server
cannot stall or flood a run. Every failure becomes an ``ImageError`` with a reason a person can act on.
Unusual but valid images (CMYK, palette, 16-bit, grey, alpha, animated, rotated by EXIF) are converted,
not failed.
"""

from __future__ import annotations

import io
import os
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps


class ImageError(Exception):
    """The row's image cannot be used; the row is recorded as failed and the run goes on."""


def fetch_bytes(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (not per read: a trickling server is cut off too)."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked by caller)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"{url} is {declared} bytes, over the {max_bytes} byte cap (images.max_bytes)")
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(f"{url} did not finish within images.timeout={timeout:g} s")
                chunk = resp.read1(65536)  # returns what has arrived; read() would wait for all
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"{url} sends more than the {max_bytes} byte cap (images.max_bytes)")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"could not fetch {url}: {reason} (images.timeout={timeout:g} s)") from None
    return b"".join(chunks)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any mode to 8-bit RGB as a viewer shows it (RGBA drops alpha, as diffusers' ``load_image`` does)."""
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/APNG: the first frame
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit grey: a plain convert would clip nearly everything to white.
        arr = np.asarray(image).astype(np.float64)
        top = 1.0 if image.mode == "F" and arr.max() <= 1.0 else (65535.0 if arr.max() > 255 else 255.0)
        image = PIL.Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(uri: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20,
               max_pixels: int | None = 178956970) -> PIL.Image.Image:
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
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; a configured limit is a limit.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(source) as image:
                image.load()
                return to_rgb(image)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large for images.max_pixels={max_pixels}: {exc}") from None
    except PIL.UnidentifiedImageError:
        raise ImageError(f"not an image file PIL can read: {uri}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image {uri}: {exc}") from None
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = old_limit
