"""GRPO on a VLM (seed 000), top to bottom, with the same models, parts, LoRA settings and
run directory as SFT:

    1. the policy: the base model, or an SFT run's merged final/ (`grpo.init_from`), with
       the plan applied (frozen / LoRA / full per part, LR multipliers)
    2. the prompts: every sample's conversation up to its last answer, with its images;
       the answer is the reference the rewards see
    3. the rewards (built-ins and `module.path:function`, weighted)
    4. the run directory (only now)
    5. TRL's GRPOTrainer with our mixins: part-wise LR groups, the non-finite guard, SIGTERM,
       checkpoints, and the reference policy (adapter disabled under LoRA, a frozen copy
       under full training, checked before the first step)
    6. lora_adapter/, final/, then metrics.json (losses, rewards, KL) last

The objective is written out in docs/grpo.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

from .. import dist
from ..config import Config, LoraConfig, ModelConfig
from ..data.collate import Encoder
from ..data.images import load_image
from ..data.sources import Sample, message_text
from ..errors import UserError
from . import loggers
from .args import training_arguments
from .outputs import run_metrics
from .plan import describe_plan, format_report, parameter_report
from .reference import ReferencePolicyMixin
from .rewards import build_rewards
from .rundir import RunDir, resolved_run_config, run_name
from .samples import SAMPLE_ID_COLUMN
from .sft import finish, fit, prepare_model, preflight
from .trainer import compose

log = logging.getLogger("vlmtune")

# What TRL logs per step that metrics.json keeps (besides the loss).
GRPO_LOG_KEYS = ("reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length", "frac_reward_zero_std")


def grpo_dataset(samples: list[Sample]):
    """TRL rows: `prompt` (the conversation before the last answer, text parts; TRL puts each
    image part back where the processor expects it), `images` (PIL), `response` (the
    reference) and `sample_id`."""
    from datasets import Dataset

    rows = []
    for s in samples:
        prompt = [{"role": m["role"], "content": message_text(m)} for m in s.prompt_messages()]
        rows.append({"prompt": prompt, "images": [load_image(p, s.id, s.image_policy) for p in s.images],
                     "response": s.response, SAMPLE_ID_COLUMN: s.id})
    return Dataset.from_list(rows)


class VisualRelianceMixin:
    """Every `every` steps (and at the last) the probe runs on the policy, and its values join
    that step's log (console, report_to loggers, log_history -> metrics.json). They ride on
    the step's own log: a log call of their own would take TRL's reward metrics with it."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._probe: Optional[Callable[[Any], dict[str, float]]] = None
        self._probe_every = 1
        self._probe_values: dict[str, float] = {}
        super().__init__(*args, **kwargs)
        from transformers import TrainerCallback

        trainer = self

        class RunProbe(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if trainer._probe is not None and (state.global_step % trainer._probe_every == 0 or state.global_step >= state.max_steps):
                    trainer._probe_values = trainer._probe(trainer.accelerator.unwrap_model(trainer.model))
                    control.should_log = True
                return control

        self.add_callback(RunProbe())

    def set_probe(self, probe: Callable[[Any], dict[str, float]], every: int) -> None:
        self._probe, self._probe_every = probe, max(every, 1)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._probe_values and "loss" in logs:
            logs = {**logs, **self._probe_values}
            self._probe_values = {}
        super().log(logs, *args, **kwargs)


def _grpo_trainer_cls() -> type:
    from trl import GRPOTrainer

    return type("VlmGRPOTrainer", (VisualRelianceMixin, ReferencePolicyMixin, compose(GRPOTrainer)), {"__module__": __name__})


def policy_source(cfg: Config, mcfg: ModelConfig) -> ModelConfig:
    """The model GRPO starts from: `grpo.init_from`'s merged final/, or the configured model."""
    g = cfg.grpo
    if not g or not g.init_from:
        return mcfg
    src = RunDir(g.init_from)
    if not src.has_model():
        raise UserError("grpo.init_from", f"{g.init_from} holds no finished run (no final/)", "point at an SFT run directory that finished training")
    return dataclasses.replace(mcfg, hf_model_id=str(src.final.resolve()))


def grpo_run(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, train_samples: list[Sample], val_samples: Optional[list[Sample]],
             where: str = "model", callbacks: Optional[list[Any]] = None, extra_metrics: Optional[dict[str, Any]] = None,
             run_dir: Optional[RunDir] = None, probe_factory: Optional[Callable[..., Callable[[Any], dict[str, float]]]] = None,
             run_loggers: Optional[loggers.RunLoggers] = None) -> dict[str, Any]:
    """Train one `<model>__<variant>` run with GRPO; same arguments and result as `sft.train_run`.

    `probe_factory(encoder, samples, rewards, weights, max_new_tokens)` makes the visual
    reliance probe (eval.probe.visual_reliance_probe, passed in by the caller: train/ does not
    import eval/); it runs on `grpo.probe_samples` samples every `training.eval_steps` (default 50) and at the
    last step."""
    from transformers import set_seed
    from trl import GRPOConfig

    dist.init()
    g = cfg.grpo
    name = run_name(mcfg, variant)
    rd = run_dir or RunDir(cfg.resolved_output_dir() / name)
    preflight(cfg, mcfg, where)
    # The rewards first: a user function that does not import fails before any weights load.
    rewards, weights = build_rewards(g.rewards, train_samples)

    # 1. The policy.
    set_seed(cfg.training.seed)
    lm, model, plan = prepare_model(cfg, policy_source(cfg, mcfg), variant, where)
    report = parameter_report(model, lm.parts)
    report.update({"model": mcfg.hf_model_id, "init_from": g.init_from, "family": lm.family_name,
                   "plan": {p: dataclasses.asdict(v) for p, v in plan.items()}})
    if dist.is_main():
        log.info("run %s (GRPO): %s\n%s", name, describe_plan(plan), format_report(report))

    # 2. The prompts (3. the rewards were built above).
    dataset = grpo_dataset(train_samples)

    # 4. The run directory.
    rd.prepare()
    rd.write_yaml(rd.config, resolved_run_config(cfg, mcfg, variant))
    rd.write_json(rd.parameter_report, report)

    # 5. Train.
    args = training_arguments(
        cfg, rd.checkpoints, name, has_eval=False, args_cls=GRPOConfig,
        per_device_train_batch_size=g.prompts_per_step * g.num_generations,  # TRL counts completions
        num_generations=g.num_generations, max_completion_length=g.max_completion_length, temperature=g.temperature,
        top_p=g.top_p, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high or g.epsilon, num_iterations=g.num_iterations,
        loss_type=g.loss_type, scale_rewards=g.scale_rewards, reward_weights=weights,
        include_num_input_tokens_seen="no",  # batches are row lists; TRL logs its own token counts
    )
    trainer = _grpo_trainer_cls()(
        model=model, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=lm.processor,
        part_map=lm.parts, part_plan=plan, nan_policy=cfg.training.nan_policy, run_label=f"run {name}",
    )
    for cb in callbacks or []:
        trainer.add_callback(cb)
    # every rank probes (cheap): a log step is a collective, so all ranks must log together
    if probe_factory is not None and g.probe_samples > 0:
        probe_set = (val_samples or train_samples)[: g.probe_samples]
        probe = probe_factory(Encoder(lm.processor, lm.family), probe_set, rewards, weights, g.max_completion_length)
        trainer.set_probe(probe, cfg.training.eval_steps or 50)
    with loggers.logging_to(trainer, cfg, rd, name, resolved_run_config(cfg, mcfg, variant), run_loggers):  # report_to: where, what
        resume, train_seconds = fit(trainer, rd, cfg, model, name, where)

    # 6. Outputs, metrics.json last.
    grpo_hist = [{"step": h["step"], **{k: h[k] for k in h if k in GRPO_LOG_KEYS or k.startswith("rewards/")}}
                 for h in trainer.state.log_history if "reward" in h]
    reliance = [{"step": h["step"], **{k: v for k, v in h.items() if k.startswith("visual_reliance/")}}
                for h in trainer.state.log_history if "visual_reliance/gap" in h]
    metrics = run_metrics(trainer, resume, train_seconds, grpo_history=grpo_hist, visual_reliance_history=reliance,
                          n_train_samples=len(train_samples), method="grpo", **(extra_metrics or {}))
    merged = finish(model, lm, rd, metrics, name, rebuild=lambda: prepare_model(cfg, policy_source(cfg, mcfg), variant, where)[1])
    return {"run": name, "run_dir": str(rd), "model": merged, "loaded": lm, "encoder": Encoder(lm.processor, lm.family), "metrics": metrics}
