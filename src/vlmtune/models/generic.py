"""Parts of a model no family describes, found by inspecting the loaded model.

Any transformers image-text-to-text model is a vision encoder -> projector -> language model
somewhere inside; the names vary (vision_tower / visual / vision_model, multi_modal_projector /
connector / merger ...), the structure does not:

1. llm: the deepest `PreTrainedModel` holding the input embeddings, plus the output head;
2. vision: the shallowest `PreTrainedModel` outside the LLM whose class or attribute name
   says vision (or image);
3. projector: every other parameter-holding child of the module that contains both (and any
   bare parameter there, like LLaVA-NeXT's `image_newline`), or -- where there is none -- a
   child of the vision module named like a projector (Qwen-VL's `merger`).

A model where (1) or (2) fails -- Fuyu feeds linear patch embeddings straight into its LLM,
with no separate encoder -- is "unresolved": all of it counts as the LLM, and it trains only
with `training_mode: both` (the whole model); other modes explain why they cannot work.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

VISION_WORDS = ("vision", "visual", "image_encoder", "vit")
PROJECTOR_WORDS = ("merger", "projector", "projection", "connector", "adapter", "mlp1", "qformer", "resampler")


def _path_of(model: nn.Module, target: Optional[nn.Module]) -> Optional[str]:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def _ancestors(path: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a'] (deepest first)."""
    bits = path.split(".")
    return [".".join(bits[:i]) for i in range(len(bits), 0, -1)]


def _is_pretrained(m: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(m, PreTrainedModel)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def find_parts(model: nn.Module) -> tuple[dict[str, list[str]], str]:
    """(part -> root paths, why unresolved or ""). Unresolved: everything is `llm`."""
    modules = dict(model.named_modules())
    emb_path = _path_of(model, model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None)
    if not emb_path:
        return _unresolved(model, "it exposes no input embeddings (get_input_embeddings)")
    llm = next((a for a in _ancestors(emb_path)[1:] if a and _is_pretrained(modules[a])), None)
    if llm is None:
        return _unresolved(model, f"no language-model module holds its embeddings ({emb_path})")

    def looks_visual(name: str, m: nn.Module) -> bool:
        leaf = name.rsplit(".", 1)[-1].lower()
        return any(w in leaf for w in VISION_WORDS) or any(w in type(m).__name__.lower() for w in ("vision", "visual"))

    candidates = [n for n, m in modules.items() if n and not _inside(n, llm) and not _inside(llm, n)
                  and _is_pretrained(m) and looks_visual(n, m)]
    if not candidates:
        return _unresolved(model, "no separate vision encoder module was found (Fuyu-style models feed image patches straight into the LLM)")
    vision = min(candidates, key=lambda n: n.count("."))

    # The container: deepest common ancestor of the vision encoder and the LLM.
    container = next((a for a in _ancestors(vision)[1:] if _inside(llm, a)), "")
    parent = modules[container] if container else model
    projector: list[str] = []
    for name, child in parent.named_children():
        path = f"{container}.{name}" if container else name
        if _inside(vision, path) or _inside(llm, path) or _inside(path, llm) or _inside(path, vision):
            continue
        if any(True for _ in child.parameters()):
            projector.append(path)
    for name, _ in parent.named_parameters(recurse=False):
        projector.append(f"{container}.{name}" if container else name)
    head = _path_of(model, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    llm_roots = [llm] + ([head] if head and not _inside(head, llm) else [])
    projector = [p for p in projector if p not in llm_roots]
    if not projector:  # the projector may live inside the vision module (Qwen-VL's merger)
        projector = [n for n, m in modules.items() if _inside(n, vision) and n != vision
                     and n.rsplit(".", 1)[-1].lower() in PROJECTOR_WORDS and n.count(".") == vision.count(".") + 1]
    if not projector:
        return _unresolved(model, f"no projector between the vision encoder ({vision}) and the language model ({llm})")
    # Top-level modules outside the model's container (rare): count them with the LLM.
    return {"vision": [vision], "projector": projector, "llm": llm_roots}, ""


def _unresolved(model: nn.Module, why: str) -> tuple[dict[str, list[str]], str]:
    roots = [n for n, c in model.named_children() if any(True for _ in c.parameters())]
    roots += [n for n, _ in model.named_parameters(recurse=False)]
    return {"vision": [], "projector": [], "llm": roots}, why
