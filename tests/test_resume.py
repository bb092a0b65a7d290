"""Runs that survive interruption: SIGKILL at several moments then --resume gives exactly the
uninterrupted run's result; Ctrl-C and SIGTERM leave a resumable folder; no silent overwrite;
early stopping; threads; experiment logs read back with the libraries' own readers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lfw_arrays, write_folders
from typer.testing import CliRunner

from transferkit.cli import app

pytestmark = pytest.mark.slow  # every test trains, most in subprocesses

SRC = str(Path(__file__).resolve().parents[1] / "src")
SETTINGS = ["--image-size", "32", "--epochs", "4", "--fine-tune-epochs", "3", "--batch-size", "8",
            "--threads", "1", "--cache-dir", ""]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    images, _ = lfw_arrays()
    return write_folders(tmp_path_factory.mktemp("resume") / "data",
                         {"face": list(images[:30]), "background": list(images[100:130])})


def command(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), *SETTINGS, *extra]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "CI": "1", "HF_HUB_OFFLINE": "1"}


def train_until(data: Path, out: Path, trigger: str, sig: int = signal.SIGKILL, *extra) -> tuple[int, str]:
    """Start a training process, send `sig` as soon as its log shows `trigger`; (exit code, log)."""
    process = subprocess.Popen(command(data, out, *extra), env=environment(), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    log = []
    for line in process.stderr:
        log.append(line)
        if trigger in line:
            process.send_signal(sig)
            break
    log.extend(process.stderr)
    return process.wait(120), "".join(log)


def train_to_the_end(data: Path, out: Path, *extra) -> str:
    result = subprocess.run(command(data, out, *extra), env=environment(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def outcome(run: Path) -> dict:
    """What must be identical: the history without its timings, the weights' hash, the metrics."""
    with open(run / "history.csv") as fh:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]
    meta = json.loads((run / "model.json").read_text())
    return {"history": history, "model_sha256": meta["model_sha256"], "status": meta["status"],
            "metrics": json.loads((run / "metrics.json").read_text())}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "run"
    train_to_the_end(data, out)
    return outcome(out)


@pytest.mark.parametrize("moment, trigger", [
    ("decoding", "fine_tune_at ="),
    ("extraction", "Cache:"),
    ("phase 1", "epoch   2 phase 1"),
    ("phase 2", "epoch   6 phase 2"),
    ("saving", "Calibration on validation"),
])
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(data, tmp_path, uninterrupted, moment, trigger):
    out = tmp_path / "run"
    code, log = train_until(data, out, trigger)
    assert code == -signal.SIGKILL, log
    meta = json.loads((out / "model.json").read_text())
    assert meta["status"] == "running"  # killed: no chance to say more, and nothing claims to be complete
    predicted = CliRunner().invoke(app, ["predict", str(out), str(data / "face" / "000.png")])
    assert predicted.exit_code == 2 and "not complete" in predicted.output and "--resume" in predicted.output
    log = train_to_the_end(data, out, "--resume")
    if moment in ("phase 2", "saving"):
        assert "Resuming after epoch" in log, log
    assert outcome(out) == uninterrupted
    assert not list(out.glob("checkpoint*")) and not (out / "cache").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_leave_an_interrupted_resumable_run(data, tmp_path, uninterrupted, sig, code):
    out = tmp_path / "run"
    exit_code, log = train_until(data, out, "epoch   5 phase 2", sig)
    assert exit_code == code, log
    assert "Traceback" not in log
    assert f"transferkit train {data} --out {out} --resume" in log.strip().splitlines()[-1]
    assert json.loads((out / "model.json").read_text())["status"] == "interrupted"
    log = train_to_the_end(data, out, "--resume")
    assert "Resuming after epoch 5 (phase 2)" in log
    assert outcome(out) == uninterrupted


def test_a_complete_run_is_never_overwritten_silently(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    train_to_the_end(data, out)
    before = (out / "model.safetensors").read_bytes()
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(data), "--out", str(out), *SETTINGS, "--seed", "3"])
    assert result.exit_code == 2 and "holds a complete run" in result.output and "--overwrite" in result.output
    assert (out / "model.safetensors").read_bytes() == before
    resumed = runner.invoke(app, ["train", str(data), "--out", str(out), *SETTINGS, "--resume"])
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output
    result = runner.invoke(app, ["train", str(data), "--out", str(out), *SETTINGS, "--seed", "3", "--overwrite",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["status"] == "complete"
    assert (out / "model.safetensors").read_bytes() != before
    assert not list(tmp_path.glob(".run.*"))  # the staging folder is gone


def test_resume_keeps_the_runs_own_settings(data, tmp_path):
    out = tmp_path / "run"
    code, _ = train_until(data, out, "epoch   2 phase 1")
    assert code == -signal.SIGKILL
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--resume", "--epochs", "9"])
    assert result.exit_code == 2 and "resume continues with the run's own settings: epochs is 4" in result.output
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(out)])
    assert result.exit_code == 2 and "holds an unfinished run (running)" in result.output
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(out), "--resume"])
    assert result.exit_code == 2 and f"was started on {data}, not {tmp_path}" in result.output


def test_early_stopping_stops_where_the_history_says(data, tmp_path):
    """lr 0.05 overfits the head within a few epochs and makes phase 2 diverge: with patience 2 both
    phases must stop early, each at the first epoch that is 2 epochs past the phase's best val_loss;
    without patience the same run trains every epoch, through the same phase-1 history."""
    import transferkit

    settings = dict(image_size=32, epochs=12, fine_tune_epochs=8, lr=0.05, batch_size=8, cache_dir="", threads=1,
                    monitor="val_loss")
    transferkit.train(data, tmp_path / "stopped", patience=2, **settings)
    transferkit.train(data, tmp_path / "full", **settings)

    def history(run):
        with open(run / "history.csv") as fh:
            return list(csv.DictReader(fh)), json.loads((run / "model.json").read_text())

    rows, meta = history(tmp_path / "stopped")
    assert set(meta["early_stopping"]) == {"1", "2"}, meta["early_stopping"]
    for phase, planned in (("1", 12), ("2", 8)):
        mine = [r for r in rows if r["phase"] == phase]
        losses = [float(r["val_loss"]) for r in mine]
        best, stop = 0, None
        for i in range(1, planned):  # the rule, from the history: stop 2 epochs after the best
            if i >= len(losses):
                break
            best = i if losses[i] < losses[best] else best
            if i - best >= 2:
                stop = i
                break
        assert stop is not None and stop + 1 < planned, (phase, losses)
        assert len(mine) == stop + 1, (phase, losses)
        assert meta["early_stopping"][phase] == {
            "epoch": int(mine[stop]["epoch"]),
            "reason": f"no better val_loss than epoch {mine[best]['epoch']} for 2 epoch(s)"}
    assert "stopped early" in (tmp_path / "stopped" / "report.html").read_text()

    full, full_meta = history(tmp_path / "full")
    assert not full_meta.get("early_stopping")
    assert [r["phase"] for r in full] == ["1"] * 12 + ["2"] * 8
    phase1 = [r for r in rows if r["phase"] == "1"]
    assert [r["val_loss"] for r in full[:len(phase1)]] == [r["val_loss"] for r in phase1]


def test_free_cores_leave_out_this_process_and_measure_afresh_when_the_last_look_is_old(monkeypatch):
    from transferkit.utils import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    slept = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    # (idle, total, this process) CPU seconds: 2 s of wall time on 4 cores is 8 CPU seconds
    monkeypatch.setattr(runtime, "_last_sample", (0.0, 0.0, 0.0))
    monkeypatch.setattr(runtime, "_cpu_times", lambda: (4.0, 8.0, 4.0))  # all busy time is ours
    assert runtime.free_cores() == 4 and slept == []
    monkeypatch.setattr(runtime, "_cpu_times", lambda: (6.0, 16.0, 6.0))  # others kept 2 cores busy
    assert runtime.free_cores() == 2 and slept == []
    samples = iter([(1000.0, 2000.0, 10.0), (1000.5, 2001.0, 10.0)])  # 250 s later: measure over 0.25 s
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(samples))
    assert runtime.free_cores() == 2 and slept == [0.25]


def test_threads_follow_the_setting_and_default_to_the_free_cores(data, tmp_path):
    from transferkit.utils.runtime import free_cores, usable_cores

    assert 1 <= free_cores() <= usable_cores()
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), *SETTINGS])
    assert result.exit_code == 0 and "1 thread(s)" in result.output


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_experiment_logs_hold_every_epoch(data, tmp_path, monkeypatch, kind):
    import transferkit

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "run"
    transferkit.train(data, out, image_size=32, epochs=3, fine_tune_epochs=2, batch_size=8, cache_dir="",
                      threads=1, log_to=kind)
    with open(out / "history.csv") as fh:
        expected = [float(r["val_loss"]) for r in csv.DictReader(fh)]
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("val_loss")]
        final = events.Scalars("final/accuracy")[0].value
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        (found,) = client.search_runs([client.get_experiment_by_name("transferkit").experiment_id])
        logged = [(m.step, m.value) for m in sorted(client.get_metric_history(found.info.run_id, "val_loss"),
                                                     key=lambda m: m.step)]
        final = found.data.metrics["final_accuracy"]
        assert json.loads(found.data.params["epochs"]) == 3
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)
    assert final == pytest.approx(accuracy)
