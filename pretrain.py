"""Pretrain a GPT from scratch on next-token prediction.

    python pretrain.py                                   # configs/tiny.toml on data/botchan.txt, a few CPU minutes
    python pretrain.py --train.max_steps 50 --model.n_layer 2
    python pretrain.py --config configs/gpt2-124m.toml  # a GPU run on token files from `python -m gpt prepare`
    torchrun --nproc_per_node 4 pretrain.py --config configs/gpt2-124m.toml --train.out_dir runs/gpt2

It prints a greedy sample before and after training (same prompt) and the final
validation loss and perplexity; the run folder holds config.json, metrics.jsonl and
checkpoints/ (latest.pt, best.pt). `--train.resume auto` continues an interrupted run.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt.config import DataConfig, ModelConfig, Section, TrainConfig, save_config_json
from gpt.data import pretraining_windows
from gpt.errors import ConfigError, UserError, run_cli
from gpt.scripts import parse_script_args
from gpt.generate import generate
from gpt.model import GPT
from gpt.runtime import setup_runtime
from gpt.tasks import pretrain_task
from gpt.tokenizer import Tokenizer, get_tokenizer
from gpt.train import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.toml"


@dataclass
class SampleConfig(Section):
    """The greedy sample printed before and after training."""

    section_name: typing.ClassVar[str] = "sample"

    prompt: str = field(default="I was", metadata={"help": "text the model continues"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens to generate"})

    def __post_init__(self) -> None:
        self._check_types()
        if not self.prompt:
            raise ConfigError("sample.prompt: must not be empty")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens: must be at least 1, got {self.max_new_tokens}")


SECTIONS: dict[str, type[Section]] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig,
                                      "sample": SampleConfig}


def greedy_sample(model: GPT, tokenizer: Tokenizer, sample: SampleConfig) -> str:
    """The model's greedy continuation of the sample prompt, as text."""
    ids = torch.tensor(tokenizer.encode(sample.prompt), device=model.tok_emb.weight.device)
    room = model.config.context_length - len(ids)
    out = generate(model, ids, max_new_tokens=min(sample.max_new_tokens, room), temperature=0.0)
    return tokenizer.decode(out.tolist())


def main(argv: list[str] | None = None) -> int:
    _, config = parse_script_args(sys.argv[1:] if argv is None else argv, description=__doc__, sections=SECTIONS,
                                  default_config=DEFAULT_CONFIG)
    model_cfg, train_cfg, data_cfg, sample_cfg = (config[k] for k in ("model", "train", "data", "sample"))
    tokenizer = get_tokenizer("gpt2")
    if model_cfg.vocab_size < tokenizer.n_vocab:
        raise UserError(f"model.vocab_size: {model_cfg.vocab_size} is smaller than the GPT-2 tokenizer's {tokenizer.n_vocab}")
    prompt_tokens = len(tokenizer.encode(sample_cfg.prompt))
    if prompt_tokens >= model_cfg.context_length:
        raise UserError(f"sample.prompt: {prompt_tokens} tokens leave no room in model.context_length "
                        f"{model_cfg.context_length}")
    # Bad data stops here, before a run folder exists (the windows depend on no random state).
    train_set, val_set = pretraining_windows(data_cfg.path, model_cfg.context_length, tokenizer, data_cfg.val_fraction,
                                             data_cfg.stride, vocab_size=model_cfg.vocab_size)
    with setup_runtime(train_cfg, "pretrain") as runtime:
        model = GPT(model_cfg)
        if runtime.is_main:
            save_config_json(config, runtime.out_dir / "config.json")
            print(f"model: {model.num_parameters():,} parameters; train windows {len(train_set):,}, "
                  f"val windows {len(val_set):,}; device {runtime.device}, precision {runtime.autocast_dtype}; "
                  f"run folder {runtime.out_dir}")
            print(f"sample before training: {greedy_sample(model, tokenizer, sample_cfg)!r}")
        task = pretrain_task(model, train_set, val_set, train_cfg, runtime)
        result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
    if runtime.is_main:
        print(f"sample after training:  {greedy_sample(model, tokenizer, sample_cfg)!r}")
        if result.last_val:
            print(f"final validation loss {result.last_val['loss']:.4f}, perplexity {result.last_val['ppl']:.2f} "
                  f"(best {result.best_val_loss:.4f}); {result.steps} steps, "
                  f"{result.tokens_per_s:,.0f} tokens/s over {result.train_seconds:.0f} s of training")
    return result.exit_code  # non-zero when a signal stopped the run (after saving it)


if __name__ == "__main__":
    run_cli(main)
