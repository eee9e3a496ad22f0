"""Safety: no pickled weights, no torch.load without weights_only, remote images only when
allowed (size-capped), safe YAML, and trust_remote_code off unless asked."""

from __future__ import annotations

import re
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlmtune.config import DataConfig, ModelConfig, load_config
from vlmtune.data import images as img_mod
from vlmtune.data.images import load_image
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


def test_remote_images_only_when_allowed_and_size_capped(server, tmp_path, monkeypatch):
    csv = tmp_path / "t.csv"
    csv.write_text(f"url,instruction,response\n{server}/green.png,Color?,green\n")
    with pytest.raises(UserError, match="allow_remote_images"):
        read_csv(csv, DataConfig(), ImageResolver.for_config(csv, DataConfig(), None))
    d = DataConfig(allow_remote_images=True, remote_image_max_bytes=4000)
    [s] = read_csv(csv, d, ImageResolver.for_config(csv, d, None))
    assert s.images == [f"{server}/green.png"]
    assert load_image(s.images[0], "row").getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(UserError, match="larger than 4,000 bytes|is 5,000 bytes"):
        load_image(f"{server}/big.bin", "row")
    with pytest.raises(UserError, match="could not be fetched"):
        load_image(f"{server}/missing.png", "row")
    monkeypatch.setattr(img_mod, "REMOTE", img_mod.RemoteSettings())
