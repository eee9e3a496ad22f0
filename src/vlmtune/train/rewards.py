"""GRPO rewards: built-ins and user functions, each one checked call by call.

Every reward has one signature, ours and the user's alike:

    reward(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]

one float per completion. `completions[i]` answers `samples[i]` (each prompt appears
`num_generations` times in a row), and `references[i]` is that sample's reference answer
(`response`, or `annotation` in an evaluation-style CSV).

`RewardFunction` adapts one to TRL's calling convention (prompts, completions,
completion_ids and the dataset's columns as keywords), checks the result (one finite number
per completion), and names the function and the sample when it raises.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Optional, Sequence

from ..config import RewardConfig
from ..data.sources import Sample
from ..errors import UserError
from ..text import squad_normalize

Reward = Callable[[list[str], list[str], list[Sample]], Sequence[float]]

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def exact_match(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
    """1 when the completion equals the reference (surrounding whitespace ignored)."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


def normalized_match(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
    """1 when equal after SQuAD normalisation (case, punctuation, articles, spaces)."""
    return [float(squad_normalize(c) == squad_normalize(r)) for c, r in zip(completions, references)]


def contains(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
    """1 when the normalised reference appears in the normalised completion."""
    return [float(bool(squad_normalize(r)) and f" {squad_normalize(r)} " in f" {squad_normalize(c)} ") for c, r in zip(completions, references)]


def format_reward(pattern: str) -> Reward:
    """1 when the whole completion matches `pattern` (dot matches newlines)."""
    rx = re.compile(pattern, re.DOTALL)
    return lambda completions, references, samples: [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def _first_number(text: str) -> Optional[float]:
    m = _NUMBER.search(text.replace(",", ""))
    return float(m.group()) if m else None


def numeric(tolerance: float) -> Reward:
    """1 when the completion's first number is within `tolerance` of the reference's."""
    def score(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
        out = []
        for c, r in zip(completions, references):
            a, b = _first_number(c), _first_number(r)
            out.append(float(a is not None and b is not None and abs(a - b) <= tolerance))
        return out
    return score


def _box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first four numbers of `text` as a box (x1, y1, x2, y2), corners in any order."""
    nums = [float(x) for x in _NUMBER.findall(text.replace(",", " "))[:4]]
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = nums
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2); 0 for empty boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
    """IoU of the box in the completion with the reference box; 0 when either has none."""
    out = []
    for c, r in zip(completions, references):
        a, b = _box(c), _box(r)
        out.append(box_iou(a, b) if a and b else 0.0)
    return out


def length_penalty(max_words: int) -> Reward:
    """0 up to `max_words` words, then minus the extra words per `max_words`."""
    return lambda completions, references, samples: [-max(0, len(c.split()) - max_words) / max_words for c in completions]


def load_function(path: str, where: str) -> Reward:
    """A user reward from `module.path:function` (the module imported as any Python module)."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UserError(where, f"cannot import {module!r} ({e})", "put the module on PYTHONPATH (or install its package)") from None
    except AttributeError:
        raise UserError(where, f"{module!r} has no {name!r}", "check the function name after the colon") from None
    if not callable(fn):
        raise UserError(where, f"{path} is not a function", "point at a function (completions, references, samples) -> list of floats")
    return fn


class RewardFunction:
    """One configured reward, called the way TRL's GRPOTrainer calls reward functions."""

    def __init__(self, name: str, fn: Reward, samples_by_id: dict[str, Sample]):
        self.name = name
        self.__name__ = name  # TRL logs rewards/<__name__>/mean
        self.fn = fn
        self.samples_by_id = samples_by_id

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        ids = [str(i) for i in columns.get("sample_id", [])]
        samples = [self.samples_by_id[i] for i in ids]
        references = [str(r) for r in columns.get("response", [s.response for s in samples])]
        try:
            out = self.fn(texts, references, samples)
        except Exception as e:  # a user's function: name it and the samples, keep the cause
            raise UserError(f"grpo reward {self.name}", f"raised {type(e).__name__}: {str(e)[:200]} on samples {', '.join(dict.fromkeys(ids)) or '(unknown)'}",
                            "fix the reward function (it gets completions, references, samples)") from e
        return self._checked(out, ids)

    def _checked(self, out: Any, ids: list[str]) -> list[float]:
        try:
            values = list(out)
        except TypeError:
            raise UserError(f"grpo reward {self.name}", f"returned {type(out).__name__}, not a list of numbers",
                            "return one float per completion") from None
        if len(values) != len(ids):
            raise UserError(f"grpo reward {self.name}", f"returned {len(values)} values for {len(ids)} completions",
                            "return one float per completion")
        for v, i in zip(values, ids):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise UserError(f"grpo reward {self.name}", f"returned {v!r} for sample {i}, not a finite number",
                                "return one float per completion")
        return [float(v) for v in values]


def build_rewards(configs: list[RewardConfig], samples: list[Sample]) -> tuple[list[RewardFunction], list[float]]:
    """The configured rewards (TRL-callable) and their weights."""
    by_id = {s.id: s for s in samples}
    funcs: list[RewardFunction] = []
    for i, rc in enumerate(configs):
        where = f"grpo.rewards[{i}]"
        if rc.function:
            fn, name = load_function(rc.function, f"{where}.function"), rc.function.split(":")[1]
        else:
            name = rc.name
            fn = {"exact_match": exact_match, "normalized_match": normalized_match, "contains": contains, "iou": iou,
                  "format": lambda: format_reward(rc.pattern), "numeric": lambda: numeric(rc.tolerance),
                  "length_penalty": lambda: length_penalty(rc.max_words)}[rc.name]
            if rc.name in ("format", "numeric", "length_penalty"):
                fn = fn()
        taken = {f.name for f in funcs}
        funcs.append(RewardFunction(name if name not in taken else f"{name}_{i}", fn, by_id))
    return funcs, [rc.weight for rc in configs]
