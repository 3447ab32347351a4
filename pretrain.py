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

import argparse
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt.config import DataConfig, ModelConfig, Section, TrainConfig, load_config, save_config_json
from gpt.data import BatchLoader, SlidingWindowDataset, TokenFileDataset, iterate_eval, load_text_corpus
from gpt.errors import UserError, run_cli
from gpt.evaluate import language_model_metrics, next_token_loss
from gpt.generate import generate
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer
from gpt.runtime import setup_runtime
from gpt.train import TrainTask, train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.toml"


@dataclass
class SampleConfig(Section):
    """The greedy sample printed before and after training."""

    section_name: typing.ClassVar[str] = "sample"

    prompt: str = field(default="I was", metadata={"help": "text the model continues"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens to generate"})

    def __post_init__(self) -> None:
        self._check_types()


SECTIONS: dict[str, type[Section]] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig,
                                      "sample": SampleConfig}


def parse_args(argv: list[str]) -> dict[str, Section]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any with --section.field value):\n"
        + "\n".join(line for cls in SECTIONS.values() for line in cls.field_help()),
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML config file (default: configs/tiny.toml)")
    args, overrides = parser.parse_known_args(argv)
    return load_config(SECTIONS, args.config, overrides)


def build_datasets(data: DataConfig, context_length: int, tokenizer) -> tuple[object, object]:
    """Training and validation windows: from prepared token files (a folder with train.bin/val.bin) or from text."""
    path = Path(data.path)
    if path.is_dir() and (path / "train.bin").exists():
        return TokenFileDataset(path / "train.bin", context_length), TokenFileDataset(path / "val.bin", context_length)
    train_tokens, val_tokens, _ = load_text_corpus(path, tokenizer, data.val_fraction)
    stride = data.stride or context_length
    return (SlidingWindowDataset(train_tokens, context_length, stride, name="the training split"),
            SlidingWindowDataset(val_tokens, context_length, context_length, name="the validation split"))


def greedy_sample(model: GPT, tokenizer, sample: SampleConfig) -> str:
    ids = torch.tensor(tokenizer.encode(sample.prompt), device=model.tok_emb.weight.device)
    room = model.config.context_length - len(ids)
    out = generate(model, ids, max_new_tokens=min(sample.max_new_tokens, room), temperature=0.0)
    return tokenizer.decode(out.tolist())


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    model_cfg, train_cfg, data_cfg, sample_cfg = (config[k] for k in ("model", "train", "data", "sample"))
    with setup_runtime(train_cfg, "pretrain") as runtime:
        tokenizer = get_tokenizer("gpt2")
        if model_cfg.vocab_size < tokenizer.n_vocab:
            raise UserError(f"model.vocab_size: {model_cfg.vocab_size} is smaller than the GPT-2 tokenizer's {tokenizer.n_vocab}")

        train_set, val_set = build_datasets(data_cfg, model_cfg.context_length, tokenizer)
        loader = BatchLoader(train_set, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                             rank=runtime.rank, world_size=runtime.world_size)
        model = GPT(model_cfg)
        if runtime.is_main:
            save_config_json(config, runtime.out_dir / "config.json")
            print(f"model: {model.num_parameters():,} parameters; train windows {len(train_set):,}, "
                  f"val windows {len(val_set):,}; device {runtime.device}, precision {runtime.autocast_dtype}; "
                  f"run folder {runtime.out_dir}")
            print(f"sample before training: {greedy_sample(model, tokenizer, sample_cfg)!r}")

        task = TrainTask(
            model=model,
            train_batches=loader,
            loss=next_token_loss,
            evaluate=lambda m: language_model_metrics(
                m, iterate_eval(val_set, train_cfg.batch_size, max_batches=train_cfg.eval_batches), runtime.device),
            batch_tokens=lambda batch: batch[1].numel(),
            tokenizer="gpt2",
        )
        result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
    if runtime.is_main:
        print(f"sample after training:  {greedy_sample(model, tokenizer, sample_cfg)!r}")
        if result.last_val:
            print(f"final validation loss {result.last_val['loss']:.4f}, perplexity {result.last_val['ppl']:.2f} "
                  f"(best {result.best_val_loss:.4f}); {result.steps} steps, "
                  f"{result.tokens_per_s:,.0f} tokens/s over {result.train_seconds:.0f} s of training")
    return 0


if __name__ == "__main__":
    run_cli(main)
