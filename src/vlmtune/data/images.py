"""Image loading. Decoding happens lazily, per sample, in the dataset."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from ..errors import UserError


def load_image(path: str, where: str = "") -> Image.Image:
    """Open `path` as an RGB PIL image; a file that does not decode is a one-line UserError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(where or path, f"image {path!r} does not exist", "fix the path") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(where or path, f"image {path!r} cannot be decoded ({e})", "replace the file or drop the sample") from None
