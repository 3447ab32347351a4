"""metrics.jsonl, one JSON record per line, plus Weights & Biases and TensorBoard when asked for.

Each record has a `step` and a `split` ("train" or "val") and numbers: the training
loop writes a "train" record every `log_interval` steps (loss, lr, tokens/s, gradient
norm, MFU, tokens seen as "tokens", rank 0's peak memory so far as "peak_memory_mib":
torch's allocated peak on a GPU, the peak resident set elsewhere) and a "val" record at every evaluation (validation
metrics, lr, tokens/s over the run, "tokens_seen"; a language model's "tokens" there are
the validation tokens scored). Only rank 0 logs. gpt.curves reads the file back.

The file reads as one uninterrupted run, however often the run was stopped: on resume,
the records an interrupted run wrote after its last checkpoint are dropped (all of them
when it was killed before its first checkpoint and starts again from step 0), as is a
last line cut short by the kill, with a note; the cumulative counters (tokens seen)
continue from the checkpoint.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .config import TrainConfig
from .errors import UserError
from .files import disk_full_error, is_disk_full, parse_json_line, write_text
from .runtime import Runtime


class MetricsLog:
    """metrics.jsonl (always) plus Weights & Biases and TensorBoard when asked for; rank 0 only."""

    def __init__(self, runtime: Runtime, cfg: TrainConfig, run_config: dict[str, Any], start_step: int):
        """`start_step`: where the run starts (0 for a fresh run, the checkpoint's step on resume)."""
        self.enabled = runtime.is_main
        self.path = runtime.out_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = None
        if not self.enabled:
            return
        if self.path.exists():
            self._drop_lines_from(start_step)
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

    def _drop_lines_from(self, start_step: int) -> None:
        """Forget what an interrupted run logged after the checkpoint this run starts from (records after
        `start_step`; at step 0, all), and a last line the kill cut short; rewritten atomically."""
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines[-1].strip():  # no newline at the end: the last write was cut short
            print(f"[{self.path}: dropped a last line cut short by the interruption: {lines[-1][:60]!r}]",
                  file=sys.stderr)
        complete = [(number, line) for number, line in enumerate(lines[:-1], start=1) if line.strip()]
        kept = [line for number, line in complete
                if start_step > 0 and parse_json_line(line, f"{self.path}, line {number}").get("step", 0) <= start_step]
        if len(kept) < len(complete):
            print(f"[{self.path}: dropped {len(complete) - len(kept)} record(s) logged after step {start_step}, "
                  f"where this run continues]", file=sys.stderr)
        write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (and send its numbers to W&B / TensorBoard as `split/name`)."""
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.path, err) from None
            raise
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
