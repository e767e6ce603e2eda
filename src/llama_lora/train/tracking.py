"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

A sink receives exactly what `run_dir.MetricsLog` writes to metrics.jsonl: per record, its numeric values
except `step` and `epoch`, logged at the record's step under the record's key names (`loss`, `eval_loss`,
`learning_rate`, `tokens_per_second`). W&B and MLflow also get the resolved config, which holds no secrets
(the hub token comes from the environment and goes nowhere else). Each backend is imported only when asked
for; only the main process opens sinks.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

from llama_lora.config import Config, flatten
from llama_lora.errors import ConfigError

# backend -> (module that must be importable, pip package that provides it)
BACKENDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self, ok: bool = True) -> None: ...


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_installed(backends: list[str]) -> None:
    """Fail before any slow work or any file is written when a requested tracker cannot be imported."""
    for name in backends:
        module, package = BACKENDS[name]
        if not _installed(module):
            raise ConfigError(
                f"train.report_to: {name} is not installed; run `pip install {package}` "
                f"(or `pip install 'llama-lora[{name}]'`) or remove it from train.report_to"
            )


class TensorBoardSink:
    """Event files in `<run>/tensorboard/`; `tensorboard --logdir runs/` compares runs side by side."""

    def __init__(self, writer):
        self.writer = writer  # a torch SummaryWriter, or anything with add_scalar/flush/close

    @classmethod
    def open(cls, run: Path) -> TensorBoardSink:
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(run / "tensorboard")))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, ok: bool = True) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """Offline by default (files in `<run>/wandb/`, `wandb sync` uploads them); WANDB_MODE overrides."""

    def __init__(self, run: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "llama-lora"),
            name=run.name,
            dir=str(run),
            config=config,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowSink:
    """To ./mlruns unless MLFLOW_TRACKING_URI says otherwise; experiment MLFLOW_EXPERIMENT_NAME or llama-lora."""

    def __init__(self, run: Path, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        if not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment("llama-lora")
        self.run = mlflow.start_run(run_name=run.name)
        mlflow.log_params(flatten(config))  # MLflow params are flat

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self, ok: bool = True) -> None:
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


def open_sinks(cfg: Config, run: Path, is_main: bool = True) -> list[Sink]:
    """The sinks `cfg.train.report_to` asks for; none on processes other than the main one."""
    if not is_main:
        return []
    check_installed(cfg.train.report_to)
    config = cfg.model_dump(mode="json")
    sinks: list[Sink] = []
    try:
        for name in cfg.train.report_to:
            if name == "tensorboard":
                sinks.append(TensorBoardSink.open(run))
            elif name == "wandb":
                sinks.append(WandbSink(run, config))
            elif name == "mlflow":
                sinks.append(MlflowSink(run, config))
    except BaseException:
        for sink in sinks:  # the ones already open must not be left dangling
            sink.close(ok=False)
        raise
    return sinks
