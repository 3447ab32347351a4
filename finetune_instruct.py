"""Instruction-tune a model: prompt template, loss on the response, greedy answers scored against the references.

    python finetune_instruct.py                          # SmolLM2-135M-Instruct + LoRA on data/instructions.json
    python finetune_instruct.py --train.trainable all    # full fine-tuning instead of LoRA
    python finetune_instruct.py --data.mask_prompt false # the loss on the prompt tokens too
    python finetune_instruct.py --eval.mmlu 200          # and 200 fixed MMLU questions, before and after
    python finetune_instruct.py --model runs/pretrain-.../ --data.template alpaca --train.trainable all

`--model` takes a known name (fetched on first use, with a message), a GGUF file, a Hugging
Face folder, one of our checkpoints or run folders, or a preset for a model from scratch.
Records are Alpaca-style (`instruction`, optional `input`, `output`) or chat-style
(`messages`), in JSON or JSONL; a `split` field (train/val/test) keeps fixed splits,
otherwise a seeded split is drawn. Before training and after it, the model answers every
test prompt greedily (KV cache, stopping at the end-of-turn token); answers are scored by
exact match after normalizing case and whitespace, corpus BLEU and mean ROUGE-L, per task
family and overall, next to the mean loss of the reference responses. The run folder
gets responses.jsonl (both answers per test record), report.json (`before` and `after`),
report.md, and checkpoints/final.pt (the best weights, LoRA adapters merged in).
"""

from __future__ import annotations

import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gpt.checkpoint import save_checkpoint
from gpt.config import LoRAConfig, Section, save_config_json
from gpt.data import InstructDataConfig, describe_dataset, instruction_datasets, split_records
from gpt.errors import UserError, run_cli
from gpt.evaluate import general_knowledge
from gpt.evaluate.instruction import answer_rows, evaluate_split, write_reports
from gpt.scripts import (
    FinetuneTrainConfig,
    best_weights,
    describe_parameters,
    load_model,
    parse_script_args,
    quantize_base,
    set_trainable,
)
from gpt.lora import count_parameters
from gpt.prompts import read_instruction_records
from gpt.runtime import peak_memory_mib, setup_runtime
from gpt.tasks import instruct_task
from gpt.train import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "instruct.toml"
DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_HELP = "known name, .gguf, Hugging Face folder, checkpoint or run folder, or a preset (default: %(default)s)"


@dataclass
class InstructTrainConfig(FinetuneTrainConfig):
    """The shared training fields, plus what trains: LoRA adapters (the default) or everything."""

    kinds: typing.ClassVar[tuple[str, ...]] = ("lora", "all")

    trainable: str = field(default="lora", metadata={"help": "lora (adapters, see [lora]) | all (full fine-tuning)"})


SECTIONS: dict[str, type[Section]] = {"train": InstructTrainConfig, "data": InstructDataConfig, "lora": LoRAConfig,
                                      "eval": general_knowledge.EvalConfig}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    source, config = parse_script_args(sys.argv[1:] if argv is None else argv, description=__doc__,
                                       sections=SECTIONS, default_config=DEFAULT_CONFIG, model_default=DEFAULT_MODEL,
                                       model_help=MODEL_HELP)
    train_cfg, data_cfg, lora_cfg = config["train"], config["data"], config["lora"]
    mmlu = general_knowledge.load_subset(config["eval"])  # a missing MMLU file stops here, before any work
    with setup_runtime(train_cfg, "instruct") as runtime:
        loaded = load_model(source, seed=train_cfg.seed)
        model, tokenizer = loaded.model, loaded.tokenizer
        quantized = quantize_base(model, train_cfg.quantize)
        if data_cfg.max_length > model.config.context_length:
            raise UserError(f"data.max_length ({data_cfg.max_length}) exceeds the model's context length "
                            f"({model.config.context_length})")
        model.to(runtime.device)
        splits = split_records(read_instruction_records(data_cfg.path), data_cfg)
        datasets = instruction_datasets(splits, data_cfg.template, tokenizer, data_cfg.max_length,
                                        data_cfg.mask_prompt)
        if runtime.is_main:
            save_config_json(config, runtime.out_dir / "config.json")
            print(f"model: {loaded.description}; {model.num_parameters():,} parameters; template {data_cfg.template}")
            if quantized:
                print(quantized)
            print("\n".join(describe_dataset(name, dataset) for name, dataset in datasets.items()))

        def evaluate_test() -> tuple[dict, list[str]]:
            return evaluate_split(model, tokenizer, splits["test"], datasets["test"], data_cfg.template,
                                  max_new_tokens=data_cfg.max_new_tokens, batch_size=data_cfg.eval_batch_size,
                                  device=runtime.device, autocast=runtime.autocast())

        before, before_answers = evaluate_test()
        if mmlu is not None:
            before["mmlu"] = mmlu.score(model, tokenizer, data_cfg.eval_batch_size, runtime.autocast())
        lora = lora_cfg.settings() if train_cfg.trainable == "lora" else None
        trains = set_trainable(model, train_cfg.trainable, lora)
        trainable_parameters, _ = count_parameters(model)
        if runtime.is_main:
            print(f"before training: exact match {before['exact_match']:.3f}, BLEU {before['bleu']:.2f}, "
                  f"ROUGE-L {before['rouge_l']:.3f}, response loss {before['response_loss']:.4f}")
            print(f"trains: {trains}; {describe_parameters(model)}")
        task = instruct_task(model, datasets, train_cfg, runtime, loaded.tokenizer_name)
        result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
        runtime.leave_process_group()  # the rest is rank 0's alone
        if not runtime.is_main or result.interrupted:  # an interrupted run has said how to resume
            return result.exit_code
        model = result.model  # the same model; under FSDP the whole of it, gathered from the shards
        final = best_weights(model, runtime.out_dir, runtime.device, lora_body=model if lora else None)
        save_checkpoint(final, model, tokenizer=loaded.tokenizer_name, step=result.steps, template=data_cfg.template)
        after, after_answers = evaluate_test()
        if mmlu is not None:
            after["mmlu"] = mmlu.score(model, tokenizer, data_cfg.eval_batch_size, runtime.autocast())
        run = {"model": loaded.description, "trainable": train_cfg.trainable, "trains": trains,
               "trainable_parameters": trainable_parameters, "template": data_cfg.template,
               "mask_prompt": data_cfg.mask_prompt, "steps": result.steps,
               "wall_seconds": round(time.perf_counter() - started, 1),
               "peak_memory_mib": round(peak_memory_mib(runtime.device)),
               **({"mmlu_subset": mmlu.description()} if mmlu is not None else {})}
        write_reports(runtime.out_dir, before, after, answer_rows(splits["test"], before_answers, after_answers), run)
        print(f"after training:  exact match {after['exact_match']:.3f} (before {before['exact_match']:.3f}), "
              f"BLEU {after['bleu']:.2f} (before {before['bleu']:.2f}), "
              f"ROUGE-L {after['rouge_l']:.3f} (before {before['rouge_l']:.3f}), "
              f"response loss {after['response_loss']:.4f} (before {before['response_loss']:.4f})")
        print("per task: " + ", ".join(f"{t} {before['per_task'].get(t, 0):.2f}->{v:.2f}"
                                       for t, v in after["per_task"].items()))
        if mmlu is not None:
            print(general_knowledge.summary_line(before["mmlu"], after["mmlu"]))
        print(f"wall time {run['wall_seconds']:.0f} s, peak memory {run['peak_memory_mib']:,} MiB; "
              f"report: {runtime.out_dir / 'report.md'}")
        return 0


if __name__ == "__main__":
    run_cli(main)
