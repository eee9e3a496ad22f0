"""`training.report_to` loggers, read back with each library's own reader: tensorboard's
EventAccumulator, wandb's protobuf records of an offline run, mlflow's MlflowClient on a
file store. What training logs (loss, learning rate, eval loss) is compared step by step to
metrics.json; the final metrics, the generation metrics, the config and the grid summary are
compared to the files the run wrote. A logger that is not installed is one line, before
anything loads or is written.

Nothing here reaches a network: wandb runs offline (its default here: no WANDB_MODE, no API
key, no `wandb login`), mlflow writes a file store with its telemetry off."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import subprocess_env, write_config
from vlmtune.cli import main

RUN = "q__r8"
_LOGGER_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_CONSOLE", "MLFLOW_TRACKING_URI",
               "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY", "TENSORBOARD_LOGGING_DIR")


def _config(tmp: Path, data: Path, report_to, **training) -> Path:
    return write_config(tmp / "c.yaml", data, tmp / "out",
                        training={"max_steps": 3, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no", "report_to": report_to, **training},
                        evaluation={"enabled": True, "batch_size": 4, "max_samples": 4})


@pytest.fixture
def clean_env(tmp_path):
    """The loggers' variables unset (restored after): vlmtune's defaults decide."""
    saved = dict(os.environ)
    for var in _LOGGER_ENV:
        os.environ.pop(var, None)
    os.environ["NETRC"] = str(tmp_path / "no-netrc")  # no `wandb login` on this machine
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def logged(shapes_dir, tmp_path_factory):
    """One `vlmtune run` (train, evaluate, summary) reporting to all three loggers (a list)."""
    tmp = tmp_path_factory.mktemp("loggers")
    saved = dict(os.environ)
    for var in _LOGGER_ENV:
        os.environ.pop(var, None)
    os.environ["NETRC"] = str(tmp / "no-netrc")
    try:
        cfg = _config(tmp, shapes_dir, ["tensorboard", "wandb", "mlflow"])
        assert main(["run", str(cfg)]) == 0
        env_after = {k: os.environ.get(k) for k in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY")}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = tmp / "out"
    run = out / RUN
    return {"out": out, "run": run, "metrics": json.loads((run / "metrics.json").read_text()),
            "gm": json.loads((run / "generation_metrics.json").read_text()), "config": yaml.safe_load((run / "config.yaml").read_text()),
            "summary": json.loads((out / "ablation_summary.json").read_text()), "env_after": env_after}


# -- tensorboard -------------------------------------------------------------------------------------
def _tb(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _curve(ea, tag):
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_tensorboard_event_files_hold_training_final_and_generation_metrics(logged):
    run, m, gm = logged["run"], logged["metrics"], logged["gm"]
    assert not (run / "checkpoints" / "runs").exists()  # not transformers' undocumented default
    ea = _tb(run / "logs" / "tensorboard")
    assert _curve(ea, "train/loss") == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in m["train_loss_history"]]
    assert _curve(ea, "train/learning_rate") == [(h["step"], pytest.approx(h["learning_rate"], rel=1e-6)) for h in m["train_loss_history"]]
    assert _curve(ea, "eval/loss") == [(h["step"], pytest.approx(h["eval_loss"], rel=1e-6)) for h in m["eval_loss_history"]] != []
    last = m["global_step"]
    assert _curve(ea, "run/final_train_loss") == [(last, pytest.approx(m["final_train_loss"], rel=1e-6))]
    assert _curve(ea, "run/final_eval_loss") == [(last, pytest.approx(m["final_eval_loss"], rel=1e-6))]
    for name in ("exact_match", "rouge_l", "bleu4"):
        assert _curve(ea, f"generation/{name}") == [(last, pytest.approx(gm[name]["value"], abs=1e-6))]
    assert _curve(ea, "generation/n_samples") == [(last, 4)]
    assert _curve(ea, "generation/token_stats/prediction_tokens_mean") == [(last, pytest.approx(gm["token_stats"]["value"]["prediction_tokens_mean"]))]
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in text.splitlines())) == logged["config"]

    # the grid summary: a logged run of its own beside the run directories
    summary = logged["summary"]
    entry = next(r for r in summary["runs"] if r["run"] == RUN)
    ea = _tb(logged["out"] / "logs" / "tensorboard")
    assert _curve(ea, f"{RUN}/final_train_loss") == [(0, pytest.approx(entry["final_train_loss"], rel=1e-6))]
    assert _curve(ea, f"{RUN}/exact_match") == [(0, pytest.approx(entry["metrics"]["exact_match"]["value"], abs=1e-6))]
    assert _curve(ea, "best/exact_match") == [(0, pytest.approx(summary["best"]["exact_match"]["value"], abs=1e-6))]
    text = ea.Tensors("ablation_summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in text.splitlines()))["runs"][0]["run"] == RUN


# -- wandb (offline) --------------------------------------------------------------------------------
def _wandb_records(path: Path):
    """The records of a `.wandb` file: wandb's LevelDB-log framing (a 7-byte file header, then
    32 KiB blocks of chunks: crc32c, length, type FULL/FIRST/MIDDLE/LAST), each record one
    `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_history_summary_and_config(logged):
    run, m, gm = logged["run"], logged["metrics"], logged["gm"]
    runs = sorted((run / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # offline by default, in the run directory
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in records]
    head = records[kinds.index("run")].run
    assert (head.display_name, head.project) == ("t/q__r8", "t")
    config = {_item_key(i): json.loads(i.value_json) for i in head.config.update}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({_item_key(i): json.loads(i.value_json) for i in r.config.update})
    assert config["vlmtune"]["experiment_name"] == "t" and config["vlmtune"]["models"] == logged["config"]["models"]
    assert config["vlmtune"]["training"]["report_to"] == ["tensorboard", "wandb", "mlflow"]

    history = [{_item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    loss = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert loss == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in m["train_loss_history"]]
    lr = [(h["train/global_step"], h["train/learning_rate"]) for h in history if "train/learning_rate" in h]
    assert lr == [(h["step"], pytest.approx(h["learning_rate"], rel=1e-6)) for h in m["train_loss_history"]]
    evals = [(h["train/global_step"], h["eval/loss"]) for h in history if "eval/loss" in h]
    assert evals == [(h["step"], pytest.approx(h["eval_loss"], rel=1e-6)) for h in m["eval_loss_history"]] != []

    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_item_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary["run/final_train_loss"] == pytest.approx(m["final_train_loss"], rel=1e-6)
    assert summary["run/final_eval_loss"] == pytest.approx(m["final_eval_loss"], rel=1e-6)
    assert summary["run/global_step"] == m["global_step"]
    assert summary["generation/exact_match"] == pytest.approx(gm["exact_match"]["value"], abs=1e-6)
    assert summary["generation/rouge_l"] == pytest.approx(gm["rouge_l"]["value"], abs=1e-6)
    assert records[kinds.index("exit")].exit.exit_code == 0  # finished, not left open for the next run

    # the grid summary's own offline run
    runs = sorted((logged["out"] / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_item_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary[f"{RUN}/final_train_loss"] == pytest.approx(m["final_train_loss"], rel=1e-6)
    assert summary[f"{RUN}/exact_match"] == pytest.approx(gm["exact_match"]["value"], abs=1e-6)


# -- mlflow (file store) ------------------------------------------------------------------------------
def test_mlflow_file_store_holds_metrics_params_and_config(logged):
    assert logged["env_after"] == {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}  # set by vlmtune
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store needs the flag too
    import mlflow
    from mlflow.tracking import MlflowClient

    m, gm = logged["metrics"], logged["gm"]
    client = MlflowClient((logged["out"] / "mlruns").as_uri())
    exp = client.get_experiment_by_name("t")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"t/q__r8", "t/ablation_summary"}
    r = runs["t/q__r8"]
    assert r.info.status == "FINISHED"

    def history(key):
        return [(x.step, x.value) for x in sorted(client.get_metric_history(r.info.run_id, key), key=lambda x: x.step)]

    assert history("loss") == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in m["train_loss_history"]]
    assert history("learning_rate") == [(h["step"], pytest.approx(h["learning_rate"], rel=1e-6)) for h in m["train_loss_history"]]
    assert history("eval_loss") == [(h["step"], pytest.approx(h["eval_loss"], rel=1e-6)) for h in m["eval_loss_history"]] != []
    last = m["global_step"]
    assert history("run/final_train_loss") == [(last, pytest.approx(m["final_train_loss"], rel=1e-6))]
    assert history("generation/exact_match") == [(last, pytest.approx(gm["exact_match"]["value"], abs=1e-6))]
    assert history("generation/meteor") == [(last, pytest.approx(gm["meteor"]["value"], abs=1e-6))]
    params = r.data.params
    assert params["config/experiment_name"] == "t" and params["config/lora_variants/0/r"] == "8"
    assert params["config/training/report_to"] == str(["tensorboard", "wandb", "mlflow"])
    assert yaml.safe_load(mlflow.artifacts.load_text(f"{r.info.artifact_uri}/config.yaml")) == logged["config"]

    s = runs["t/ablation_summary"]
    assert s.data.metrics[f"{RUN}/final_train_loss"] == pytest.approx(m["final_train_loss"], rel=1e-6)
    assert s.data.metrics[f"{RUN}/exact_match"] == pytest.approx(gm["exact_match"]["value"], abs=1e-6)
    assert mlflow.artifacts.load_dict(f"{s.info.artifact_uri}/ablation_summary.json") == logged["summary"]


# -- a logger that is not installed --------------------------------------------------------------------
@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_logger_is_one_line_before_anything_loads(shapes_dir, tmp_path, capsys, monkeypatch, logger):
    for module in ([logger, "tensorboardX"] if logger == "tensorboard" else [logger]):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, find_spec finds nothing: not installed

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("vlmtune.train.sft.load_model", no_loading)
    cfg = _config(tmp_path, shapes_dir, ["tensorboard", logger] if logger != "tensorboard" else [logger])
    expected = f"training.report_to: {logger} is not installed — pip install 'vlmtune[loggers]', or drop {logger} from training.report_to"
    assert main(["train", str(cfg)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "out").exists()
    assert main(["check", str(cfg), "--no-tokens"]) == 1
    assert expected in capsys.readouterr().out.splitlines()


def test_a_missing_logger_from_the_command_line_is_one_line(shapes_dir, tmp_path):
    """The real entry point, wandb hidden from the interpreter: stderr is the one line."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    cfg = _config(tmp_path, shapes_dir, "wandb")
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(tmp_path / "hide"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "vlmtune", "train", str(cfg)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: training.report_to: wandb is not installed — pip install 'vlmtune[loggers]', or drop wandb from training.report_to"]
    assert not (tmp_path / "out").exists()


# -- GRPO, and the defaults ---------------------------------------------------------------------------
def test_grpo_logs_loss_and_rewards(shapes_dir, tmp_path, clean_env):
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out",
                       training={"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "report_to": ["tensorboard", "mlflow"]},
                       evaluation={"enabled": False}, grpo={"num_generations": 4, "prompts_per_step": 1, "max_completion_length": 4, "probe_samples": 0})
    assert main(["grpo", str(cfg)]) == 0
    run = tmp_path / "out" / RUN
    m = json.loads((run / "metrics.json").read_text())
    rewards = [(h["step"], pytest.approx(h["reward"], rel=1e-6)) for h in m["grpo_history"]]
    assert len(rewards) == 2
    ea = _tb(run / "logs" / "tensorboard")
    assert _curve(ea, "train/reward") == rewards
    assert _curve(ea, "train/loss") == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in m["train_loss_history"]]
    assert _curve(ea, "run/final_train_loss") == [(2, pytest.approx(m["final_train_loss"], rel=1e-6))]

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "out" / "mlruns").as_uri())
    (r,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert r.info.run_name == "t/q__r8" and r.info.status == "FINISHED"
    assert [(x.step, x.value) for x in client.get_metric_history(r.info.run_id, "reward")] == rewards
    assert r.data.metrics["run/final_train_loss"] == pytest.approx(m["final_train_loss"], rel=1e-6)


def test_a_staged_run_logs_each_stage_nested_in_the_runs_own(shapes_dir, tmp_path, clean_env):
    """The grid's loggers reach every stage's Trainer (passed down through train_staged to
    train_run): one mlflow run for the run, each stage's training nested under it, the final
    metrics in the run's own."""
    stages = [{"name": "proj", "training_mode": "projector", "max_steps": 1}, {"name": "llm", "training_mode": "llm", "max_steps": 1}]
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out",
                       training={"stages": stages, "logging_steps": 1, "save_strategy": "no", "report_to": "mlflow"},
                       evaluation={"enabled": False})
    assert main(["train", str(cfg)]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "out" / "mlruns").as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])}
    assert set(runs) == {"t/q__r8", "t/q__r8/stage_1_proj", "t/q__r8/stage_2_llm"}
    top = runs["t/q__r8"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    m = json.loads((tmp_path / "out" / RUN / "metrics.json").read_text())
    assert top.data.metrics["run/final_train_loss"] == pytest.approx(m["final_train_loss"], rel=1e-6)
    for stage in ("stage_1_proj", "stage_2_llm"):
        r = runs[f"t/q__r8/{stage}"]
        assert r.data.tags.get("mlflow.parentRunId") == top.info.run_id
        sm = json.loads((tmp_path / "out" / RUN / stage / "metrics.json").read_text())
        assert [(x.step, x.value) for x in client.get_metric_history(r.info.run_id, "loss")] \
            == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in sm["train_loss_history"]] != []


def test_where_and_how_each_logger_is_set_up(tmp_path, clean_env, monkeypatch):
    from vlmtune.config import config_from_dict
    from vlmtune.train import loggers as L

    assert L.requested("none") == [] and L.requested(["none"]) == [] and L.requested("wandb") == ["wandb"]
    assert L.requested(["tensorboard", "mlflow", "tensorboard"]) == ["tensorboard", "mlflow"]
    cfg = config_from_dict({"experiment_name": "e", "output_dir": str(tmp_path / "o"), "models": [{"name": "m", "hf_model_id": "tiny:qwen2_5_vl"}],
                            "data": {"train_csv": "x.csv"}, "training": {"report_to": "mlflow"}}, "test")
    assert L.mlflow_tracking_uri(cfg) == (tmp_path / "o" / "mlruns").as_uri()
    L.preflight(cfg)
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true" and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    # a server: no file-store flag; the user's own settings are kept
    for var in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    L.preflight(cfg)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"

    assert L.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert L.wandb_mode() == "online"  # `wandb login` was run
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert L.wandb_mode() == "disabled"
    assert L.tracker_run_name(cfg, "m__v") == "e/m__v"
