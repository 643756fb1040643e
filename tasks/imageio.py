"""Reading and writing images: local paths or any fsspec URL, any PIL mode, atomic writes.

Images come back as float64 numpy arrays on 0..255, shaped (H, W) for single-channel
images and (H, W, 3) for colour ones. 16-bit images are scaled to 0..255, palette images
expanded, and RGB files whose three channels are equal (grayscale stored as RGB) are
returned as single-channel.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from timfusion.platform.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def path_exists(path: str | os.PathLike) -> bool:
    """Whether a local path or fsspec URL exists (outputs are checked before any work)."""
    if is_url(path):
        fs, inner = fsspec.core.url_to_fs(str(path))
        return fs.exists(inner)
    return Path(path).exists()


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local file or fsspec URL; a missing file is a UserError naming it."""
    try:
        with fsspec.open(str(path), "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, OSError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__}: {err})") from None


def pil_to_array(image: Image.Image, keep_rgb_gray: bool = False) -> np.ndarray:
    """A PIL image as float64 0..255, (H, W) or (H, W, 3); see the module docstring."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if data.max() > 255 or mode.startswith("I;16") else 255.0
        return data * (255.0 / peak)
    if mode == "F":
        return np.asarray(image, dtype=np.float64)
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float64)
    if mode == "LA":
        return np.asarray(image.convert("L"), dtype=np.float64)
    data = np.asarray(image.convert("RGB"), dtype=np.float64)
    if not keep_rgb_gray and np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(
        data[..., 0], data[..., 2]
    ):
        return data[..., 0].copy()
    return data


@contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Image.Image]:
    """The PIL image of a local file or URL, header read; a bad file is a UserError naming it."""
    raw = read_bytes(path)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            yield image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: not a readable image ({err.__class__.__name__})") from None


def read_image(path: str | os.PathLike, keep_rgb_gray: bool = False) -> np.ndarray:
    """Read one image (local path or URL) as float64 on 0..255; errors name the file."""
    with _opened(path) as image:
        image.load()
        return pil_to_array(image, keep_rgb_gray=keep_rgb_gray)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding it."""
    with _opened(path) as image:
        width, height = image.size
    return height, width


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clip to 0..255 and round half away from zero (MATLAB's uint8 conversion)."""
    clipped = np.clip(np.asarray(image, dtype=np.float64), 0.0, 255.0)
    return np.floor(clipped + 0.5).astype(np.uint8)


def plain_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` (or ``mkdir``) would give under the process's umask:
    what a temporary file or folder renamed into place should get, not its owner-only ones."""
    mask = None
    try:  # read where /proc shows it: setting the umask to read it races other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place, with the
    permissions a plain ``open`` gives (the temporary file alone would leave it owner-only)."""
    if is_url(path):
        # Object stores have no rename: a single PUT is already all-or-nothing.
        with fsspec.open(str(path), "wb") as handle:
            handle.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        os.chmod(tmp_name, plain_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


WRITE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def image_format(path_or_suffix: str) -> str:
    """The PIL format an output path's suffix asks for; an unwritable one is a UserError."""
    suffix = Path(path_or_suffix).suffix or path_or_suffix
    try:
        return WRITE_FORMATS[suffix.lower()]
    except KeyError:
        raise UserError(
            f"{path_or_suffix}: cannot write images with suffix {suffix!r}; "
            f"use one of {', '.join(sorted(WRITE_FORMATS))}"
        ) from None


def encode_image(image: np.ndarray, suffix: str, png_compress_level: int = 6) -> bytes:
    """Encode a 0..255 (H, W) or (H, W, 3) array in the format named by ``suffix``.

    ``png_compress_level`` 1 is about 3x faster than PIL's default 6 on noisy images for a
    few percent more bytes (what bulk writers such as the synthetic generators want).
    """
    fmt = image_format(suffix)
    buffer = io.BytesIO()
    options = ({"quality": 95} if fmt == "JPEG"
               else {"compress_level": png_compress_level} if fmt == "PNG" else {})
    Image.fromarray(to_uint8(image)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_image(path: str | os.PathLike, image: np.ndarray, png_compress_level: int = 6) -> None:
    """Write an image atomically (temporary name, then rename)."""
    atomic_write_bytes(path, encode_image(image, Path(str(path)).suffix, png_compress_level))
