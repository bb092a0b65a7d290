"""Optional experiment logging (`log_to`): the per-epoch history, the settings and the final metrics,
to TensorBoard event files (RUN/tensorboard/) or an MLflow tracking store (MLFLOW_TRACKING_URI,
else MLflow's own default: ./mlflow.db, a local SQLite store; MLflow 3 keeps ./mlruns file stores
for MLFLOW_ALLOW_FILE_STORE=true). Both are optional extras: `pip install 'transferkit[tensorboard]'` or
`'transferkit[mlflow]'`. Nothing global is changed: the writers are objects of their own."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..utils.errors import ConfigError

EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
FINAL_KEYS = ("accuracy", "balanced_accuracy", "loss", "ece", "roc_auc", "average_precision")


class TensorBoardLog:
    """Scalars per epoch (step = epoch), the settings as text, the final metrics under final/."""

    def __init__(self, run_dir: Path, settings: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log_to tensorboard needs TensorBoard: pip install 'transferkit[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("settings", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in settings.items()))

    def epoch(self, row: dict) -> None:
        for key in EPOCH_KEYS:
            self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.add_scalar("phase", row["phase"], row["epoch"])
        self.writer.flush()

    def finish(self, metrics: dict) -> None:
        for key in FINAL_KEYS:
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"final/{key}", metrics[key], 0)
        self.writer.close()


class MlflowLog:
    """One MLflow run in the experiment "transferkit": settings as params, metrics per epoch (step =
    epoch), the final metrics as final_*."""

    def __init__(self, run_dir: Path, settings: dict):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("log_to mlflow needs MLflow: pip install 'transferkit[mlflow]'") from None
        self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
        experiment = self.client.get_experiment_by_name("transferkit")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("transferkit")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name,
                                             tags={"run_folder": str(run_dir.resolve())}).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, json.dumps(v)) for k, v in settings.items()])

    def epoch(self, row: dict) -> None:
        for key in (*EPOCH_KEYS, "phase"):
            self.client.log_metric(self.run_id, key, float(row[key]), step=int(row["epoch"]))

    def finish(self, metrics: dict) -> None:
        for key in FINAL_KEYS:
            if metrics.get(key) is not None:
                self.client.log_metric(self.run_id, f"final_{key}", float(metrics[key]))
        self.client.set_terminated(self.run_id)


LOGS = {"tensorboard": TensorBoardLog, "mlflow": MlflowLog}


def open_log(kind: str, run_dir: Path, settings: dict) -> TensorBoardLog | MlflowLog | None:
    """The logger `log_to` names, or None for "none"."""
    return LOGS[kind](run_dir, settings) if kind in LOGS else None
