"""metrics.jsonl, one JSON record per line, plus Weights & Biases and TensorBoard when asked for.

Each record has a `step` and a `split` ("train" or "val") and numbers: the training
loop writes a "train" record every `log_interval` steps (loss, lr, tokens/s, gradient
norm, MFU, tokens seen) and a "val" record at every evaluation (validation metrics, lr,
tokens/s over the run). Only rank 0 logs. On resume, the lines an interrupted run wrote
after its last checkpoint are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from typing import Any

from .config import TrainConfig
from .errors import UserError
from .files import write_text
from .runtime import Runtime


class MetricsLog:
    """metrics.jsonl (always) plus Weights & Biases and TensorBoard when asked for; rank 0 only."""

    def __init__(self, runtime: Runtime, cfg: TrainConfig, run_config: dict[str, Any], resume_step: int | None):
        self.enabled = runtime.is_main
        self.path = runtime.out_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            self._drop_lines_after(resume_step)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb_project is set but wandb is not installed: pip install 'gpt[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(runtime.out_dir))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard is on but tensorboard is not installed: pip install 'gpt[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(runtime.out_dir / "tensorboard"))
        self.file = self.path.open("a", encoding="utf-8")

    def _drop_lines_after(self, step: int) -> None:
        """On resume, forget what an interrupted run logged after its last checkpoint (rewritten atomically)."""
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (and send its numbers to W&B / TensorBoard as `split/name`)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"{record['split']}/{k}": v for k, v in record.items()
                   if k not in ("step", "split") and isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
