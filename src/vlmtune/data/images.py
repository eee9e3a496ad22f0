"""Image loading. Decoding happens lazily, per sample, in the dataset.

Remote `http(s)://` images are fetched only where the data config allowed them
(`data.allow_remote_images`, checked when paths are resolved), with a size cap and a timeout:
a URL can neither hang a run nor fill the memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..errors import UserError


@dataclass
class RemoteSettings:
    max_bytes: int = 20_000_000
    timeout: float = 20.0


REMOTE = RemoteSettings()
"""Set from `data.remote_image_max_bytes` / `data.remote_image_timeout` when a config allows
remote images (data/sources.py)."""


def fetch(url: str, where: str) -> bytes:
    """The bytes at `url`, refusing more than REMOTE.max_bytes."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=REMOTE.timeout) as r:  # noqa: S310 (http(s) only, checked by the resolver)
            declared = r.headers.get("Content-Length")
            if declared and int(declared) > REMOTE.max_bytes:
                raise UserError(where, f"remote image {url!r} is {int(declared):,} bytes (limit {REMOTE.max_bytes:,})", "raise data.remote_image_max_bytes or use a smaller image")
            data = r.read(REMOTE.max_bytes + 1)
    except UserError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(where, f"remote image {url!r} could not be fetched ({getattr(e, 'reason', e)})", "check the URL and the network, or download it") from None
    if len(data) > REMOTE.max_bytes:
        raise UserError(where, f"remote image {url!r} is larger than {REMOTE.max_bytes:,} bytes", "raise data.remote_image_max_bytes or use a smaller image")
    return data


def load_image(path: str, where: str = "") -> Image.Image:
    """Open `path` (or a fetched URL) as an RGB PIL image; a file that does not decode is a
    one-line UserError, and so is a decompression bomb (refused, not decoded)."""
    try:
        src = io.BytesIO(fetch(path, where or path)) if path.startswith(("http://", "https://")) else path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(where or path, f"image {path!r} does not exist", "fix the path") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(where or path, f"image {path!r} refused as a possible decompression bomb ({e})", "resize the image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(where or path, f"image {path!r} cannot be decoded ({e})", "replace the file or drop the sample") from None
