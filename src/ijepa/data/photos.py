"""Photos as stored in the shards, and the two ways back to a square: training crops and probe views.

Sharding (`encode_photo`, ``imagefolder.store: photo``): a JPEG whose longer side is within
`max_side`, in RGB or grey and without an EXIF rotation, is stored as its original bytes (no
generation loss, no growth); any other JPEG is decoded (at a reduced DCT scale when it is
large), turned upright, resized so its longer side is `max_side` and written as JPEG at
`jpeg_quality`; other formats (PNG, BMP, WebP, ...) are lossless or rare and are written as PNG,
resized the same way. No crop: the training crop (RandomResizedCrop) happens at training time
on the whole photo, and probes take a deterministic view (`fit_square`: the shorter side
resized to the image size, bicubic, then the centre square).

Every file is decoded completely once at sharding time, so a truncated or corrupt file is
skipped and counted there, never found at training time.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

__all__ = ["SkipImage", "encode_photo", "fit_square", "open_rgb", "classify_error", "ORIENTATION_TAG"]

ORIENTATION_TAG = 0x0112  # EXIF orientation


class SkipImage(Exception):
    """A file that cannot be used; `reason` is one of imagefolder.SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def classify_error(err: BaseException, path: str | Path) -> SkipImage:
    """A PIL/IO error while reading `path` as the SkipImage it stands for."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(err, SkipImage):
        return err
    if isinstance(err, UnidentifiedImageError):
        return SkipImage("not_an_image", str(err).replace(str(path), "").strip() or "unidentified")
    if isinstance(err, Image.DecompressionBombError):
        return SkipImage("too_large", str(err))
    msg = str(err)
    reason = "truncated" if ("truncat" in msg.lower() or isinstance(err, EOFError)) else "corrupt"
    return SkipImage(reason, msg or type(err).__name__)


READ_ERRORS = (OSError, SyntaxError, EOFError, ValueError)


def open_rgb(im):
    """A PIL image in RGB (transparency flattened the way PIL converts it)."""
    if im.mode == "RGB":
        return im
    if "transparency" in im.info or im.mode in ("P", "LA", "PA"):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _encode(im, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_photo(path: str | Path, max_side: int, jpeg_quality: int) -> tuple[str, bytes, tuple[int, int]]:
    """One file -> (extension "jpg" or "png", bytes to store, (width, height) stored).

    Raises SkipImage(reason, detail) for a file that cannot be used."""
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        data = path.read_bytes()
        if not data:
            raise SkipImage("empty_file", "0 bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency, EXIF oddities
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                if w < 1 or h < 1:
                    raise SkipImage("corrupt", f"size {w}x{h}")
                rotated = im.getexif().get(ORIENTATION_TAG, 1) not in (1, None)
                if fmt == "JPEG" and max(w, h) <= max_side and im.mode in ("RGB", "L") and not rotated:
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))  # reads every byte, decodes at 1/8
                    im.load()
                    return "jpg", data, (w, h)
                if fmt == "JPEG":
                    scale = max_side / max(w, h)
                    im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))  # still >= the target
                im = open_rgb(ImageOps.exif_transpose(im))
                w, h = im.size
                if max(w, h) > max_side:
                    scale = max_side / max(w, h)
                    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC,
                                   reducing_gap=3.0)
                ext = "jpg" if fmt == "JPEG" else "png"
                return ext, _encode(im, ext, jpeg_quality), im.size
    except SkipImage:
        raise
    except (Image.DecompressionBombError, *READ_ERRORS) as err:
        raise classify_error(err, path) from None


def fit_square(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWxC -> [size, size, C]: the shorter side resized to `size` (bicubic), the centre square."""
    from PIL import Image

    h, w, c = img.shape
    if (h, w) == (size, size):
        return img
    im = Image.fromarray(img[:, :, 0] if c == 1 else img)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
