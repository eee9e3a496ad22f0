"""Data flows one way: config -> models -> data -> train -> eval -> experiment -> cli. No module
imports from a later layer, not even inside a function (a lazy import is still a dependency).

models sits below data: the encoder renders conversations with the family's quirks
(`models.families`) and `vlmtune check` counts tokens with the model's processor, while no
model code reads data."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmtune"
# the shared bottom (errors, logs, io, dist, config) first; the demo is a command, below the CLI that runs it
LAYERS = ["errors", "logs", "io", "dist", "text", "config", "models", "data", "train", "eval", "experiment", "demo", "cli", "__main__"]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(top)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, vlmtune module) for every import of a vlmtune module in `path`."""
    rel = path.relative_to(SRC).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
                names = [target] if node.module else [f"{target}.{a.name}" if target else a.name for a in node.names]
            elif node.module and node.module.startswith("vlmtune"):
                names = [node.module[len("vlmtune."):]] if node.module != "vlmtune" else [a.name for a in node.names]
            else:
                continue
            out += [(node.lineno, n) for n in names if n]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("vlmtune."):]) for a in node.names if a.name.startswith("vlmtune.")]
    return out


def test_no_import_runs_back_up():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        own = _layer(".".join(rel.with_suffix("").parts))
        for line, target in _imports(path):
            if _layer(target) > own:
                bad.append(f"{rel}:{line} imports {target} ({LAYERS[_layer(target)]} is downstream of {LAYERS[own]})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """The guard itself: an import inside a function body counts."""
    fake = SRC / "config.py"
    text = fake.read_text() + "\n\ndef _probe():\n    from .eval.metrics import METRICS\n    return METRICS\n"
    found = [t for _, t in _imports_of_text(text, fake)]
    assert "eval.metrics" in found


def _imports_of_text(text: str, path: Path) -> list[tuple[int, str]]:
    probe = path.with_name(".layers_probe.py")
    probe.write_text(text)
    try:
        return _imports(probe)
    finally:
        probe.unlink()
