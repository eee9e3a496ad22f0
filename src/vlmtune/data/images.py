"""Image loading. Decoding happens lazily, per sample, in the dataset.

How images may be loaded is one explicit, immutable setting, `ImagePolicy`, built from the
data config (`ImagePolicy.from_data`) and carried by every `Sample` the data readers make
(`data/sources.py`), so whatever loads a sample's images (training, generation, the data
check) applies the policy that admitted its paths. Nothing here is module-level state: two
configs in one process load with their own settings.

- Remote `http(s)://` images are fetched only where the policy allows them
  (`data.allow_remote_images`), with a size cap and a timeout: a URL can neither hang a run
  nor fill the memory.
- An image with more pixels than `data.max_image_pixels` is refused from its header, never
  decoded (decompression bombs, and images far larger than training needs).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import DataConfig

PIL_MAX_IMAGE_PIXELS = 89_478_485
"""PIL's own decompression-bomb threshold (a warning at it, an error at twice it): the default
of `data.max_image_pixels`."""


@dataclass(frozen=True)
class ImagePolicy:
    """How images may be loaded: built from `DataConfig`, passed down, never mutated."""

    allow_remote: bool = False
    """Fetch `http(s)://` images; off: a URL is refused."""
    remote_max_bytes: int = 20_000_000
    remote_timeout: float = 20.0
    max_image_pixels: int = PIL_MAX_IMAGE_PIXELS
    """Width x height above which an image is refused from its header (never decoded)."""

    @classmethod
    def from_data(cls, data: "DataConfig") -> "ImagePolicy":
        return cls(allow_remote=data.allow_remote_images, remote_max_bytes=data.remote_image_max_bytes,
                   remote_timeout=data.remote_image_timeout, max_image_pixels=data.max_image_pixels)

    def too_many_pixels(self, w: int, h: int) -> str | None:
        """Why a `w`x`h` image is refused (None: it is not), naming the cap."""
        if w * h <= self.max_image_pixels:
            return None
        return f"{w}x{h} = {w * h:,} pixels, more than data.max_image_pixels ({self.max_image_pixels:,}): refused unread"


def is_remote(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    """The bytes at `url`, refusing a policy that does not allow remote images and more than
    `policy.remote_max_bytes`."""
    import urllib.error
    import urllib.request

    if not policy.allow_remote:
        raise UserError(where, f"remote image {url!r}", "set data.allow_remote_images: true to fetch it, or download the images and use local paths")
    cap = policy.remote_max_bytes
    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout) as r:  # noqa: S310 (http(s) only, checked by the resolver)
            declared = r.headers.get("Content-Length")
            if declared and int(declared) > cap:
                raise UserError(where, f"remote image {url!r} is {int(declared):,} bytes (limit {cap:,})", "raise data.remote_image_max_bytes or use a smaller image")
            data = r.read(cap + 1)
    except UserError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(where, f"remote image {url!r} could not be fetched ({getattr(e, 'reason', e)})", "check the URL and the network, or download it") from None
    if len(data) > cap:
        raise UserError(where, f"remote image {url!r} is larger than {cap:,} bytes", "raise data.remote_image_max_bytes or use a smaller image")
    return data


def load_image(path: str, where: str = "", policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """Open `path` (or a URL, fetched as `policy` allows) as an RGB PIL image. A file that
    does not decode is a one-line UserError, and so is an image over the policy's pixel cap
    (refused from its header, not decoded)."""
    where = where or path
    try:
        src = io.BytesIO(fetch(path, where, policy)) if is_remote(path) else path
        with warnings.catch_warnings():
            # The cap is ours (policy.max_image_pixels); PIL still refuses twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                over = policy.too_many_pixels(*im.size)
                if over:
                    raise UserError(where, f"image {path!r} has {over}", "resize the image, or raise data.max_image_pixels")
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(where, f"image {path!r} does not exist", "fix the path") from None
    except Image.DecompressionBombError as e:
        raise UserError(where, f"image {path!r} refused as a possible decompression bomb ({e}; data.max_image_pixels: {policy.max_image_pixels:,})", "resize the image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(where, f"image {path!r} cannot be decoded ({e})", "replace the file or drop the sample") from None
