"""Safety: no pickled weights, no torch.load without weights_only, remote images only when
allowed (size-capped), safe YAML, and trust_remote_code off unless asked."""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import struct
import threading
import zlib
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlmtune.config import DataConfig, ModelConfig, load_config
from vlmtune.data import images as img_mod
from vlmtune.data.images import ImagePolicy, load_image
from vlmtune.data.sources import ImageResolver, read_csv
from vlmtune.errors import UserError
from vlmtune.models.loading import load_model
from vlmtune.models.tiny import tiny_dir

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmtune"


def test_pickled_weights_are_refused(tmp_path):
    src = tiny_dir("tiny:llava")
    d = tmp_path / "pickled"
    shutil.copytree(src, d)
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no safetensors weights"):
        load_model(ModelConfig(name="p", hf_model_id=str(d)))


def test_no_torch_load_without_weights_only():
    for f in SRC.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert "import pickle" not in f.read_text(), f"{f} imports pickle"


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("experiment_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)


def test_trust_remote_code_is_off_unless_set():
    assert ModelConfig(name="m", hf_model_id="x").trust_remote_code is False


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(root / "green.png")
    (root / "big.bin").write_bytes(b"\0" * 5000)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_images_only_when_allowed_and_size_capped(server, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text(f"url,instruction,response\n{server}/green.png,Color?,green\n")
    with pytest.raises(UserError, match="allow_remote_images"):
        read_csv(csv, DataConfig(), ImageResolver.for_config(csv, DataConfig(), None))
    d = DataConfig(allow_remote_images=True, remote_image_max_bytes=4000)
    [s] = read_csv(csv, d, ImageResolver.for_config(csv, d, None))
    assert s.images == [f"{server}/green.png"]
    assert load_image(s.images[0], "row", s.image_policy).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(UserError, match="larger than 4,000 bytes|is 5,000 bytes"):
        load_image(f"{server}/big.bin", "row", s.image_policy)
    with pytest.raises(UserError, match="could not be fetched"):
        load_image(f"{server}/missing.png", "row", s.image_policy)


def test_image_policy_is_per_config_and_nothing_leaks_between_loads(server, tmp_path):
    """Two data configs in one process: each config's samples load remote images with that
    config's settings, whichever reader was built last; a config that does not allow remote
    images refuses them although another one in the process did. No module-level state."""
    www = tmp_path / "www"
    Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3)).save(www / "noisy.png")
    size = (www / "noisy.png").stat().st_size
    csv = tmp_path / "t.csv"
    csv.write_text(f"url,instruction,response\n{server}/noisy.png,Color?,noise\n")
    roomy = DataConfig(allow_remote_images=True, remote_image_max_bytes=2 * size)
    tight = DataConfig(allow_remote_images=True, remote_image_max_bytes=size // 2)
    [a] = read_csv(csv, roomy, ImageResolver.for_config(csv, roomy, None))
    [b] = read_csv(csv, tight, ImageResolver.for_config(csv, tight, None))  # built after roomy's reader
    assert load_image(a.images[0], "a", a.image_policy).size == (32, 32)
    with pytest.raises(UserError, match=f"larger than {size // 2:,} bytes|is {size:,} bytes"):
        load_image(b.images[0], "b", b.image_policy)
    assert load_image(a.images[0], "a", a.image_policy).size == (32, 32)  # tight's cap did not linger
    with pytest.raises(UserError, match="allow_remote_images"):
        read_csv(csv, DataConfig(), ImageResolver.for_config(csv, DataConfig(), None))
    for policy in (ImagePolicy(), ImagePolicy.from_data(DataConfig())):  # loading, too, asks the policy
        with pytest.raises(UserError, match="allow_remote_images"):
            load_image(a.images[0], "c", policy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.image_policy.allow_remote = False  # type: ignore[misc]
    from vlmtune.data import check, sources

    for mod in (img_mod, sources, check):  # no settings object to set as a side effect (the old images.REMOTE)
        state = [n for n, v in vars(mod).items() if not n.startswith("__") and (dataclasses.is_dataclass(v) and not isinstance(v, type)
                 or mod is img_mod and isinstance(v, (dict, list, set, bytearray)))]
        assert not state, f"{mod.__name__} holds module-level settings state: {state}"


def test_an_image_over_the_pixel_cap_is_refused_naming_the_file_and_the_cap(tmp_path):
    from vlmtune.data.check import inspect_image

    p = tmp_path / "wide.png"
    Image.new("RGB", (50, 40)).save(p)  # 2,000 pixels
    assert load_image(str(p), "row", ImagePolicy(max_image_pixels=2000)).size == (50, 40)
    with pytest.raises(UserError) as e:
        load_image(str(p), "t.csv:2: url", ImagePolicy.from_data(DataConfig(max_image_pixels=1999)))
    line = e.value.line()
    assert "\n" not in line and line.startswith("t.csv:2: url: ") and str(p) in line and "data.max_image_pixels (1,999)" in line, line
    # The cap is the config's, not PIL's: above PIL's own warning threshold (89,478,485) a
    # raised cap admits a header PIL would warn about; the default refuses it unread.
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 9000, 8, 2, 0, 0, 0)) + _png_chunk(b"IEND", b""))
    assert "data.max_image_pixels (89,478,485)" in (inspect_image(str(huge), False, ImagePolicy()) or "")
    assert inspect_image(str(huge), False, ImagePolicy(max_image_pixels=100_000_000)) is None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
