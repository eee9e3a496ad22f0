"""Training throughput and peak memory: vlmtune against TRL's `SFTTrainer`, in one invocation.

    python bench/train_throughput.py [--samples 48] [--batch-size 4] [--repeats 2]
        [--precision fp32|bf16] [--gradient-checkpointing] [--device cpu|cuda]
        [--no-packing] [--no-lean-loss] [--optim adamw_torch_fused] [--json-only]

Both systems fully fine-tune the same model: a random-init Qwen2.5-VL (the real 151,936-token
vocabulary, tied embeddings, text hidden 256 x 6 layers, vision depth 2: 45.7M parameters),
saved once with `save_pretrained` and loaded by each side from that folder in the same dtype.
They train one epoch over the same seeded mixed-length data (70% short answers, 30% 40-120
words, one `--image-size` image per sample, the same pixel bound on both sides): vlmtune from
a JSONL file through its own recipe (`vlmtune.train.sft.train_run`, the code `vlmtune train`
runs), TRL from a `datasets.Dataset` of `messages` + `images` in its VLM format with
`assistant_only_loss=True`. Same effective batch (`--batch-size` padded rows a step; with
packing, one packed row a step holding about as many tokens), same supervised tokens
(assistant answer + `<|im_end|>` on both sides, checked token by token before any run), same
optimizer, precision and gradient-checkpointing setting, no evaluation, no checkpoints.

Measured, in a fresh subprocess per run (honest peak RSS), the runs alternating
vlmtune, TRL, vlmtune, TRL, ...:
- training time: from the Trainer's `on_train_begin` to the last `on_step_end` -- every step's
  batch loading and collation, forward, backward and optimizer step; not the imports, model
  loading, dataset preparation, or saving;
- tokens: the non-pad tokens of the batches each side actually trained on (counted inside
  the Trainer's batch fetch, identically on both sides); the two totals must agree;
- peak memory: the process's peak RSS (VmHWM) up to the end of training, baseline (imports,
  model) included, and on `--device cuda` the peak CUDA allocation.

The median of `--repeats` runs per system is reported. The last line of output is one JSON
object with `throughput_ratio` and `peak_memory_ratio` (vlmtune / TRL) and the details.

vlmtune runs its recommended fast settings (`training.packing: true`, `training.lean_loss:
true`); `--no-packing` / `--no-lean-loss` turn them off for attribution, and a tree where a
feature is not wired yet is reported as such (packing then runs the padded path at the same
batch). `--vlmtune-set training.loss_chunk_size=256` (repeatable) sets any other vlmtune key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

GIB = 1024 ** 3
REAL_VOCAB = 151_936

# Text model: Qwen2.5-VL's architecture at a size that steps in seconds on 2 CPU cores; the
# 152k-entry vocabulary (embedding tied with the LM head) is 85% of the parameters, as the
# LM head is most of a step's cost in a real small VLM.
SHAPE = dict(hidden=256, layers=6, intermediate=1024, heads=4, kv_heads=2, vision_depth=2, vision_hidden=128)
TINY_SHAPE = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vision_depth=2, vision_hidden=64)


# --------------------------------------------------------------------------------------------
# Memory probes (Linux /proc; ru_maxrss where there is no /proc)

def _status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def rss() -> int:
    v = _status("VmRSS")
    if v is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


def hwm() -> int:
    """Peak RSS so far (since the last `reset_hwm`)."""
    v = _status("VmHWM")
    if v is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stages:
    """RSS (and its peak so far) at named points of a worker."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def mark(self, name: str) -> None:
        self.points.append({"stage": name, "rss": rss(), "hwm": hwm(), "t": round(time.perf_counter() - self.t0, 2)})


# --------------------------------------------------------------------------------------------
# Data and model (built once, in the parent)

def _words() -> list[str]:
    from vlmtune.models.tiny import _WORDS

    return list(_WORDS)


QUESTIONS_SHORT = ["What colour is the shape?", "What shape is shown?", "Where is the object?", "How many objects are there?",
                   "What is in the picture?"]
QUESTIONS_LONG = ["Describe the picture in detail.", "Describe this image.", "What is shown here? Answer in full.",
                  "Tell me about the objects in the image."]


def make_data(out: Path, n: int, image_size: int, seed: int) -> list[dict[str, Any]]:
    """n samples, one image each: 70% short answers (1-4 words), 30% 40-120 words. Writes
    out/images/*.png and out/train.jsonl (vlmtune's typed-content messages); returns the
    records (TRL's dataset is built from the same records)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    words = _words()
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan"]
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    n_long = round(0.3 * n)
    long_ids = set(rng.sample(range(n), n_long))
    for i in range(n):
        img = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        x0, y0 = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
        d.ellipse([x0, y0, x0 + image_size // 3, y0 + image_size // 3], fill=tuple(rng.randrange(256) for _ in range(3)))
        path = out / "images" / f"{i:05d}.png"
        img.save(path)
        if i in long_ids:
            q = rng.choice(QUESTIONS_LONG)
            k = rng.randint(40, 120)
            body = [rng.choice(words) for _ in range(k)]
            sents, j = [], 0
            while j < k:
                m = rng.randint(8, 16)
                s = " ".join(body[j:j + m])
                sents.append(s[:1].upper() + s[1:] + ".")
                j += m
            a = " ".join(sents)
        else:
            q = rng.choice(QUESTIONS_SHORT)
            a = " ".join([rng.choice(colours)] + [rng.choice(words) for _ in range(rng.randint(0, 3))])
        records.append({"id": f"s{i}", "image": str(path), "question": q, "answer": a})
    with open(out / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"id": r["id"], "images": [r["image"]], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": r["answer"]}]},
            ]}) + "\n")
    with open(out / "records.json", "w") as f:
        json.dump(records, f)
    return records


def build_model(out: Path, vocab: int, shape: dict[str, int], pixels: int, seed: int) -> int:
    """Random-init Qwen2.5-VL + the tiny trained tokenizer and the real image processor,
    saved to `out`; returns the parameter count. Token ids of the small tokenizer are a
    subset of the 151,936-entry vocabulary: the embedding and the LM head have the real size."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmtune.models.families.qwen import _qwen_common, _qwen_text_config, _qwen_vision_token_ids

    tok, proc = _qwen_common("qwen2_5_vl")
    ip = proc.image_processor
    ip.size = {"shortest_edge": pixels, "longest_edge": pixels}
    for k in ("min_pixels", "max_pixels"):
        if hasattr(ip, k):
            setattr(ip, k, pixels)
    head_dim = shape["hidden"] // shape["heads"]
    half = head_dim // 2  # mrope_section sums to head_dim / 2 (Qwen2.5-VL: 16, 24, 24 of 64)
    sec = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = {**_qwen_text_config(tok), "vocab_size": vocab, "hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
            "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sec}, "initializer_range": 0.02}
    vh = shape["vision_hidden"]
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=shape["vision_depth"], hidden_size=vh, intermediate_size=2 * vh, num_heads=4, out_hidden_size=shape["hidden"],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[shape["vision_depth"] - 1]),
        tie_word_embeddings=True,
        **_qwen_vision_token_ids(tok),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def trl_chat_template() -> str:
    """TRL's own training template for Qwen2.5-VL (`{% generation %}` markers), with the
    newline after an answer's `<|im_end|>` moved out of the generation block: TRL then
    supervises exactly vlmtune's tokens (answer + `<|im_end|>`), not one extra newline."""
    import trl

    src = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl_training.jinja").read_text()
    gen = src[src.index("{%- generation -%}"):src.index("{%- endgeneration -%}")]
    fixed = gen.replace("{{- '<|im_end|>\\n' }}", "{{- '<|im_end|>' }}")
    if fixed.count("'<|im_end|>'") != 2:
        raise SystemExit("bench: TRL's qwen2_5_vl_training.jinja changed shape; update trl_chat_template()")
    return src.replace(gen, fixed).replace("{%- endgeneration -%}", "{%- endgeneration -%}\n{{- '\\n' }}", 1)


def trl_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"images": [r["image"]], "messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in records]


def trl_dataset(records: list[dict[str, Any]]):
    from datasets import Dataset, Image, List

    ds = Dataset.from_list(trl_records(records))
    return ds.cast_column("images", List(Image()))


def check_same_supervision(work: Path, records: list[dict[str, Any]], pixels: int, config: Path) -> dict[str, Any]:
    """Encode every sample on both sides (no model): the same tokens, the same image tokens
    and the same supervised token ids, sample by sample. Exits loudly otherwise."""
    from transformers import Qwen2_5_VLProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmtune.config import ModelConfig, load_config
    from vlmtune.data.collate import Encoder
    from vlmtune.data.sources import load_split
    from vlmtune.models.families import FAMILIES
    from vlmtune.models.loading import load_processor
    from vlmtune.models.processors import image_only

    model_dir = str(work / "model")
    fam = FAMILIES["qwen2_5_vl"]
    vproc = load_processor(model_dir, fam, ModelConfig(name="bench", hf_model_id=model_dir, min_pixels=pixels, max_pixels=pixels))
    enc = Encoder(vproc, fam)
    samples = load_split(load_config(config), "train")
    tproc = image_only(Qwen2_5_VLProcessor).from_pretrained(model_dir)
    coll = DataCollatorForVisionLanguageModeling(processor=tproc, max_length=None, assistant_only_loss=True, chat_template=(work / "trl_template.jinja").read_text())
    ds = trl_dataset(records)
    tot = {"tokens_vlmtune": 0, "tokens_trl": 0, "supervised_vlmtune": 0, "supervised_trl": 0, "image_tokens": 0, "mismatched_samples": 0}
    lengths = []
    for s, ex in zip(samples, ds):
        e = enc.encode(s)
        ids_v = e.features["input_ids"]
        sup_v = ids_v[e.features["labels"] != -100].tolist()
        b = coll([dict(ex)])
        ids_t = b["input_ids"][0][b["attention_mask"][0] == 1]
        sup_t = b["input_ids"][0][b["labels"][0] != -100].tolist()
        tot["tokens_vlmtune"] += len(ids_v)
        tot["tokens_trl"] += len(ids_t)
        tot["supervised_vlmtune"] += len(sup_v)
        tot["supervised_trl"] += len(sup_t)
        tot["image_tokens"] += e.n_image_tokens
        lengths.append(len(ids_v))
        if ids_v.tolist() != ids_t.tolist() or sup_v != sup_t:
            tot["mismatched_samples"] += 1
            if tot["mismatched_samples"] == 1:
                tot["first_mismatch"] = {"sample": s.id, "vlmtune_supervised": enc.tokenizer.decode(sup_v), "trl_supervised": enc.tokenizer.decode(sup_t),
                                         "tokens": [len(ids_v), len(ids_t)]}
    tot["lengths"] = lengths
    return tot


# --------------------------------------------------------------------------------------------
# Instrumentation shared by both workers

class Meter:
    """Counts what the Trainer trains on (inside its batch fetch, so identically on both
    sides) and times the training loop."""

    def __init__(self, pad_id: int, device: str):
        self.pad_id = pad_id
        self.device = device
        self.tokens = 0          # every position of every row (padding included)
        self.nonpad = 0          # positions that are real tokens
        self.supervised = 0      # labels != -100
        self.samples = 0         # images (one per sample)
        self.rows = 0
        self.batches = 0
        self.max_row = 0
        self.t_begin: Optional[float] = None
        self.t_last: Optional[float] = None
        self.cpu_begin: Optional[float] = None
        self.cpu_last: Optional[float] = None
        self.step_seconds: list[float] = []
        self._t_step: Optional[float] = None
        self.hwm_before_train = 0
        self.hwm_reset = False
        self.train_hwm = 0
        self.rss_steps: list[int] = []
        self.phase_peaks: dict[str, int] = {}
        self.cuda_peak: Optional[int] = None
        self.head_calls = 0
        self.full_logit_rows = 0  # max rows of full-vocabulary logits the LM head module produced in one call

    def watch_head(self, model: Any) -> None:
        """Note what the LM head module outputs: full-vocabulary logits (rows x V), or not
        (vlmtune's lean loss swaps the head for identity and runs its own chunked matmul)."""
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0]
        meter = self

        def hook(module, args, output):
            meter.head_calls += 1
            if hasattr(output, "shape") and output.shape[-1] == vocab:
                meter.full_logit_rows = max(meter.full_logit_rows, int(output.numel() // vocab))

        head.register_forward_hook(hook)

    def count(self, batch: dict[str, Any]) -> None:
        import torch

        ids = batch.get("input_ids")
        if ids is None:
            return
        self.batches += 1
        self.rows += int(ids.shape[0])
        self.max_row = max(self.max_row, int(ids.shape[-1]))
        self.tokens += int(ids.numel())
        am = batch.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape == ids.shape:
            self.nonpad += int(am.sum())
        else:  # packed rows: no 2-D padding mask
            self.nonpad += int((ids != self.pad_id).sum())
        if "labels" in batch:
            self.supervised += int((batch["labels"] != -100).sum())
        if "image_grid_thw" in batch:
            self.samples += int(batch["image_grid_thw"].shape[0])

    def install(self) -> None:
        """Count every batch the Trainer fetches for a step (`Trainer.get_batch_samples`)."""
        from transformers import Trainer

        orig = Trainer.get_batch_samples
        meter = self

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n = orig(self, epoch_iterator, num_batches, device)
            for b in batches:
                meter.count(b)
            return batches, n

        Trainer.get_batch_samples = get_batch_samples

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Timer(TrainerCallback):
            """Times the loop; with a resettable VmHWM, also the peak RSS of each phase of a
            step: between steps (batch fetch), forward + backward (+ clipping), optimizer step."""

            def _sync(self):
                if meter.device == "cuda":
                    import torch

                    torch.cuda.synchronize()

            def _phase(self, name: str) -> None:
                if meter.hwm_reset:
                    meter.phase_peaks[name] = max(meter.phase_peaks.get(name, 0), hwm())
                    reset_hwm()

            def on_train_begin(self, args, state, control, **kw):
                meter.hwm_before_train = hwm()
                meter.hwm_reset = reset_hwm()
                if meter.device == "cuda":
                    import torch

                    torch.cuda.reset_peak_memory_stats()
                self._sync()
                meter.t_begin = time.perf_counter()
                meter.cpu_begin = time.process_time()

            def on_step_begin(self, args, state, control, **kw):
                self._phase("between steps (batch fetch)")
                meter._t_step = time.perf_counter()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                self._phase("forward + backward + clip")

            def on_optimizer_step(self, args, state, control, **kw):
                self._phase("optimizer step")

            def on_step_end(self, args, state, control, **kw):
                self._sync()
                now = time.perf_counter()
                meter.t_last = now
                meter.cpu_last = time.process_time()
                if meter._t_step is not None:
                    meter.step_seconds.append(now - meter._t_step)
                self._phase("optimizer step")
                meter.rss_steps.append(rss())

            def on_train_end(self, args, state, control, **kw):
                self._phase("after the last step")
                meter.train_hwm = max(meter.phase_peaks.values()) if meter.hwm_reset else hwm()
                if meter.device == "cuda":
                    import torch

                    meter.cuda_peak = int(torch.cuda.max_memory_allocated())

        return Timer()

    def result(self) -> dict[str, Any]:
        secs = (self.t_last - self.t_begin) if self.t_begin is not None and self.t_last is not None else float("nan")
        cpu = (self.cpu_last - self.cpu_begin) if self.cpu_begin is not None and self.cpu_last is not None else float("nan")
        train_peak = max(self.hwm_before_train, self.train_hwm) if self.hwm_reset else self.train_hwm
        return {
            "train_seconds": secs, "compute_seconds": sum(self.step_seconds), "steps": len(self.step_seconds),
            "cpu_seconds": cpu, "tokens_per_cpu_s": self.nonpad / cpu if cpu and cpu == cpu else float("nan"),
            "step_seconds": [round(s, 3) for s in self.step_seconds],
            "tokens": self.tokens, "nonpad_tokens": self.nonpad, "supervised_tokens": self.supervised, "samples": self.samples,
            "rows": self.rows, "batches": self.batches, "max_row": self.max_row,
            "pad_fraction": 1 - self.nonpad / self.tokens if self.tokens else 0.0,
            "tokens_per_s": self.nonpad / secs if secs and secs == secs else float("nan"),
            "peak_rss_before_train": self.hwm_before_train,
            "peak_rss_during_train": self.train_hwm if self.hwm_reset else None,
            "peak_rss": train_peak,
            "rss_after_each_step": self.rss_steps, "phase_peaks": self.phase_peaks,
            "cuda_peak_allocated": self.cuda_peak,
            "head_calls": self.head_calls, "full_logit_rows": self.full_logit_rows,
        }


# --------------------------------------------------------------------------------------------
# Workers (one fresh process per measured run)

def worker(spec: dict[str, Any]) -> dict[str, Any]:
    st = Stages()
    st.mark("python")
    work = Path(spec["work"])
    res = (_vlmtune_worker if spec["system"] == "vlmtune" else _trl_worker)(spec, work, st)
    # VmHWM was reset during training (per-phase peaks): make "peak so far" cumulative again.
    peak = 0
    for p in res["stages"]:
        if p["stage"] in ("trained", "outputs saved", "end"):
            p["hwm"] = max(p["hwm"], res["peak_rss"])
        peak = max(peak, p["hwm"])
        p["hwm"] = peak
    res["process_peak_rss"] = peak
    return res


def _vlmtune_worker(spec: dict[str, Any], work: Path, st: Stages) -> dict[str, Any]:
    import logging

    import vlmtune.train.sft as sft
    from vlmtune.config import load_config
    from vlmtune.data.sources import load_split

    st.mark("imports")
    logging.getLogger("vlmtune").setLevel(logging.WARNING)
    cfg = load_config(spec["config"], sets=spec.get("sets") or None)
    samples = load_split(cfg, "train")
    meter = Meter(spec["pad_id"], spec["device"])
    meter.install()
    # RSS after each stage of the recipe: wrap what train_run calls (module globals), nothing else.
    if hasattr(sft, "prepare_model"):
        orig_prepare = sft.prepare_model

        def prepare_model(*a, **k):
            out = orig_prepare(*a, **k)
            st.mark("model loaded + plan applied")
            meter.watch_head(out[1])
            return out

        sft.prepare_model = prepare_model
    if hasattr(sft, "SFTDataset"):
        base = sft.SFTDataset

        class TrackedDataset(base):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                st.mark(f"dataset encoded ({k.get('name', a[4] if len(a) > 4 else '')})")

        TrackedDataset.__name__ = base.__name__
        sft.SFTDataset = TrackedDataset
    if hasattr(sft, "finish"):
        orig_finish = sft.finish

        def finish(*a, **k):
            st.mark("trained")
            out = orig_finish(*a, **k)
            st.mark("outputs saved")
            return out

        sft.finish = finish
    out = sft.train_run(cfg, cfg.models[0], cfg.variants()[0], samples, None, callbacks=[meter.callback()])
    st.mark("end")
    m = out.get("metrics", {})
    return {**meter.result(), "stages": st.points, "final_loss": m.get("final_train_loss"), "optimizer_steps": m.get("global_step")}


def _trl_worker(spec: dict[str, Any], work: Path, st: Stages) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLProcessor
    from trl import SFTConfig, SFTTrainer

    from vlmtune.models.processors import image_only  # the image-only processor class (no torchvision here)

    st.mark("imports")
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(str(work / "model"), dtype=dtype, use_safetensors=True)
    processor = image_only(Qwen2_5_VLProcessor).from_pretrained(str(work / "model"))
    st.mark("model loaded")
    records = json.loads((work / "records.json").read_text())
    ds = trl_dataset(records)
    st.mark("dataset built")
    args = SFTConfig(
        output_dir=str(work / f"trl_out_{spec['run']}"),
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim=spec["optim"], max_grad_norm=1.0,
        bf16=spec["precision"] == "bf16", gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        assistant_only_loss=True, chat_template_path=str(work / "trl_template.jinja"), max_length=None,
        logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=42, use_cpu=spec["device"] == "cpu",
    )
    meter = Meter(spec["pad_id"], spec["device"])
    meter.install()
    meter.watch_head(model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor, callbacks=[meter.callback()])
    st.mark("trainer built")
    out = trainer.train()
    st.mark("trained")
    st.mark("end")
    return {**meter.result(), "stages": st.points, "final_loss": out.training_loss, "optimizer_steps": trainer.state.global_step}


# --------------------------------------------------------------------------------------------
# Parent

def feature_wired(name: str) -> bool:
    """Whether vlmtune's code (config.py aside) reads the config key `training.<name>`: an
    attribute access `<x>.training.<name>` or `t.<name>` / `training.<name>` (comments and
    docstrings do not count). A key that is declared but not read yet is silently a no-op."""
    import ast

    import vlmtune

    root = Path(vlmtune.__file__).parent
    for p in root.rglob("*.py"):
        if p.name == "config.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(errors="ignore"))):
            if isinstance(node, ast.Attribute) and node.attr == name:
                v = node.value
                if (isinstance(v, ast.Attribute) and v.attr == "training") or (isinstance(v, ast.Name) and v.id in ("t", "training", "tcfg")):
                    return True
    return False


def vlmtune_config(work: Path, args: argparse.Namespace, pixels: int, max_length: int, packing: bool, batch: int, run: int) -> Path:
    import yaml

    t: dict[str, Any] = {
        "training_mode": "both", "parts": {"vision": {"train": "full"}, "projector": {"train": "full"}, "llm": {"train": "full"}},
        "num_train_epochs": 1, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-5, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "optim": args.optim, "max_grad_norm": 1.0,
        "mixed_precision": "bf16" if args.precision == "bf16" else "no", "gradient_checkpointing": args.gradient_checkpointing,
        "logging_steps": 10_000, "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "resume": "never",
        "dataloader_num_workers": 0, "seed": 42, "packing": packing, "lean_loss": not args.no_lean_loss,
    }
    import dataclasses

    from vlmtune.config import TrainingConfig

    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    t = {k: v for k, v in t.items() if k in known}  # an older tree (before issue #15) has neither key
    cfg = {
        "experiment_name": "bench", "output_dir": str(work / f"vlmtune_out_{run}"),
        "data": {"train_jsonl": str(work / "train.jsonl"), "max_length": max_length},
        "models": [{"name": "qwen", "hf_model_id": str(work / "model"), "torch_dtype": "bfloat16" if args.precision == "bf16" else "float32",
                    "min_pixels": pixels, "max_pixels": pixels}],
        "lora_variants": [{"name": "full"}],
        "training": t,
        "evaluation": {"enabled": False},
    }
    path = work / f"vlmtune_{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_worker(spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    work = Path(spec["work"])
    spec_path = work / f"spec_{spec['run']}.json"
    out_path = work / f"result_{spec['run']}.json"
    spec_path.write_text(json.dumps(spec))
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), "--result", str(out_path)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not out_path.is_file():
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"bench: the {spec['system']} run {spec['run']} failed (exit {p.returncode}); its output is above")
    res = json.loads(out_path.read_text())
    res["wall_seconds"] = time.perf_counter() - t
    res["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return res


def gib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / GIB:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="training samples: one epoch over them on both sides")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of the padded side (sets --samples to steps x batch size)")
    ap.add_argument("--batch-size", type=int, default=4, help="padded rows per step (per device); packing: one row of about as many tokens")
    ap.add_argument("--repeats", type=int, default=2, help="runs per system, alternating vlmtune, TRL, ...; the median is reported")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32: float32 weights; bf16: bfloat16 weights + bf16 autocast (both sides)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-packing", action="store_true", help="vlmtune: padded batches (training.packing: false)")
    ap.add_argument("--no-lean-loss", action="store_true", help="vlmtune: full-vocabulary logits (training.lean_loss: false)")
    ap.add_argument("--optim", default="adamw_torch_fused", help="optimizer of both sides (TRL's / transformers' default)")
    ap.add_argument("--image-size", type=int, default=112, help="image side in pixels; the pixel bound is its square (112: 16 image tokens)")
    ap.add_argument("--vlmtune-set", action="append", default=[], metavar="KEY=VALUE", help="extra vlmtune config key (repeatable)")
    ap.add_argument("--only", choices=("vlmtune", "trl"), help="run one system only (attribution; no ratios)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's, the core count)")
    ap.add_argument("--workdir", default=None, help="keep the model, data and per-run results here")
    ap.add_argument("--json-only", action="store_true", help="print only the final JSON line")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test: tiny model and vocabulary
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        res = worker(spec)
        Path(args.result).write_text(json.dumps(res))
        return

    say = (lambda *a: None) if args.json_only else (lambda *a: print(*a, flush=True))
    if args.steps is not None:
        args.samples = args.steps * args.batch_size
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but torch sees no CUDA device")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlmtune-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _bench(args, work, say)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, work: Path, say) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets
    import torch
    import transformers
    import trl

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    pixels = args.image_size * args.image_size
    shape, vocab = (TINY_SHAPE, 2048) if args.tiny else (SHAPE, REAL_VOCAB)
    t0 = time.perf_counter()
    n_params = build_model(work / "model", vocab, shape, pixels, seed=0)
    records = make_data(work, args.samples, args.image_size, seed=0)
    (work / "trl_template.jinja").write_text(trl_chat_template())
    chk = check_same_supervision(work, records, pixels, vlmtune_config(work, args, pixels, 4096, False, args.batch_size, 0))
    if chk["mismatched_samples"] or chk["tokens_vlmtune"] != chk["tokens_trl"] or chk["supervised_vlmtune"] != chk["supervised_trl"]:
        raise SystemExit(f"bench: the two sides do not see the same tokens / supervise the same tokens: {json.dumps({k: v for k, v in chk.items() if k != 'lengths'})}")
    lengths = chk.pop("lengths")
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(str(work / "model")).pad_token_id
    setup_s = time.perf_counter() - t0

    # vlmtune settings: packing (when wired) packs rows of about a padded step's tokens, one
    # row a step, so both sides take about the same number of optimizer steps.
    steps_padded = math.ceil(args.samples / args.batch_size)
    wired = {"packing": feature_wired("packing"), "lean_loss": feature_wired("lean_loss")}
    packing = not args.no_packing and wired["packing"]
    if packing:
        max_length = max(max(lengths), math.ceil(sum(lengths) / steps_padded))
        v_batch = 1
    else:
        max_length = max(2048, max(lengths))
        v_batch = args.batch_size
    notes = []
    if not args.no_packing and not wired["packing"]:
        notes.append("training.packing is not read anywhere in vlmtune yet: vlmtune runs PADDED batches (same batch as TRL)")

    env = {**os.environ, "VLMTUNE_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    threads = args.threads or torch.get_num_threads()

    say(f"model: Qwen2.5-VL shape, vocab {vocab:,}, hidden {shape['hidden']} x {shape['layers']} layers, vision depth {shape['vision_depth']}: "
        f"{n_params / 1e6:.1f}M parameters (full fine-tune), {args.precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"optimizer {args.optim}")
    say(f"data: {args.samples} samples ({round(0.3 * args.samples)} long), {args.image_size}x{args.image_size} images "
        f"({chk['image_tokens'] // args.samples} image tokens each), {chk['tokens_vlmtune']:,} tokens, {chk['supervised_vlmtune']:,} supervised "
        f"(identical on both sides, token by token); sample lengths {min(lengths)}-{max(lengths)}")
    say(f"vlmtune: packing {'on (rows of <= %d tokens, 1 row a step)' % max_length if packing else 'off (batch %d)' % v_batch}, "
        f"lean loss {'on' if not args.no_lean_loss else 'off'}; TRL {trl.__version__}: batch {args.batch_size}, assistant_only_loss; "
        f"device {args.device}, {threads} torch threads; setup {setup_s:.0f} s")
    for n in notes:
        say(f"NOTE: {n}")

    systems = [args.only] if args.only else ["vlmtune", "trl"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    run = 0
    for _ in range(args.repeats):
        for system in systems:
            run += 1
            spec = {"system": system, "run": run, "work": str(work), "pad_id": pad_id, "device": args.device, "precision": args.precision,
                    "gradient_checkpointing": args.gradient_checkpointing, "batch_size": args.batch_size, "optim": args.optim}
            if system == "vlmtune":
                spec["config"] = str(vlmtune_config(work, args, pixels, max_length, packing, v_batch, run))
                spec["sets"] = list(args.vlmtune_set)
            res = run_worker(spec, env, timeout=3600)
            results[system].append(res)
            say(f"  run {run} {system:<8} {res['nonpad_tokens']:>6} tokens ({res['pad_fraction']:.0%} padding) in {res['train_seconds']:6.2f} s "
                f"= {res['tokens_per_s']:7.1f} tokens/s ({res['tokens_per_cpu_s']:6.1f} per CPU-s), {res['steps']} steps, peak RSS {gib(res['peak_rss'])}"
                + (f", CUDA peak {gib(res['cuda_peak_allocated'])}" if res.get("cuda_peak_allocated") else "")
                + f"  [load avg {res['load_avg_1min'][0]}->{res['load_avg_1min'][1]}]")

    # Same work on both sides?
    for system, rs in results.items():
        for res in rs:
            if res["samples"] != args.samples:
                raise SystemExit(f"bench: {system} trained on {res['samples']} samples, not {args.samples}")
            if res["nonpad_tokens"] != chk["tokens_vlmtune"]:
                raise SystemExit(f"bench: {system} trained on {res['nonpad_tokens']} non-pad tokens, expected {chk['tokens_vlmtune']}")
            if res["supervised_tokens"] and abs(res["supervised_tokens"] - chk["supervised_vlmtune"]) > 0.01 * chk["supervised_vlmtune"]:
                raise SystemExit(f"bench: {system} supervised {res['supervised_tokens']} tokens, expected {chk['supervised_vlmtune']}")
    engaged: dict[str, Optional[bool]] = {"packing": None, "lean_loss": None}
    if results.get("vlmtune"):
        v0 = results["vlmtune"][0]
        engaged = {"packing": v0["samples"] > v0["rows"], "lean_loss": v0["full_logit_rows"] == 0}
        if packing and not engaged["packing"]:
            notes.append(f"packing was requested but did not engage: vlmtune trained {v0['rows']} rows for {v0['samples']} samples")
        if not args.no_lean_loss and not engaged["lean_loss"]:
            notes.append(f"the lean loss was requested but vlmtune's LM head produced full-vocabulary logits ({v0['full_logit_rows']} rows in one call)")
        if args.no_lean_loss and engaged["lean_loss"]:
            notes.append("--no-lean-loss was given but vlmtune's LM head never produced full-vocabulary logits (training.lean_loss not wired?)")
        for n in notes[-3:]:
            if n.startswith(("packing was", "the lean loss", "--no-lean")):
                say(f"NOTE: {n}")

    def med(system: str, key: str) -> Optional[float]:
        vals = [r[key] for r in results.get(system, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    mem_key = "cuda_peak_allocated" if args.device == "cuda" else "peak_rss"
    summary: dict[str, Any] = {}
    say("")
    for system in systems:
        rs = results[system]
        st = {p["stage"]: p for p in rs[0]["stages"]}
        summary[system] = {
            "tokens_per_s": round(med(system, "tokens_per_s"), 2), "train_seconds": round(med(system, "train_seconds"), 2),
            "compute_seconds": round(med(system, "compute_seconds"), 2), "steps": rs[0]["steps"],
            "cpu_seconds": round(med(system, "cpu_seconds"), 2), "tokens_per_cpu_s": round(med(system, "tokens_per_cpu_s"), 2),
            "peak_rss_gib": round(med(system, "peak_rss") / GIB, 3), "process_peak_rss_gib": round(med(system, "process_peak_rss") / GIB, 3),
            "rss_after_imports_gib": round(st["imports"]["rss"] / GIB, 3),
            "peak_before_train_gib": round(med(system, "peak_rss_before_train") / GIB, 3),
            "nonpad_tokens": rs[0]["nonpad_tokens"], "tokens_with_padding": rs[0]["tokens"], "pad_fraction": round(rs[0]["pad_fraction"], 4),
            "supervised_tokens": rs[0]["supervised_tokens"] or None,
            "final_loss": rs[0]["final_loss"], "rows": rs[0]["rows"], "full_logit_rows_max": rs[0]["full_logit_rows"],
            "phase_peaks_gib": {k: round(v / GIB, 3) for k, v in rs[0]["phase_peaks"].items()},
        }
        if args.device == "cuda":
            summary[system]["cuda_peak_gib"] = round(med(system, "cuda_peak_allocated") / GIB, 3)
        s = summary[system]
        say(f"{system:<8} {s['tokens_per_s']:7.1f} non-pad tokens/s (median of {len(rs)}; {s['nonpad_tokens']} tokens, {s['pad_fraction']:.0%} padding, "
            f"{s['steps']} steps, {s['train_seconds']:.1f} s; {s['tokens_per_cpu_s']:.1f} tokens per CPU-second), peak RSS {s['peak_rss_gib']:.2f} GiB "
            f"(after imports {s['rss_after_imports_gib']:.2f}, before training {s['peak_before_train_gib']:.2f}; process incl. saving {s['process_peak_rss_gib']:.2f})"
            + (f", CUDA peak {s['cuda_peak_gib']:.2f} GiB" if args.device == "cuda" else ""))
        for p in rs[0]["stages"]:
            say(f"           {p['t']:7.1f} s  {p['stage']:<36} RSS {p['rss'] / GIB:5.2f} GiB  peak so far {p['hwm'] / GIB:5.2f} GiB")
        if rs[0]["phase_peaks"]:
            say("           peak RSS by phase of a training step: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in rs[0]["phase_peaks"].items()))

    out: dict[str, Any] = {}
    if len(systems) == 2:
        tr = summary["vlmtune"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
        mr = med("vlmtune", mem_key) / med("trl", mem_key)
        say(f"\nthroughput ratio vlmtune/TRL = {tr:.2f}x (target >= 3.0), peak memory ratio = {mr:.2f} (target <= 0.7) "
            f"[{'CUDA peak allocated' if args.device == 'cuda' else 'peak RSS to the end of training'}]")
        cr = summary["vlmtune"]["tokens_per_cpu_s"] / summary["trl"]["tokens_per_cpu_s"]
        say(f"tokens per CPU-second ratio = {cr:.2f}x (less sensitive than wall time to other processes on the machine; not the target metric)")
        out = {"throughput_ratio": round(tr, 3), "peak_memory_ratio": round(mr, 3), "cpu_time_throughput_ratio": round(cr, 3)}
    out.update({
        "device": args.device, "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing, "optim": args.optim,
        "packing": packing, "lean_loss": not args.no_lean_loss, "wired": wired, "engaged": engaged, "samples": args.samples, "batch_size": args.batch_size,
        "tokens": chk["tokens_vlmtune"], "supervised_tokens": chk["supervised_vlmtune"], "params": n_params, "vocab": vocab,
        "threads": threads, "repeats": args.repeats, "notes": notes, **summary,
    })
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
