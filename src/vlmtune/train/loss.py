"""The training loss: mean over every supervised token of an optimizer step.

transformers' Trainer gets this right only for models that take `num_items_in_batch` through
`**kwargs` into their own loss. Several VLM classes declare `accepts_loss_kwargs = False`
(Qwen2.5-VL among them), and then each micro-batch is averaged on its own and divided by
the accumulation count. Micro-batches that hold different numbers of answer tokens are then
weighted unequally, and so are the ranks of a multi-process job. `TokenMeanLossMixin` hands
the Trainer a `compute_loss_func`, its documented hook for this. The Trainer then counts the
supervised tokens of the whole step (across micro-batches and, with
`average_tokens_across_devices`, across ranks), pops the labels so the model skips its own
loss, and takes our sum / count.

The lean loss (issue #15; `training.lean_loss`, default on) gives the same number without ever
holding full-vocabulary logits for every position (Qwen: 152k x 4 bytes per position):

- `keep` [B, T] bool: position t predicts labels[:, t+1], so keep[:, t] = labels[:, t+1] != -100
  (last column False). Targets = labels[:, 1:][keep[:, :-1]] -> [N], N supervised tokens.
- The output head (`get_output_embeddings()`, a plain `nn.Linear` [V, H]) runs as identity
  for one forward and records its input, so the model's "logits" are hidden states: [N, H]
  when the forward takes `logits_to_keep=keep` (transformers' 2-D bool form), else [B, T, H],
  which we index with `keep`. Every family keeps its own forward (image injection, M-RoPE).
- The loss sum is computed `loss_chunk_size` rows at a time: F.linear(h, W, b) -> [c, V],
  softcapping when the model applies it, cross-entropy (sum) in float32, with the chunk's
  gradients computed right there (`_FusedLinearCrossEntropy`, Liger's scheme in plain torch):
  one chunk's logits are alive at a time and the head's weight gradient is one buffer.
  On CUDA with `liger_kernel` installed, Liger's fused linear cross-entropy does it instead.
- The division stays as before: sum / `num_items_in_batch` (the Trainer's count over the
  whole step: micro-batches and, with `average_tokens_across_devices`, ranks; times the
  number of processes, as `Trainer.compute_loss` ends), or / N without a count.

Why the sum is computed in a forward hook on the top-level module (`prepend=True`), inside
the model's forward: DDP (find_unused_parameters) marks as unused every parameter the
forward's outputs do not reach, so a head weight used only after DDP.forward returned gets
"marked ready twice"; FSDP2 (`fully_shard`) has the root's parameters unsharded only between
its pre- and post-forward hooks, and prepend puts ours before its post-forward. The hook
returns the output with `loss` = the sum and without the hidden-state "logits".

Softcapping is found from the model, not from a family list: the config's
`final_logit_softcapping` is a candidate only, applied when the model turns a constant stand-in
for its logits into the capped constant (PaliGemma-2 caps; Gemma3ForConditionalGeneration
carries the key and does not); found on a model's first lean forward, remembered after. Any other post-processing of the logits, or a head called twice, is an error, never a
silently different loss. Full logits (`token_mean_loss`, one info line) when the lean path
cannot be exact: a head that is not a plain Linear (peft `modules_to_save` or LoRA on a head
that trains), an encoder-decoder model, DeepSpeed ZeRO-3 or accelerate device-map hooks on the
head, sequence/context parallelism; and, silently, when evaluation needs logits for
`compute_metrics`.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX

log = logging.getLogger("vlmtune")


def token_mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor | int] = None) -> torch.Tensor:
    """Causal-LM cross-entropy: logits [B, T, V] at position t predict labels [B, T] at t+1;
    -100 labels are ignored. Summed and divided by `num_items_in_batch` (the supervised
    tokens of the whole step) when given, else averaged over this batch's supervised tokens."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:  # not a language model: a model that returns only its own loss keeps it
        return outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """keep [B, T] bool: True at t iff labels[:, t+1] != -100 (position t predicts token t+1);
    the last column is False. `labels[:, 1:][keep[:, :-1]]` are then the targets [N], in the
    row-major order in which `hidden[keep]` ([B, T, H] -> [N, H]) lists the positions."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  softcap: Optional[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's own order: head, softcap in the head's dtype (the fp32 upcast of
    ForCausalLMLoss comes after), so a bf16 model gets the numbers of its full-logits loss.
    Returns (logits [c, V] in the compute dtype, tanh(z / cap) [c, V] or None)."""
    z = F.linear(hidden, weight, bias)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


@lru_cache(maxsize=1)
def _liger_flce() -> Optional[Callable[..., Any]]:
    """Liger's fused linear cross-entropy, or None when it is not installed (or does not
    import here, e.g. without triton): the torch path then, without a word."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return None
    return liger_fused_linear_cross_entropy


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) computes in: autocast's when it is on (the head's
    autocast state is restored around the loss, see _LeanForward), else the weight's."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(hidden_i @ W.T + b), targets_i) with the gradients computed in the
    forward, one chunk of rows at a time, as Liger's fused kernel does, in plain torch.

    Why in the forward: the loss is the end of the graph, so its gradients are known there up
    to the scalar grad_output. Per chunk [c, V]: logits -> softmax - onehot (in place, fp32)
    -> grad_hidden[c] = g @ W, grad_W += g.T @ h (one [V, H] buffer for all chunks, the size
    of the head's own gradient), grad_b += g.sum(0). Backward only scales them. Against
    checkpointing each chunk and letting autograd differentiate it, this holds one [V, H]
    gradient instead of two (autograd builds each chunk's weight gradient, then adds it to
    the running sum; 145 MiB each for Qwen's 152k x 256 head in the bench) and runs three
    matmuls per chunk instead of four (no recomputed logits)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                chunk_size: int, softcap: Optional[float]) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cdt = _compute_dtype(hidden, weight)
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        # explicit casts with autocast off: the in-place accumulation below cannot run under
        # autocast, and these are the casts autocast would make (bf16 matmuls, as the full path)
        w_c = weight.to(cdt)
        b_c = bias.to(cdt) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                h, t = hidden[s:s + chunk_size].to(cdt), targets[s:s + chunk_size]
                logits, tanh = _chunk_logits(h, w_c, b_c, softcap)
                g = logits.float()  # the same tensor when already fp32: it is not needed after this
                del logits
                lse = torch.logsumexp(g, dim=-1)
                total += (lse - g.gather(1, t[:, None]).squeeze(1)).sum()
                # d(sum CE)/d logits = softmax - onehot, computed in place
                g.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
                if tanh is not None:  # d(cap * tanh(z / cap))/dz = 1 - tanh^2
                    g.mul_(1.0 - tanh.float().square())
                del tanh
                g = g.to(cdt)  # what autograd's backward of .float() hands the head
                if need_h:
                    grad_h[s:s + chunk_size] = g @ w_c
                if need_w:
                    if cdt == weight.dtype:
                        grad_w.addmm_(g.t(), h)
                    else:  # bf16 product, accumulated in the parameter's dtype (as autograd sums chunks)
                        grad_w += g.t() @ h
                if need_b:
                    grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        if ctx.grads is None:
            raise RuntimeError("lean loss: backward ran twice through the same loss (retain_graph); set training.lean_loss: false")
        # released here, not kept on ctx: a gradient nobody else references is taken over by
        # AccumulateGrad (or summed in place with a tied embedding's) instead of copied
        grads, ctx.grads = ctx.grads, None
        out = tuple(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads)
        return out + (None, None, None)


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   chunk_size: int, softcap: Optional[float] = None) -> torch.Tensor:
    """Sum over the N rows of cross-entropy(softcap(hidden @ weight.T + bias), targets), a
    float32 scalar. hidden [N, H], weight [V, H], bias [V] or None, targets [N] (no -100).

    Peak memory is one chunk's logits (chunk_size x V, float32) plus, when the head trains,
    one [V, H] gradient buffer (see _FusedLinearCrossEntropy). On CUDA, Liger's fused kernel
    when installed."""
    n = hidden.shape[0]
    if n and hidden.is_cuda and torch.cuda.is_available():
        flce = _liger_flce()
        if flce is not None:
            out = flce(hidden, weight, targets, bias=bias, reduction="sum", softcap=softcap)
            out = getattr(out, "loss", out)  # newer Liger returns a dataclass, some versions a tuple
            return (out[0] if isinstance(out, tuple) else out).float()
    if n == 0:  # a batch without a supervised token: 0, still tied to the graph (backward and DDP expect one)
        return hidden.sum().float() * 0.0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, softcap)
    total: Optional[torch.Tensor] = None  # no gradient wanted (evaluation): the loss only
    for s in range(0, n, chunk_size):
        logits, _ = _chunk_logits(hidden[s:s + chunk_size], weight, bias, softcap)
        part = F.cross_entropy(logits.float(), targets[s:s + chunk_size], reduction="sum")
        total = part if total is None else total + part
    return total


def _configs(config: Any) -> list[Any]:
    """The model's config and its text config (a VLM's language-model settings)."""
    if config is None:
        return []
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else None
    return [config] + ([text] if text is not None and text is not config else [])


def _base_model(top: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or `top` itself)."""
    get_base = getattr(top, "get_base_model", None)
    return get_base() if callable(get_base) else top


@lru_cache(maxsize=64)
def _named_forward_params(cls: type) -> frozenset[str]:
    """Parameters the class's forward names explicitly (not what **kwargs might swallow)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def lean_loss_unsupported(top: nn.Module) -> Optional[str]:
    """Why the lean loss cannot be exact for `top` (the unwrapped model: a PreTrainedModel or a
    peft model), or None when it can."""
    get_head = getattr(top, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return "the model has no output head (get_output_embeddings)"
    if type(head) is not nn.Linear:  # exact type: LoRA / modules_to_save / bitsandbytes / FSDP-wrapped heads compute more than F.linear(W, b)
        return f"its output head is a {type(head).__name__}, not a plain Linear (e.g. a head that trains through peft)"
    if getattr(head, "_hf_hook", None) is not None:
        return "its output head runs under accelerate's device-map hooks"
    if "forward" in head.__dict__:  # someone patched this head's forward: F.linear may not be what it computes
        return "its output head's forward is patched"
    if hasattr(head.weight, "ds_id"):
        return "DeepSpeed ZeRO-3 partitions the output head outside its own forward"
    base = _base_model(top)
    configs = _configs(getattr(base, "config", None))
    # BLIP-2 on T5: the top config says use_decoder_only_language_model False, the text config is_encoder_decoder
    if any(getattr(c, "is_encoder_decoder", False) or getattr(c, "use_decoder_only_language_model", True) is False for c in configs):
        return "it is an encoder-decoder model (its labels feed a decoder, not a causal shift)"
    return None


# What each model does after its head, per softcap candidate: {candidate: the cap it applies
# (or None)}. Found once with a probe (_LeanForward), then trusted: it is code, not data.
_POST_HEAD: "weakref.WeakKeyDictionary[nn.Module, dict[Optional[float], Optional[float]]]" = weakref.WeakKeyDictionary()


class _LeanForward:
    """Arms one forward of `top`: the head records its input and returns a stand-in, and a
    forward hook on `top` turns the recorded hidden states into the loss sum inside that
    forward (see the module docstring for why inside).

    The stand-in is how softcapping is found, the first time only (`known` is the answer
    after that): a constant tensor of the hidden states' shape, value `cap` (the config's
    candidate, else 1). What the model's forward returns as "logits" is then that constant
    untouched or upcast (no cap), cap * tanh(1) (the cap applied), or anything else (refused).
    A constant makes the answer exact whatever the hidden states are: bf16 states below ~3
    are their own cap * tanh(h / cap) at cap 30, so comparing with them could miss the cap."""

    def __init__(self, top: nn.Module, head: nn.Linear, keep: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                 softcap: Optional[float], known: Optional[tuple[Optional[float]]] = None):
        self.top, self.head, self.keep, self.targets = top, head, keep, targets
        self.chunk_size, self.softcap, self.known = chunk_size, softcap, known
        self.hidden: Optional[torch.Tensor] = None
        self.probe: Optional[torch.Tensor] = None
        self.calls = 0
        self.applied: Optional[float] = None
        self.autocast: tuple[str, bool, Optional[torch.dtype]] = ("cpu", False, None)

    def _identity(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.hidden = x
        # the head would have run under this autocast state; our hook runs outside it when
        # accelerate wraps the model's forward (mixed precision), so it is restored there:
        # same logits dtype (bf16 matmul, as the full path) and speed
        dev = x.device.type
        on = torch.is_autocast_enabled(dev)
        self.autocast = (dev, on, torch.get_autocast_dtype(dev) if on else None)
        if self.known is not None:
            return x
        self.probe = torch.full_like(x, self.softcap if self.softcap is not None else 1.0)
        return self.probe

    def __enter__(self) -> "_LeanForward":
        # an instance attribute shadows nn.Linear.forward; the module's own hooks still run
        self.head.forward = self._identity
        self.handle = self.top.register_forward_hook(self._hook, prepend=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        self.head.__dict__.pop("forward", None)
        self.hidden = self.probe = None

    def _applied_softcap(self, out: Any) -> Optional[float]:
        """What the model did to the probe after the head: nothing (None) or the config's
        softcap (its value). Anything else is refused."""
        probe, cap = self.probe, self.softcap
        if out is probe:
            return None
        if isinstance(out, torch.Tensor) and probe is not None and out.shape == probe.shape:
            if torch.equal(out, probe.to(out.dtype)):  # an upcast only
                return None
            if cap is not None:
                capped = torch.tanh(probe.float() / cap) * cap  # cap * tanh(1), 24% below the probe
                if torch.allclose(out.float(), capped, rtol=1e-2, atol=0.0):
                    return cap
        raise RuntimeError(
            f"lean loss: {type(_base_model(self.top)).__name__} post-processes its logits in a way the lean loss does not "
            "reproduce (not the config's final_logit_softcapping); set training.lean_loss: false")

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        h = self.hidden
        self.hidden = None  # nothing of this forward outlives it here
        if self.calls != 1 or h is None:
            raise RuntimeError(f"lean loss: the output head ran {self.calls} times in one forward (expected once); "
                               "set training.lean_loss: false")
        if not isinstance(output, dict) or "logits" not in output:
            raise RuntimeError("lean loss: the model returned no logits; set training.lean_loss: false")
        softcap = self.known[0] if self.known is not None else self._applied_softcap(output["logits"])
        self.applied, self.probe = softcap, None
        if h.dim() == 3 and h.shape[:2] == self.keep.shape:  # the forward took no logits_to_keep: pick the rows here
            h = h[self.keep.to(h.device)]
        if h.dim() != 2 or h.shape[0] != self.targets.shape[0]:
            raise RuntimeError(f"lean loss: the head saw hidden states {tuple(h.shape)}, expected [{self.targets.shape[0]}, H] "
                               f"or {list(self.keep.shape)} + [H]; set training.lean_loss: false")
        dev, on, dtype = self.autocast
        with torch.autocast(dev, dtype=dtype, enabled=on) if on else torch.autocast(dev, enabled=False):
            total = chunked_ce_sum(h, self.head.weight, self.head.bias, self.targets.to(h.device), self.chunk_size, softcap)
        rest = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=total, **rest)


def lean_forward(model: nn.Module, top: nn.Module, inputs: dict[str, Any], labels: torch.Tensor,
                 chunk_size: int) -> tuple[torch.Tensor, Any, int]:
    """One forward of `model` (`top` itself, or a DDP wrapper around it) on `inputs` (no
    labels) that returns (sum of the supervised tokens' cross-entropy, float32 scalar; the
    outputs, `loss` = that sum, no logits; N). Call only when `lean_loss_unsupported(top)` is
    None."""
    head = top.get_output_embeddings()
    keep = supervised_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    base = _base_model(top)
    named = _named_forward_params(type(base))
    # logits_to_keep only where the forward names it (transformers' own models): a **kwargs
    # that swallows it may also ignore it; the hook then gathers the rows itself
    extra: dict[str, Any] = {"logits_to_keep": keep} if "logits_to_keep" in named else {}
    if "use_cache" in named:
        extra["use_cache"] = False  # training needs no KV cache (eval would build one)
    softcap = next((float(v) for c in _configs(getattr(base, "config", None))
                    if (v := getattr(c, "final_logit_softcapping", None)) is not None), None)
    seen = _POST_HEAD.setdefault(base, {})
    known = (seen[softcap],) if softcap in seen else None
    with _LeanForward(top, head, keep, targets, chunk_size, softcap, known) as lf:
        outputs = model(**{**extra, **inputs})  # a packed batch brings its own use_cache=False
    seen[softcap] = lf.applied
    return outputs["loss"], outputs, int(targets.numel())


class TokenMeanLossMixin:
    """Mixin for a `transformers.Trainer` subclass: `token_mean_loss` unless the caller
    passes its own `compute_loss_func`, computed the lean way (see the module docstring)
    unless `lean_loss=False`.

    Constructor keywords: `lean_loss` (default True), `loss_chunk_size` (rows of logits at a
    time, default 128)."""

    def __init__(self, *args: Any, lean_loss: bool = True, loss_chunk_size: int = 128, **kwargs: Any):
        kwargs.setdefault("compute_loss_func", token_mean_loss)
        # the lean path computes token_mean_loss; a caller's own loss function stays theirs.
        # compute_loss_func stays set either way: Trainer.training_step reads it to know the
        # loss is already normalised over the step (no extra division by the accumulation).
        self._lean_loss = bool(lean_loss) and kwargs["compute_loss_func"] is token_mean_loss
        self._loss_chunk_size = max(int(loss_chunk_size), 1)
        self._lean_off: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()
        super().__init__(*args, **kwargs)

    def _lean_top(self, model: nn.Module, inputs: Any, return_outputs: bool) -> Optional[nn.Module]:
        """The unwrapped model to run the lean loss on, or None for the full-logits path."""
        if not self._lean_loss or not isinstance(inputs, dict) or "shift_labels" in inputs or "logits_to_keep" in inputs:
            return None
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            return None
        if return_outputs and not model.training and (self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None):
            return None  # evaluation metrics want the logits themselves
        top = self.accelerator.unwrap_model(model)
        if top not in self._lean_off:
            reason = lean_loss_unsupported(top)
            pc = getattr(self.accelerator, "parallelism_config", None)
            if reason is None and pc is not None and (getattr(pc, "sp_enabled", False) or getattr(pc, "cp_enabled", False)):
                reason = "sequence/context parallelism shards the positions"
            if reason is None and (self.args.n_gpu > 1 or isinstance(model, nn.DataParallel)):
                # DataParallel's replicas share the patched head and the hook (shallow copies)
                reason = "one process drives several GPUs (DataParallel); use torchrun for one process per GPU"
            self._lean_off[top] = reason
            if reason and self.is_world_process_zero():
                log.info("lean loss off: %s; the loss comes from the model's full logits", reason)
        return None if self._lean_off[top] else top

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor | int] = None) -> Any:
        top = self._lean_top(model, inputs, return_outputs)
        if top is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop("skip_logits", None)  # the Trainer's Liger switch for eval; the head is ours here
        loss_sum, outputs, n = lean_forward(model, top, inputs, labels, self._loss_chunk_size)
        # as token_mean_loss (ForCausalLMLoss): / the step's count, else the batch's mean
        count = num_items_in_batch if num_items_in_batch is not None else n
        loss = loss_sum / (count.to(loss_sum.device) if torch.is_tensor(count) else count)
        # as the end of Trainer.compute_loss: the count covers every rank, DDP/FSDP average the
        # gradients, so each rank's loss is scaled up by the number of processes
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            get_tp = getattr(self, "get_tp_size", None)
            scale = self.accelerator.num_processes // (get_tp() if callable(get_tp) else 1)
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss
