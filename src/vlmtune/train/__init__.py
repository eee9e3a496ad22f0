"""Training: one home per concern, composed by the recipes.

- `plan.py`     what trains, from the config (and `inspect`'s estimate)
- `adapt.py`    apply it: freeze / LoRA / full
- `optim.py`    part-wise optimizer groups (mixin)
- `guard.py`    non-finite guard and step hooks (mixin; ranks agree)
- `trainer.py`  `VlmTrainer` = transformers' Trainer + the mixins; `compose()` for others
- `args.py`     our config -> `TrainingArguments` (or a TRL config)
- `precision.py` dtype rules and the dtype check on resume
- `rundir.py`   the run directory's layout and how it is written (rank 0)
- `outputs.py`  loss curves, peak memory, `lora_adapter/` and `final/`
- `loggers.py`  `report_to`: the installed check, where tensorboard/wandb/mlflow write, final metrics
- `checkpoints.py` which checkpoint is complete
- `checkpointing.py` Trainer checkpoints that resume what was saved, FSDP2-sharded or not (mixin)
- `fsdp.py`     FSDP2 sharding
- `preempt.py`  SIGTERM / Ctrl-C: checkpoint, then stop (mixin)
- `loss.py`     the SFT loss: mean over every supervised token of a step (mixin)
- `stages.py`   staged training
- `sft.py`      the supervised fine-tuning recipe
"""
