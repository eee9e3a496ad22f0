"""Issue #16 item 5, the habits of a command-line tool: `--version`, `--debug` after the
subcommand, a progress bar on evaluation and the data check, `train --resume-from CHECKPOINT`
and `train --fresh` beside the automatic resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_config
from vlmtune.cli import main
from vlmtune.errors import UserError

RUN = "q__r8"


def _metrics(out: Path) -> dict:
    return json.loads((out / RUN / "metrics.json").read_text())


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("vlmtune ")


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1  # a user error: one line
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(UserError):  # --debug: the exception itself, wherever the flag stands
        main(["train", str(tmp_path / "missing.yaml"), "--debug"])


def test_progress_bars_on_evaluation_and_check(tmp_path, shapes_dir, monkeypatch, capsys):
    monkeypatch.delenv("VLMTUNE_NO_PROGRESS", raising=False)
    out = tmp_path / "ev"
    assert main(["evaluate", "--model-id", "tiny:qwen2_5_vl", "--csv", str(shapes_dir / "test.csv"), "--output-dir", str(out),
                 "--limit", "3", "--batch-size", "1", "--max-new-tokens", "1", "--min-pixels", "3136", "--max-pixels", "3136",
                 "--metrics", "exact_match"]) == 0
    err = capsys.readouterr().err
    assert "generate" in err and "3/3" in err  # tqdm: done/total with elapsed<remaining
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "o")
    main(["check", str(cfg)])
    err = capsys.readouterr().err
    assert "check images" in err and "count tokens" in err


def test_fresh_moves_the_old_run_aside_and_starts_over(tmp_path, shapes_dir):
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "o", evaluation={"enabled": False}, training={"max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    first = _metrics(tmp_path / "o")
    assert main(["train", str(cfg), "--fresh"]) == 0
    [old] = list((tmp_path / "o").glob(f"{RUN}.old-*"))
    assert json.loads((old / "metrics.json").read_text()) == first  # nothing lost
    again = _metrics(tmp_path / "o")
    assert again["resumed_from"] is None and again["global_step"] == 2  # trained anew, not skipped as finished
    assert [h["loss"] for h in again["train_loss_history"]] == [h["loss"] for h in first["train_loss_history"]]


def test_resume_from_a_named_checkpoint(tmp_path, shapes_dir):
    a = write_config(tmp_path / "a.yaml", shapes_dir, tmp_path / "a", evaluation={"enabled": False},
                     training={"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant"})
    assert main(["train", str(a)]) == 0
    whole = _metrics(tmp_path / "a")["train_loss_history"]
    ckpt = tmp_path / "a" / RUN / "checkpoints" / "checkpoint-2"
    b = write_config(tmp_path / "b.yaml", shapes_dir, tmp_path / "b", evaluation={"enabled": False},
                     training={"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant"})
    assert main(["train", str(b), "--resume-from", str(ckpt)]) == 0
    m = _metrics(tmp_path / "b")
    assert m["resumed_from"] == str(ckpt.resolve())
    assert [h["loss"] for h in m["train_loss_history"]] == [h["loss"] for h in whole]  # steps 1-2 from the checkpoint's history
    # the run's saved config does not keep the checkpoint: a later rerun resumes from its own
    assert yaml.safe_load((tmp_path / "b" / RUN / "config.yaml").read_text())["training"]["resume_from"] is None
    assert main(["run", str(b)]) == 0  # the finished run is reused, its settings unchanged
    assert _metrics(tmp_path / "b")["resumed_from"] == str(ckpt.resolve())


def test_resume_from_errors_are_one_line(tmp_path, shapes_dir, capsys):
    two = write_config(tmp_path / "t.yaml", shapes_dir, tmp_path / "t",
                       lora_variants=[{"name": "r4", "r": 4}, {"name": "r8", "r": 8}])
    assert main(["train", str(two), "--resume-from", str(tmp_path)]) == 1
    assert "a checkpoint belongs to one run and the config selects 2" in capsys.readouterr().err
    one = write_config(tmp_path / "o.yaml", shapes_dir, tmp_path / "o", evaluation={"enabled": False})
    assert main(["train", str(one), "--resume-from", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]
    assert main(["train", str(one), "--resume-from", str(tmp_path), "--fresh"]) == 1
    assert "contradict" in capsys.readouterr().err
