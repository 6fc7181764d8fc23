"""Image loading: every odd-but-valid image converts, every bad one fails with an actionable reason."""

import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from svd_batch.images import ImageError, load_image


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1: ok image, 404, slow (hangs), and too big."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    png = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/slow.png":
                self.send_response(200)
                self.end_headers()
                for _ in range(40):  # trickles bytes: each read is quick, the whole is too slow
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.1)
            elif self.path == "/big.png":
                self.send_response(200)
                self.end_headers()
                try:
                    self.wfile.write(b"\0" * 300_000)
                except OSError:
                    pass
            else:
                self.send_error(404, "Not Found")

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_modes_are_converted_not_failed(tmp_path):
    cases = {
        "rgba.png": Image.new("RGBA", (8, 6), (255, 0, 0, 0)),
        "grey.png": Image.new("L", (8, 6), 128),
        "cmyk.jpg": Image.new("CMYK", (8, 6), (0, 255, 255, 0)),
        "palette.gif": Image.new("P", (8, 6), 3),
        "grey16.png": Image.fromarray(np.full((6, 8), 128 * 257, np.uint16)),
    }
    for name, img in cases.items():
        out = load_image(save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (8, 6), name
    assert load_image(str(tmp_path / "grey16.png")).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped
    assert load_image(str(tmp_path / "cmyk.jpg")).getpixel((0, 0))[0] > 200  # red stays red


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, b = load_image(str(path)).getpixel((0, 0))
    assert r > 200 and b < 50


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(str(path)).size == (10, 20)


def test_bad_files_fail_with_reasons(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    (tmp_path / "trunc.png").write_bytes(png.getvalue()[:-200])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    save(Image.new("RGB", (300, 300)), tmp_path / "huge.png")
    expectations = {
        str(tmp_path / "missing.jpg"): "file not found",
        str(tmp_path / "notes.txt"): "not an image",
        str(tmp_path / "trunc.jpg"): "truncated",
        str(tmp_path / "trunc.png"): "truncated",
        str(tmp_path / "junk.jpg"): "corrupt or truncated",
        str(tmp_path): "directory",
        "nosuchscheme://host/x.jpg": "unsupported URL scheme",
    }
    for uri, reason in expectations.items():
        with pytest.raises(ImageError, match=reason):
            load_image(uri)
    with pytest.raises(ImageError, match="images.max_pixels=50000"):
        load_image(str(tmp_path / "huge.png"), max_pixels=50_000)  # 90,000 px: between 1x and 2x the limit
    assert load_image(str(tmp_path / "huge.png")).size == (300, 300)


def test_urls(server):
    assert load_image(f"{server}/ok.png").size == (40, 30)
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{server}/nope.png")
    t = time.monotonic()
    with pytest.raises(ImageError, match="images.timeout=1"):
        load_image(f"{server}/slow.png", timeout=1.0)
    assert time.monotonic() - t < 3
    with pytest.raises(ImageError, match="byte cap"):
        load_image(f"{server}/big.png", max_bytes=100_000)


def test_fsspec_urls_have_the_same_deadline(tmp_path):
    """A filesystem library stuck in its own retries is cut off at images.timeout, like a slow server."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Stuck(MemoryFileSystem):
        protocol = "stucktest"

        def size(self, path):
            time.sleep(5)
            return super().size(path)

    fsspec.register_implementation("stucktest", Stuck, clobber=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    fsspec.filesystem("memory").pipe("/stuck/a.png", buf.getvalue())
    t = time.monotonic()
    with pytest.raises(ImageError, match="images.timeout=1"):
        load_image("stucktest://stuck/a.png", timeout=1.0)
    assert time.monotonic() - t < 3
    assert load_image("memory://stuck/a.png").size == (8, 8)
