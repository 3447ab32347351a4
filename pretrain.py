"""Pretrain a GPT on next-token prediction: from scratch, or continuing a trained model on new text.

    python pretrain.py                                   # configs/tiny.toml on data/botchan.txt, a few CPU minutes
    python pretrain.py --train.max_steps 50 --model.n_layer 2
    python pretrain.py --config configs/gpt2-124m.toml  # a GPU run on token files from `python -m gpt prepare`
    torchrun --nproc_per_node 4 pretrain.py --config configs/gpt2-124m.toml --train.out_dir runs/gpt2
    python pretrain.py --init.from smollm2-135m-instruct --data.path new_texts/ --data.window 256 \\
        --eval.reference data/botchan.txt --train.trainable lora      # continued pretraining

It prints a greedy sample before and after training (same prompt) and the final
validation loss and perplexity; the run folder holds config.json, metrics.jsonl and
checkpoints/ (latest.pt, best.pt). `--train.resume auto` continues an interrupted run.

`--init.from M` continues training the model M (anything `--model` takes: a known name, a
GGUF file, a Hugging Face folder, one of our checkpoints or run folders) with its own
architecture and its own tokenizer, which tokenizes the data (a prepared token folder must
have been written with it: `python -m gpt prepare TEXT --out DIR --tokenizer M`), the sample and the
reference text, and which every checkpoint records. Such a run measures the model before
training and after it (the best weights): loss, perplexity and bits per byte on the
validation split (the windows the training loop evaluates) and on `--eval.reference`, a
text of what the model should not forget; it writes them to continued.json and the final
model, LoRA adapters merged in, to checkpoints/final.pt.
"""

from __future__ import annotations

import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import DataConfig, InitConfig, LoRAConfig, ModelConfig, Section, TrainConfig, save_config_json
from gpt.data import iterate_eval, pretraining_windows
from gpt.errors import ConfigError, UserError, run_cli
from gpt.evaluate import language_model_metrics, text_metrics
from gpt.files import write_json
from gpt.generate import generate
from gpt.grow import describe_growth, grow_model, parse_grow_spec
from gpt.model import GPT
from gpt.runtime import Runtime, peak_memory_mib, setup_runtime
from gpt.scripts import (
    FinetuneTrainConfig,
    best_weights,
    describe_parameters,
    parse_script_args,
    quantize_base,
    set_trainable,
)
from gpt.tasks import pretrain_task
from gpt.tokenizer import Tokenizer, get_tokenizer
from gpt.train import train
from gpt.weights import LoadedModel, load_model_and_tokenizer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.toml"


@dataclass
class PretrainTrainConfig(FinetuneTrainConfig):
    """The shared training fields, plus what trains: every parameter (the default) or LoRA adapters."""

    kinds: typing.ClassVar[tuple[str, ...]] = ("all", "lora")

    trainable: str = field(default="all", metadata={"help": "all | lora (adapters, see [lora]; the final "
                                                            "checkpoint has them merged)"})
    quantize: str = field(default="none", metadata={"help": "none | int8 | int4 | int4:G: freeze the model's block "
                                                            "projections in that format before training "
                                                            "(QLoRA-style: with trainable lora)"})


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


@dataclass
class ReferenceConfig(Section):
    """A text measured after training (and before it, with init.from), to see what training forgot."""

    section_name: typing.ClassVar[str] = "eval"

    reference: str = field(default="", metadata={"help": "UTF-8 text file: loss, perplexity and bits per byte on "
                                                         "it, in windows of data.window; empty = none"})


SECTIONS: dict[str, type[Section]] = {"model": ModelConfig, "train": PretrainTrainConfig, "data": DataConfig,
                                      "init": InitConfig, "lora": LoRAConfig, "eval": ReferenceConfig,
                                      "sample": SampleConfig}


def greedy_sample(model: GPT, tokenizer: Tokenizer, sample: SampleConfig) -> str:
    """The model's greedy continuation of the sample prompt, as text. Ids past the tokenizer's vocabulary (the
    rows of a padded embedding, which an untrained model may well pick) stand for no text."""
    ids = torch.tensor(tokenizer.encode(sample.prompt), device=model.tok_emb.weight.device)
    room = model.config.context_length - len(ids)
    out = generate(model, ids, max_new_tokens=min(sample.max_new_tokens, room), temperature=0.0)
    return tokenizer.decode([i for i in out.tolist() if i < tokenizer.n_vocab])


def starting_model(argv: list[str], init: InitConfig, seed: int) -> LoadedModel | None:
    """The trained model init.from names, with its tokenizer, grown as init.grow says (`gpt.grow`, its new
    weights drawn from `seed`); None for a model from scratch (built later, once the run is seeded).
    `--model.*` overrides are refused for a trained model, which keeps its shape."""
    if not init.from_:
        return None
    shape_overrides = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--model.")]
    if shape_overrides:
        raise UserError(f"{shape_overrides[0]}: model.* settings apply to a model from scratch only; "
                        f"init.from {init.from_} keeps its own config (init.grow grows it)")
    sizes = parse_grow_spec(init.grow, "init.grow") if init.grow else None
    loaded = load_model_and_tokenizer(init.from_, seed=seed)
    if sizes is None:
        return loaded
    grown = grow_model(loaded.model, seed=seed, **sizes)
    growth = describe_growth(loaded.model.config, grown.config)
    return replace(loaded, model=grown, description=f"{loaded.description}, {growth}")


def read_reference(path: str) -> str | None:
    """The text of eval.reference, or None when there is none."""
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"eval.reference: cannot read {path} ({err})") from None
    if not text.strip():
        raise UserError(f"eval.reference: {path} holds no text")
    return text


def run_tokenizer(loaded: LoadedModel | None, spec: str) -> tuple[Tokenizer, str]:
    """The tokenizer of the run and the name its checkpoints record (which loads it again): a continued model's
    own, else data.tokenizer (gpt2 when empty): gpt2, bytes, a train-tokenizer folder or a GGUF file."""
    if loaded:
        if spec:
            raise UserError(f"data.tokenizer: {spec!r}, but a continued model keeps its own tokenizer "
                            f"({loaded.tokenizer_name}); leave data.tokenizer empty with init.from")
        return loaded.tokenizer, loaded.tokenizer_name
    spec = spec or "gpt2"
    path = Path(spec).expanduser()
    return get_tokenizer(spec), str(path.resolve()) if spec not in ("gpt2", "bytes") and path.exists() else spec


def validation_metrics(model: GPT, tokenizer: Tokenizer, val_set: Any, cfg: TrainConfig,
                       device: torch.device) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the validation windows the training loop evaluates (the same
    `iterate_eval` batches, so the loss is its validation loss). Bits per byte divides the targets' summed
    loss by their own bytes (`decode_bytes`; a special token counts as its text)."""
    metrics = language_model_metrics(model, iterate_eval(val_set, cfg.batch_size, max_batches=cfg.eval_batches),
                                     device)
    scored_bytes = sum(len(tokenizer.decode_bytes(targets.flatten().tolist()))
                       for _, targets in iterate_eval(val_set, cfg.batch_size, max_batches=cfg.eval_batches))
    loss, tokens = metrics["loss"], int(metrics["tokens"])
    return {"scored_tokens": tokens, "scored_bytes": scored_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": loss * tokens / (math.log(2) * scored_bytes)}


def measure(model: GPT, tokenizer: Tokenizer, val_set: Any, reference: str | None, window: int, cfg: TrainConfig,
            runtime: Runtime, validation: bool = True) -> dict[str, dict[str, float]]:
    """The figures continued.json holds for one model: "validation" (unless not asked for) and "reference"
    (when there is a reference text, scored in windows of `window` that do not overlap)."""
    was_training = model.training
    model.eval()
    figures = {}
    with torch.no_grad(), runtime.autocast():
        if validation:
            figures["validation"] = validation_metrics(model, tokenizer, val_set, cfg, runtime.device)
        if reference is not None:
            figures["reference"] = text_metrics(model, tokenizer, reference, window, window, cfg.batch_size)
    model.train(was_training)
    return figures


def change_line(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """"validation ppl 30.58 -> 21.30, bits/byte ...; reference ppl 15.20 -> 16.00, ... (forgetting +5.3%)":
    the figures of `after`, each next to its value in `before` where that has it."""
    parts = []
    for name, now in after.items():
        if name not in before:
            parts.append(f"{name} ppl {now['perplexity']:.2f}, bits/byte {now['bits_per_byte']:.4f}")
            continue
        was = before[name]
        part = (f"{name} ppl {was['perplexity']:.2f} -> {now['perplexity']:.2f}, "
                f"bits/byte {was['bits_per_byte']:.4f} -> {now['bits_per_byte']:.4f}")
        if name == "reference":
            part += f" (forgetting {100 * (now['perplexity'] / was['perplexity'] - 1):+.1f}%)"
        parts.append(part)
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    _, config = parse_script_args(argv, description=__doc__, sections=SECTIONS, default_config=DEFAULT_CONFIG)
    train_cfg, data_cfg, init_cfg, lora_cfg, sample_cfg = (config[k] for k in ("train", "data", "init", "lora",
                                                                                "sample"))
    # Bad input stops here, before a run folder exists (none of this draws random numbers).
    loaded = starting_model(argv, init_cfg, train_cfg.seed)
    if loaded is not None:
        config["model"] = loaded.model.config  # config.json records the model this run trains
    model_cfg = config["model"]
    tokenizer, tokenizer_name = run_tokenizer(loaded, data_cfg.tokenizer)
    if model_cfg.vocab_size < tokenizer.n_vocab:
        raise UserError(f"model.vocab_size: {model_cfg.vocab_size} is smaller than the {tokenizer_name} "
                        f"tokenizer's {tokenizer.n_vocab}")
    window = data_cfg.window_for(model_cfg.context_length)
    prompt_tokens = len(tokenizer.encode(sample_cfg.prompt))
    if prompt_tokens >= model_cfg.context_length:
        raise UserError(f"sample.prompt: {prompt_tokens} tokens leave no room in model.context_length "
                        f"{model_cfg.context_length}")
    reference = read_reference(config["eval"].reference)
    train_set, val_set = pretraining_windows(data_cfg.path, window, tokenizer, data_cfg.val_fraction, data_cfg.stride,
                                             vocab_size=model_cfg.vocab_size, train_tokens=data_cfg.train_tokens,
                                             filters=data_cfg.filter_settings(),
                                             verbose=int(os.environ.get("RANK", "0")) == 0)
    with setup_runtime(train_cfg, "pretrain") as runtime:
        model = loaded.model if loaded else GPT(model_cfg)
        model.to(runtime.device)
        quantized = quantize_base(model, train_cfg.quantize)
        if runtime.is_main:
            save_config_json(config, runtime.out_dir / "config.json")
            source = f"{loaded.description}; " if loaded else ""
            print(f"model: {source}{model.num_parameters():,} parameters; train windows {len(train_set):,}, "
                  f"val windows {len(val_set):,} of {window} tokens; device {runtime.device}, "
                  f"precision {runtime.autocast_dtype}; run folder {runtime.out_dir}")
            if quantized:
                print(quantized)
            print(f"sample before training: {greedy_sample(model, tokenizer, sample_cfg)!r}")
        before = measure(model, tokenizer, val_set, reference, window, train_cfg, runtime) \
            if loaded and runtime.is_main else {}
        if before:
            print(f"before training: {change_line({}, before)}")
        lora = lora_cfg.settings() if train_cfg.trainable == "lora" else None
        trains = set_trainable(model, train_cfg.trainable, lora)
        if runtime.is_main and lora:
            print(f"trains: {trains}; {describe_parameters(model)}")
        task = pretrain_task(model, train_set, val_set, train_cfg, runtime, tokenizer=tokenizer_name,
                             target_bytes=lambda targets: len(tokenizer.decode_bytes(targets.flatten().tolist())))
        result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
        runtime.leave_process_group()  # the rest is rank 0's alone
        if not runtime.is_main:
            return result.exit_code
        model = result.model  # the same model; under FSDP the whole of it, gathered from the shards
        print(f"sample after training:  {greedy_sample(model, tokenizer, sample_cfg)!r}")
        if result.last_val:
            bits = result.last_val.get("bits_per_byte")  # a run resumed from before it was recorded lacks it
            print(f"final validation loss {result.last_val['loss']:.4f}, perplexity {result.last_val['ppl']:.2f}"
                  + (f", bits per byte {bits:.4f}" if bits is not None else "")
                  + f" (best {result.best_val_loss:.4f}); {result.steps} steps, "
                  f"{result.tokens_per_s:,.0f} tokens/s over {result.train_seconds:.0f} s of training")
        if result.interrupted or not (loaded or lora or reference is not None):
            return result.exit_code  # an interrupted run has said how to resume
        final = best_weights(model, runtime.out_dir, runtime.device, lora_body=model if lora else None)
        if loaded or lora:
            save_checkpoint(final, model, tokenizer=tokenizer_name, step=result.steps)
        after = measure(model, tokenizer, val_set, reference, window, train_cfg, runtime, validation=bool(loaded))
        if loaded:
            write_json(runtime.out_dir / "continued.json", {
                "init_from": init_cfg.from_, "grow": init_cfg.grow, "model": loaded.description,
                "tokenizer": tokenizer_name,
                "trainable": train_cfg.trainable, "trains": trains, "data": data_cfg.path,
                "reference": config["eval"].reference, "window": window, "steps": result.steps,
                "train_seconds": round(result.train_seconds, 1),
                "wall_seconds": round(time.perf_counter() - started, 1),
                "peak_memory_mib": round(peak_memory_mib(runtime.device)), "before": before, "after": after})
        print(f"{'before -> after (best weights)' if loaded else 'best weights'}: {change_line(before, after)}")
        if loaded:
            print(f"wrote {runtime.out_dir / 'continued.json'} and {final}")
        return 0


if __name__ == "__main__":
    run_cli(main)
