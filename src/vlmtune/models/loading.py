"""Load a model + processor from a hub id, a local directory or `tiny:<family>`.

One code path for all three: `tiny:` ids are built and saved locally first, then loaded
from that directory exactly like a user's checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..config import ModelConfig, VisualEncoderSettings
from ..errors import UserError
from .families import PACKING_BACKENDS, PART_NAMES, Family, PartMap, find_family, resolve_parts
from .generic import named_parts, output_head_path, parts_fix
from .processors import has_torchvision, image_only
from .tiny import is_tiny, tiny_dir

log = logging.getLogger("vlmtune")


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    family: Optional[Family]
    parts: PartMap
    path: str
    """Where the base weights come from (a local dir for tiny models): adapters point here."""
    newly_initialized: list[str] = field(default_factory=list)
    """Parameter names the checkpoint did not contain (random init)."""
    config: Optional[ModelConfig] = None
    """The model config it was loaded with (to load the same base again, e.g. unquantized)."""
    quant_bits: Optional[int] = None
    """4 or 8 when the LLM's linear layers are bitsandbytes-quantized, else None."""

    @property
    def family_name(self) -> str:
        return self.family.name if self.family else "generic"


def resolve_model_path(model_id: str) -> str:
    if is_tiny(model_id):
        return str(tiny_dir(model_id))
    return model_id


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@contextlib.contextmanager
def _quiet_transformers(enabled: bool):
    """Silence transformers' per-weight init warnings while loading (we summarise them); with
    `enabled` false, show transformers' own load report even where the CLI quieted
    transformers (it sets its verbosity to errors for everything else)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error() if enabled else hf_logging.set_verbosity(min(old, hf_logging.WARNING))
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _hf_config(path: str, mcfg: ModelConfig, where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        local = Path(path).exists()
        msg = str(e).splitlines()[0][:200]
        if "trust_remote_code" in str(e):
            raise UserError(where, f"{path!r} needs its own Python code to load", "set trust_remote_code: true on this model if you trust the repository") from None
        if local:
            raise UserError(where, f"{path!r} is not a loadable model directory ({msg})", "point hf_model_id at a folder with config.json") from None
        raise UserError(where, f"model {path!r} not found locally and could not be fetched ({msg})", "check the id, download it first, or use a local path or tiny:<family>") from None


# Auto classes a checkpoint may load through, in this order: the first that knows its config
# natively (image-text-to-text only: native configs outside it are text-only or contrastive
# models) or -- with trust_remote_code -- through the repository's own code named in the
# config's `auto_map` (InternVL: AutoModel / AutoModelForCausalLM; DeepSeek-OCR: AutoModel).
# Names this transformers lacks (AutoModelForVision2Seq, gone in 5.x) are skipped.
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM", "AutoModel")


def model_auto_class(hf_cfg: Any, mcfg: ModelConfig, path: str, where: str) -> type:
    """The transformers auto class that loads this checkpoint (see `AUTO_CLASSES`); a
    `UserError` when none can: remote code without `trust_remote_code: true`, an `auto_map`
    naming only other auto classes, or a model that is not image-text-to-text."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    auto_map = getattr(hf_cfg, "auto_map", None) or {}
    remote = [k for k in auto_map if k.startswith("AutoModel")]
    classes = [getattr(transformers, n) for n in AUTO_CLASSES if hasattr(transformers, n)]
    for cls in classes:
        if mcfg.trust_remote_code and cls.__name__ in auto_map:
            return cls
        if cls.__name__ == "AutoModelForImageTextToText" and type(hf_cfg) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            return cls
    if remote and not mcfg.trust_remote_code:
        raise UserError(where, f"{path!r} loads only through its own Python code ({', '.join(remote)} in its config's auto_map)",
                        "set trust_remote_code: true on this model if you trust the repository")
    if remote:
        raise UserError(where, f"{path!r} maps its code only to {', '.join(remote)} (config auto_map), none of which vlmtune loads with this transformers",
                        f"vlmtune tries {', '.join(c.__name__ for c in classes)}; use a checkpoint or revision whose auto_map names one of them")
    raise UserError(where, f"{path!r} ({hf_cfg.model_type}) is not an image-text-to-text model", "use a vision-language checkpoint")


def model_parts(model: nn.Module, family: Optional[Family], mcfg: ModelConfig, where: str, quiet: bool = False) -> PartMap:
    """The model's parts: the family's or inspection's, with `models[].parts` applied; where
    they cannot be told apart and the config names none, the `PartMap.fix` says what to write."""
    parts = resolve_parts(model, family)
    if mcfg.parts:
        return PartMap(named_parts(model, parts.roots, parts.unresolved, mcfg.parts, where), found_by="config")
    if parts.unresolved:
        parts.fix = parts_fix(model, where)
        if parts.fix and not quiet:
            log.warning("%s: %s: the parts could not be told apart: %s. To train them separately, %s", where, type(model).__name__, parts.unresolved, parts.fix)
    return parts


def load_processor(path: str, family: Optional[Family], mcfg: ModelConfig, where: str = "model"):
    """The family's processor, image-only where its transformers class needs torchvision."""
    from transformers import AutoProcessor, ProcessorMixin

    size_kwargs = family.image_processor_kwargs(mcfg.min_pixels, mcfg.max_pixels) if family else {}
    if family is not None and family.needs_video_processor and not has_torchvision():
        # AutoProcessor would hand back only the tokenizer here; build the image-only class.
        proc = image_only(family.processor_class()).from_pretrained(path)
    else:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)
    if not isinstance(proc, ProcessorMixin) or getattr(proc, "image_processor", None) is None:
        if mcfg.trust_remote_code:  # remote-code VLMs often ship only a tokenizer and preprocess images in their own code
            raise UserError(where, f"{path!r} has no transformers processor with an image processor (got {type(proc).__name__})",
                            "vlmtune needs one that expands an image token in the text (e.g. LlavaProcessor with the model's image size and token count, "
                            "and a chat template): save it with save_pretrained beside the weights (docs/remote-code.md)")
        raise UserError(where, f"{path!r} has no image processor (got {type(proc).__name__})", "is this a vision-language model? set model_type to its family")
    if size_kwargs:
        # Qwen-VL dynamic resolution: bound the pixel count (seed: 224*224) so the number of
        # image tokens -- and memory -- stays predictable.
        ip = proc.image_processor
        ip.size = dict(size_kwargs["size"])
        for k, v in (("min_pixels", size_kwargs["size"]["shortest_edge"]), ("max_pixels", size_kwargs["size"]["longest_edge"])):
            if hasattr(ip, k):
                setattr(ip, k, v)
    if mcfg.image_processor:
        # User overrides of the image-size controls (tile size, splitting, resize bounds):
        # only keys the image processor already has, so a typo cannot pass silently.
        ip = proc.image_processor
        for k, v in mcfg.image_processor.items():
            if not hasattr(ip, k):
                known = sorted(a for a in vars(ip) if not a.startswith("_"))
                raise UserError(f"{where}.image_processor.{k}", f"{type(ip).__name__} has no setting {k!r}", f"known settings: {', '.join(known)}")
            setattr(ip, k, v)
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc


def load_model(
    mcfg: ModelConfig,
    ve: Optional[VisualEncoderSettings] = None,
    where: str = "model",
    device_map: Optional[str] = None,
    full_precision_parts: Sequence[str] = (),
    packing: bool = False,
) -> LoadedModel:
    """Load `mcfg.hf_model_id` for training or generation.

    Reports (log) how many weights were newly initialized and in which parts; with
    `improve_initialization` re-initialises exactly those weights (Xavier-uniform).

    With `load_in_4bit`/`load_in_8bit` only the LLM's linear layers are quantized: the vision
    encoder, the projector, the LM head and every part named in `full_precision_parts` (the
    parts the run trains `full`) load in full precision (see `full_precision_roots`). A
    quantized part cannot train fully, so `"llm"` there is refused with a `UserError`.

    `packing` (a padding-free training run): without an `attn_implementation` of the user's,
    flash attention's varlen kernels where they can keep packed samples apart (see
    `packing_attention`); transformers' default (sdpa) otherwise.
    """
    ve = ve or VisualEncoderSettings()
    path = resolve_model_path(mcfg.hf_model_id)
    hf_cfg = _hf_config(path, mcfg, where)
    family = find_family(mcfg.model_type, getattr(hf_cfg, "model_type", None), f"{where}.model_type")
    model_auto_class(hf_cfg, mcfg, path, where)  # refuse a model no auto class loads before the checks below
    dtype = pick_dtype(mcfg.torch_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    elif packing and (impl := packing_attention(hf_cfg, family, dtype)):
        kwargs["attn_implementation"] = impl
        log.info("%s: training.packing: %s (packed samples kept apart by their position ids)", where, impl)
    bits = quantization_bits(mcfg, where)
    keep: list[str] = []
    if bits:
        keep = full_precision_roots(hf_cfg, mcfg, family, full_precision_parts, where, bits)
        kwargs["quantization_config"] = bnb_config(bits, dtype, keep)
        kwargs["device_map"] = device_map or ("auto" if torch.cuda.is_available() else "cpu")
    elif device_map:
        kwargs["device_map"] = device_map
    with _quiet_transformers(ve.suppress_init_warnings):
        model, info = load_pretrained(path, mcfg, where, hf_cfg, **kwargs)
    parts = model_parts(model, family, mcfg, where)
    if bits:
        check_quantized(model, keep, bits)
        keep_trainable_layout(model)
    missing = sorted(set(info.get("missing_keys", [])))
    if missing:
        _report_new_weights(model, parts, missing, ve)
    processor = load_processor(path, family, mcfg, where)
    return LoadedModel(model=model, processor=processor, family=family, parts=parts, path=path, newly_initialized=missing,
                       config=mcfg, quant_bits=bits)


def load_pretrained(path: str, mcfg: ModelConfig, where: str, hf_cfg: Any = None, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(model, transformers' loading info) of the weights in `path`, through the auto class
    `model_auto_class` picks, with the repository's own code when `mcfg.trust_remote_code`.
    `kwargs` go to `from_pretrained` (dtype, quantization, device map). The one way vlmtune
    loads weights: `load_model`, and a whole-model checkpoint read back on resume
    (train/checkpointing.py), which must load a remote-code model as its first load did."""
    hf_cfg = hf_cfg if hf_cfg is not None else _hf_config(path, mcfg, where)
    auto_class = model_auto_class(hf_cfg, mcfg, path, where)
    # Weights load from safetensors only: a pickle (.bin/.pt) can run code when unpickled.
    kwargs = {"trust_remote_code": mcfg.trust_remote_code, "output_loading_info": True, "use_safetensors": True, **kwargs}
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as e:
        if "safetensors" in str(e) or ".bin" in str(e):
            raise UserError(where, f"{path!r} has no safetensors weights (vlmtune does not load pickled .bin/.pt weights: unpickling can run code)",
                            "convert the checkpoint to safetensors (transformers' save_pretrained writes them) or use a repository that ships them") from None
        raise
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError(where, f"{path!r} ({hf_cfg.model_type}) is not an image-text-to-text model", "use a vision-language checkpoint") from None
        raise


def runs_remote_code(model: nn.Module) -> bool:
    """Whether `model` is a repository's own code (loaded with `trust_remote_code: true`):
    transformers imports such classes into its `transformers_modules` package. Looks through
    the class's bases: FSDP2 (`fully_shard`) swaps in a subclass defined in torch."""
    return any(c.__module__.split(".")[0] == "transformers_modules" for c in type(model).__mro__)


def packing_attention(hf_cfg: Any, family: Optional[Family], dtype: torch.dtype) -> Optional[str]:
    """"flash_attention_2" for a packed run when it can keep packed samples apart: on CUDA
    with `flash_attn` installed, half-precision weights, a family that packs by position ids
    (flash's varlen kernels take the sample boundaries from them) and a model class that
    supports it (PaliGemma, Gemma3 and BLIP-2 declare they do not: their masks are not plain
    causal). None: transformers' default (sdpa, which packs through masks)."""
    if family is None or "flash_attention_2" not in PACKING_BACKENDS.get(family.packing or "", ()) or dtype not in (torch.float16, torch.bfloat16):
        return None
    if not torch.cuda.is_available():
        return None
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        cls = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(hf_cfg)]
    except KeyError:
        return None
    return "flash_attention_2" if getattr(cls, "_supports_flash_attn", False) else None


def merge_adapter_full_precision(
    lm: LoadedModel,
    adapter_dir: "str | os.PathLike[str]",
    ve: Optional[VisualEncoderSettings] = None,
    device_map: Optional[str] = "cpu",
) -> nn.Module:
    """The LoRA adapter in `adapter_dir` merged into the *unquantized* base of `lm`.

    `final/` of a QLoRA run. Merging into the 4/8-bit weights instead would requantize W + BA:
    a trained LoRA delta is mostly smaller than one NF4 step, so it would be rounded away, and
    the result would load only with bitsandbytes. This is what `lora_adapter/` on the
    full-precision base gives with plain peft. `device_map="cpu"` by default: the quantized
    training model may still occupy the accelerator.
    """
    from peft import PeftModel

    if lm.config is None:
        raise ValueError("merge_adapter_full_precision needs a LoadedModel from load_model (its config is unknown)")
    mcfg = dataclasses.replace(lm.config, load_in_4bit=False, load_in_8bit=False)
    base = load_model(mcfg, ve, where=mcfg.name or "model", device_map=device_map)
    return PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()


QUANT_KEYS = {4: "load_in_4bit", 8: "load_in_8bit"}


def quantization_bits(mcfg: ModelConfig, where: str = "model") -> Optional[int]:
    """4, 8 or None (full precision) from `load_in_4bit` / `load_in_8bit`; both set is refused."""
    four, eight = bool(mcfg.load_in_4bit), bool(mcfg.load_in_8bit)
    if four and eight:
        raise UserError(f"{where}.load_in_8bit", "load_in_4bit and load_in_8bit are both true", "set only one of them (load_in_4bit for QLoRA)")
    return 4 if four else 8 if eight else None


def full_precision_roots(
    hf_cfg: Any,
    mcfg: ModelConfig,
    family: Optional[Family],
    full_precision_parts: Sequence[str],
    where: str,
    bits: int,
) -> list[str]:
    """Module paths (from the top-level model) that a quantized load keeps in full precision.

    Everything but the LLM's linear layers: the vision encoder and projector roots (small next
    to the LLM, and the projector trains in every mode), the output head (quantizing it costs
    accuracy; when tied to the input embeddings it cannot be quantized at all) and any weight
    tied to another, plus the roots of every part in `full_precision_parts`. The roots come
    from the family's (or the generic inspection's) PartMap of this very architecture, built on
    the meta device from the config before any weight loads -- no hard-coded module names, and
    no allocation however large the model.
    """
    key = f"{where}.{QUANT_KEYS[bits]}"
    unknown = set(full_precision_parts) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"full_precision_parts: unknown part(s) {sorted(unknown)}; parts are {PART_NAMES}")
    if "llm" in full_precision_parts:
        raise UserError(key, f"{bits}-bit quantizes the LLM, which this run trains fully (training.parts.llm.train: full), and quantized weights cannot train",
                        f"train the llm with lora (QLoRA) or set {QUANT_KEYS[bits]}: false")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(key, "bitsandbytes is not installed", "pip install 'vlmtune[quant]'") from None
    with torch.device("meta"):
        skeleton = model_auto_class(hf_cfg, mcfg, str(getattr(hf_cfg, "_name_or_path", "")), where).from_config(hf_cfg, trust_remote_code=mcfg.trust_remote_code)
    parts = model_parts(skeleton, family, mcfg, where, quiet=True)
    roots = [r for p in ("vision", "projector", *full_precision_parts) for r in parts.roots.get(p, [])]
    head = output_head_path(skeleton)
    if head:
        roots.append(head)
    # A weight shared by two modules (tied embeddings) must keep one dtype for both.
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    roots += [k.removesuffix(".weight") for pair in tied.items() for k in pair]
    modules = dict(skeleton.named_modules())
    # Bare-parameter roots (BLIP-2's query_tokens) are never quantized: only modules matter.
    return sorted({r for r in roots if r in modules and r})


def skip_patterns(roots: Sequence[str]) -> list[str]:
    """`llm_int8_skip_modules` entries that match each root and its descendants, nothing else.

    transformers (5.x, `quantizers_utils.should_convert_module`) skips a module when a pattern
    matches its full name *as a regex from the start, up to a module boundary*, or when the
    name merely *ends with* the pattern. A plain `visual` therefore skips the container
    `model.visual` but none of the linears inside it, and `lm_head` would also skip any
    `*.lm_head` elsewhere. `^` + the escaped path leaves only the anchored-prefix rule: a name
    never contains `^`, so the suffix rule cannot fire, and escaped dots are literal.
    """
    return ["^" + re.escape(r) for r in roots]


def bnb_config(bits: int, dtype: torch.dtype, keep: Sequence[str]) -> Any:
    """bitsandbytes config quantizing every linear layer outside the `keep` roots."""
    from transformers import BitsAndBytesConfig

    skip = skip_patterns(keep)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def is_quantized_module(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def check_quantized(model: nn.Module, keep: Sequence[str], bits: int) -> None:
    """Guard the promise of a quantized load: nothing under a kept root is quantized (a bug,
    raised), and something is (else a warning). A transformers change in how skip patterns
    match would otherwise quantize the projector silently, to fail only when it trains."""
    quantized = [n for n, m in model.named_modules() if is_quantized_module(m)]
    wrong = [n for n in quantized if any(n == r or n.startswith(r + ".") for r in keep)]
    if wrong:
        raise RuntimeError(f"{bits}-bit load quantized {wrong[0]} (and {len(wrong) - 1} more) inside a full-precision part; please report it")
    if not quantized:
        log.warning("%d-bit load: no linear layer of the LLM could be quantized; the model runs in full precision", bits)
    else:
        log.info("%d-bit load: %d LLM linear layers quantized; kept in full precision: %s", bits, len(quantized), ", ".join(keep))


def keep_trainable_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference-only layout.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode on an input without grad (any
    evaluation, sanity or generation pass under `torch.no_grad()`) rewrites its weight *in
    place and for good* into a packed layout served by `gemv_4bit`, which has no autograd:
    every later training forward then fails on a layer with a bias ("a view of a leaf Variable
    that requires grad is being used in an in-place operation") or, without a bias, silently
    gets a wrong gradient through that layer (no autograd formula). Turning the fast path off keeps one layout for
    training and evaluation alike (and the same numerics in both). Returns how many layers.
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _report_new_weights(model: nn.Module, parts: PartMap, missing: list[str], ve: VisualEncoderSettings) -> None:
    params = dict(model.named_parameters())
    by_part: dict[str, list[str]] = {}
    for name in missing:
        by_part.setdefault(parts.part_of(name), []).append(name)
    summary = ", ".join(
        f"{part}: {len(names)} tensors / {sum(params[n].numel() for n in names if n in params):,} params" for part, names in sorted(by_part.items())
    )
    action = "re-initialised with Xavier-uniform (improve_initialization: true)" if ve.improve_initialization else "left at the model's default random init"
    log.warning(
        "%d weights were newly initialized (%s): the checkpoint does not contain them, so they start random and "
        "must be trained before the model is useful -- normal for a projector or head added on top of pretrained parts, "
        "a problem if you expected a finished model. They were %s.",
        len(missing), summary, action,
    )
    if ve.improve_initialization:
        xavier_reinit(model, missing)


@torch.no_grad()
def xavier_reinit(model: nn.Module, names: list[str]) -> None:
    """Xavier-uniform for matrices, zero for biases, one for other vectors (norm scales)."""
    params = dict(model.named_parameters())
    for n in names:
        p = params.get(n)
        if p is None:
            continue
        if p.dim() >= 2:
            nn.init.xavier_uniform_(p)
        elif n.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def load_processor_only(mcfg: ModelConfig, where: str = "model") -> tuple[Any, Optional[Family]]:
    """Processor and family without loading weights (preview, token counting)."""
    path = resolve_model_path(mcfg.hf_model_id)
    hf_cfg = _hf_config(path, mcfg, where)
    family = find_family(mcfg.model_type, getattr(hf_cfg, "model_type", None), f"{where}.model_type")
    return load_processor(path, family, mcfg, where), family
