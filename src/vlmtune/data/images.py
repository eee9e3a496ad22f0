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

An image reference (`ImageRef`) is a path or URL (`str`), or an image held in memory
(`ImageBytes`: a dataset's image column, a `data:` URI), which every loader here reads alike.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

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


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image (PNG, JPEG, ...) held in memory: a Parquet/Arrow/`datasets` image
    column's bytes, or a decoded `data:` URI. `label` names it in messages (`str()` gives
    it), e.g. the file name the dataset stored beside the bytes."""

    data: bytes = field(repr=False)
    label: str

    def __str__(self) -> str:
        return self.label


ImageRef = Union[str, ImageBytes]
"""What `Sample.images` holds: a resolved local path, an http(s) URL, or `ImageBytes`."""


def is_remote(path: ImageRef) -> bool:
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def is_data_uri(path: object) -> bool:
    return isinstance(path, str) and path[:5].lower() == "data:"


def decode_data_uri(uri: str, where: str) -> ImageBytes:
    """The image in a `data:[<mediatype>][;base64],<data>` URI (OpenAI-style `image_url`
    parts), or one line saying why it does not decode."""
    head, sep, payload = uri.partition(",")
    short = f"{uri[:40]}..." if len(uri) > 40 else uri
    if not sep:
        raise UserError(where, f"data: URI {short!r} has no ',' before its data", "write data:image/png;base64,<base64 bytes>")
    try:
        data = base64.b64decode(payload, validate=True) if head.lower().endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise UserError(where, f"data: URI {short!r} is not valid base64 ({e})", "re-encode the image (base64 of the file's bytes)") from None
    if not data:
        raise UserError(where, "data: URI holds no bytes", "put the base64 of the image file after the comma")
    return ImageBytes(data, f"{head[5:] or 'data'} URI ({len(data):,} bytes)")


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


def load_image(path: ImageRef, where: str = "", policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """Open `path` (a file, a URL fetched as `policy` allows, or `ImageBytes`) as an RGB PIL
    image. A file that does not decode is a one-line UserError, and so is an image over the
    policy's pixel cap (refused from its header, not decoded)."""
    where = where or str(path)
    try:
        if isinstance(path, ImageBytes):
            src: Union[str, io.BytesIO] = io.BytesIO(path.data)
        else:
            src = io.BytesIO(fetch(path, where, policy)) if is_remote(path) else path
        with warnings.catch_warnings():
            # The cap is ours (policy.max_image_pixels); PIL still refuses twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                over = policy.too_many_pixels(*im.size)
                if over:
                    raise UserError(where, f"image {str(path)!r} has {over}", "resize the image, or raise data.max_image_pixels")
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(where, f"image {str(path)!r} does not exist", "fix the path") from None
    except Image.DecompressionBombError as e:
        raise UserError(where, f"image {str(path)!r} refused as a possible decompression bomb ({e}; data.max_image_pixels: {policy.max_image_pixels:,})", "resize the image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(where, f"image {str(path)!r} cannot be decoded ({e})", "replace the file or drop the sample") from None
