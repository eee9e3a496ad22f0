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

Models with their own code (InternVL's `vision_model` / `mlp1` / `language_model`) go the same
way. Where a part is not found, the config's `models[].parts` names it (`named_parts`), and
the error says which paths to write, guessed from the model's top-level modules (`parts_fix`).
"""

from __future__ import annotations

import difflib
import logging
from typing import Mapping, Optional, Sequence

import torch.nn as nn

from ..errors import UserError

log = logging.getLogger("vlmtune")

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


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The token embedding: `get_input_embeddings()`, or -- where the model does not implement
    it (remote code often leaves it to its language model) -- its largest `nn.Embedding`."""
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None:
        emb = max((m for m in model.modules() if isinstance(m, nn.Embedding)), key=lambda m: m.num_embeddings, default=None)
    return emb


def _head_of(m: nn.Module) -> Optional[nn.Module]:
    try:
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def output_head_path(model: nn.Module) -> Optional[str]:
    """Path of the output head: `get_output_embeddings()`, or -- where the top-level model has
    none (remote code whose language model keeps the head, InternVL's `language_model.output`)
    -- that of its shallowest sub-model that has one."""
    head = _head_of(model)
    if head is None:
        subs = sorted(((n, m) for n, m in model.named_modules() if n and _is_pretrained(m)), key=lambda nm: nm[0].count("."))
        head = next((h for _, m in subs if (h := _head_of(m)) is not None), None)
    return _path_of(model, head)


def find_parts(model: nn.Module) -> tuple[dict[str, list[str]], str]:
    """(part -> root paths, why unresolved or ""). Unresolved: everything is `llm`."""
    modules = dict(model.named_modules())
    emb_path = _path_of(model, _input_embeddings(model))
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
        return _unresolved(model, "no separate vision encoder module was found: none outside the language model is a model named or typed "
                                 "like one (vision, visual, vit); Fuyu-style models have none, feeding image patches straight into the LLM")
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
    head = output_head_path(model)
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


# ------------------------------------------------------------------------------------------
# Parts named in the config (`models[].parts`), for models inspection cannot split.


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def suggest_parts(model: nn.Module) -> Optional[dict[str, list[str]]]:
    """A guess at the parts from the model's module layout, for the message that asks the user
    to name them: the first level (from the top, through single-child wrappers) with three or
    more parameter-holding modules besides the output head; the one holding the input
    embeddings is the llm, the largest other the vision encoder, the rest the projector.
    None where there is no such level (Fuyu: patch embeddings + LLM only)."""
    head = output_head_path(model)
    emb = _path_of(model, _input_embeddings(model))
    prefix, node = "", model
    while True:
        kids = [(prefix + n, c) for n, c in node.named_children() if _has_params(c) and prefix + n != head]
        if len(kids) != 1:
            break
        prefix, node = kids[0][0] + ".", kids[0][1]
    llm = next((p for p, _ in kids if emb and _inside(emb, p)), None)
    if len(kids) < 3 or llm is None:
        return None
    rest = [(p, c) for p, c in kids if p != llm]
    vision = max(rest, key=lambda pc: sum(x.numel() for x in pc[1].parameters()))[0]
    return {"vision": [vision], "projector": [p for p, _ in rest if p != vision], "llm": [llm]}


def parts_key(where: str) -> str:
    """`models[0].parts` where the model comes from a config, else `models[].parts`."""
    return f"{where}.parts" if where.startswith("models[") else "models[].parts"


def format_parts(parts: Mapping[str, Sequence[str]]) -> str:
    """{vision: a, projector: [b, c], llm: d}: the YAML flow mapping to paste into a config."""
    def one(v: Sequence[str]) -> str:
        return v[0] if len(v) == 1 else "[" + ", ".join(v) + "]"
    return "{" + ", ".join(f"{p}: {one(parts[p])}" for p in ("vision", "projector", "llm") if parts.get(p)) + "}"


def parts_fix(model: nn.Module, where: str) -> str:
    """The fix for a model whose parts inspection could not tell apart: the exact
    `models[].parts` to write (suggested from its modules), or "" without a suggestion."""
    guess = suggest_parts(model)
    if guess is None:
        return ""
    return (f"name them in the config: {parts_key(where)}: {format_parts(guess)} (module paths; suggested from its top-level modules, "
            "`vlmtune inspect` lists them), or use training_mode: both (trains the whole model)")


def named_parts(model: nn.Module, found: dict[str, list[str]], unresolved: str, named: Mapping[str, Sequence[str]],
                where: str) -> dict[str, list[str]]:
    """Part roots with the config's `models[].parts` applied: each named part replaces what the
    family or inspection found for it; the others keep theirs -- unless inspection could not
    tell the parts apart, then all three must be named. The output head joins the llm when
    no named root contains it. Every path must exist in `model` (else one line listing close
    module names), and no path may be named for two parts."""
    key = parts_key(where)
    modules = {n for n, _ in model.named_modules() if n}
    params = {n for n, _ in model.named_parameters()}
    owner: dict[str, str] = {}
    for part, paths in named.items():
        for p in paths:
            if p not in modules and p not in params:
                near = difflib.get_close_matches(p, sorted(modules), n=5, cutoff=0.5)
                top = [n for n, c in model.named_children() if _has_params(c)]
                hint = f"close module names: {', '.join(near)}" if near else f"its top-level modules: {', '.join(top)}"
                raise UserError(f"{key}.{part}", f"{type(model).__name__} has no module {p!r}", f"{hint} (vlmtune inspect lists the parts it found)")
            if p in owner and owner[p] != part:
                raise UserError(f"{key}.{part}", f"{p!r} is named for both {owner[p]} and {part}", "give each module path to one part")
            owner[p] = part
    if unresolved:
        missing = [p for p in ("vision", "projector", "llm") if p not in named]
        if missing:
            guess = suggest_parts(model) or {}
            example = format_parts({p: guess[p] for p in missing if p in guess}) if any(p in guess for p in missing) else "{" + ", ".join(f"{p}: <module path>" for p in missing) + "}"
            raise UserError(key, f"names {', '.join(named)} but not {', '.join(missing)}, and inspection could not find the parts ({unresolved})",
                            f"name all three; add {example}")
        roots: dict[str, list[str]] = {p: [] for p in ("vision", "projector", "llm")}
    else:
        roots = {p: list(v) for p, v in found.items()}
    roots.update({p: list(v) for p, v in named.items()})
    head = output_head_path(model)
    if head and not any(_inside(head, r) for rs in roots.values() for r in rs):
        roots["llm"] = [*roots.get("llm", []), head]
    covered = [r for rs in roots.values() for r in rs]
    loose = [n for n, c in model.named_children() if _has_params(c) and not any(_inside(r, n) or _inside(n, r) for r in covered)]
    if loose:
        log.warning("%s: %s belong(s) to no part and stay frozen whatever trains; name them in %s to train them", where, ", ".join(loose), key)
    return roots
