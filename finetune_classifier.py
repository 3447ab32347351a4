"""Fine-tune a GPT as a text classifier: swap the LM head for a class head, train, report.

    python finetune_classifier.py                        # from scratch on the bundled SMS data, a few CPU minutes
    python finetune_classifier.py --model smollm2-135m-instruct --train.trainable last:2
    python finetune_classifier.py --model smollm2-135m-instruct --train.trainable lora --lora.rank 8
    python finetune_classifier.py --model runs/pretrain-.../ --data.path reviews.jsonl
    python finetune_classifier.py --model smollm2-135m-instruct --eval.mmlu 200   # + MMLU before and after
    python -m gpt classify --checkpoint runs/classifier-... "Claim your free prize now!"

`--model` takes our own pretraining checkpoint or run folder, a Hugging Face folder, a GGUF
file, a known name such as smollm2-135m-instruct (fetched on first use), or a preset
name (tiny, gpt2-124m, ...) for a model from scratch; without it, the [model] section
of the config describes a model from scratch. `--train.trainable` picks what trains:
head, last:N (the last N blocks, the final norm and the head), all, or lora ([lora]
section: rank, alpha, dropout, targets).

The data (TSV, CSV or JSONL; see `gpt.data.read_labeled_texts`) is deduplicated, then
split by class into train/val/test with `--data.seed` (or val/test come from their own
files). The test split is classified before and after training; the run folder gets
report.json (`before` and `after`: accuracy, macro F1, per-class precision/recall/F1,
confusion matrix, ROC AUC and the threshold tuned on validation for two classes),
report.md (the two side by side), and checkpoints/final.pt: the best checkpoint's
weights with any LoRA adapters merged in, which `python -m gpt classify` loads.
With `--eval.mmlu N`, N fixed MMLU questions are scored too, before and after: the
body read through the LM head it had before fine-tuning (gpt.evaluate.general_knowledge).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from gpt.checkpoint import save_checkpoint
from gpt.classifier import ClassifierConfig, GPTClassifier, classifier_info
from gpt.config import LoRAConfig, ModelConfig, Section, save_config_json
from gpt.data import ClassificationDataConfig, Splits, class_weights, describe_splits, read_splits, tokenize_splits
from gpt.errors import run_cli
from gpt.evaluate import general_knowledge
from gpt.evaluate.classifier_report import evaluate_classifier, summary_line, write_reports
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
from gpt.runtime import peak_memory_mib, setup_runtime
from gpt.tasks import classifier_task
from gpt.train import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "classifier.toml"
SECTIONS: dict[str, type[Section]] = {"model": ModelConfig, "train": FinetuneTrainConfig,
                                      "data": ClassificationDataConfig, "classifier": ClassifierConfig,
                                      "lora": LoRAConfig, "eval": general_knowledge.EvalConfig}
MODEL_HELP = ("checkpoint or run folder, Hugging Face folder, .gguf file, known name (smollm2-135m-instruct) "
              "or preset (tiny); default: the [model] section")


def describe_labels(splits: Splits, weights: Any) -> str:
    """"labels: ham (0), spam (1)", with the class weights when the loss uses them."""
    shown = ", ".join(f"{label} ({i})" for i, label in enumerate(splits.labels[:20]))
    more = f", ... ({len(splits.labels):,} in all)" if len(splits.labels) > 20 else ""
    weighted = f"; class weights {[round(w, 3) for w in weights.tolist()]}" if weights is not None else ""
    return f"labels: {shown}{more}{weighted}"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    source, config = parse_script_args(sys.argv[1:] if argv is None else argv, description=__doc__,
                                       sections=SECTIONS, default_config=DEFAULT_CONFIG, model_help=MODEL_HELP)
    model_cfg, train_cfg, data_cfg, classifier_cfg, lora_cfg = (
        config[k] for k in ("model", "train", "data", "classifier", "lora"))
    splits = read_splits(data_cfg)  # bad data stops here, before a run folder or a model exists
    mmlu = general_knowledge.load_subset(config["eval"])  # and so does a missing MMLU file
    with setup_runtime(train_cfg, "classifier") as runtime:
        loaded = load_model(source, model_cfg)
        max_length = classifier_cfg.length_for(loaded.model.config.context_length)
        # The LM head, kept for the MMLU scores: the class head replaces it.
        lm_head = general_knowledge.original_head(loaded.model) if mmlu is not None else None
        model = GPTClassifier(loaded.model, len(splits.labels), classifier_cfg.pooling, max_length)
        quantized = quantize_base(model.gpt, train_cfg.quantize)
        lora = lora_cfg.settings() if train_cfg.trainable == "lora" else None
        trains = set_trainable(model.gpt, train_cfg.trainable, lora, head=model.head)
        trainable_parameters, total_parameters = count_parameters(model)
        model.to(runtime.device)
        pad_id = loaded.tokenizer.padding_id
        datasets = tokenize_splits(splits, loaded.tokenizer, max_length, pad_id)
        weights = class_weights(splits.ids(splits.train), len(splits.labels)) if data_cfg.balance == "weight" else None
        config["model"] = loaded.model.config
        eval_batch_size = 2 * train_cfg.batch_size
        report: dict[str, Any] = {"labels": splits.labels}
        if runtime.is_main:
            save_config_json(config, runtime.out_dir / "config.json")
            print(f"model: {loaded.description}; {model.config.n_layer} blocks, d_model {model.config.d_model}; "
                  f"tokenizer {loaded.tokenizer_name}")
            print(f"trains: {trains}; {describe_parameters(model)}")
            if quantized:
                print(quantized)
            print("\n".join([*splits.notes, describe_labels(splits, weights), describe_splits(splits, datasets)]))
            print(f"device {runtime.device}, precision {runtime.autocast_dtype}; run folder {runtime.out_dir}")
            report["before"] = evaluate_classifier(model, datasets, splits.labels, eval_batch_size, runtime.device,
                                                   runtime.autocast())
            print(summary_line("before training (test split)", report["before"], splits.labels))
            if mmlu is not None:
                with general_knowledge.with_lm_head(model.gpt, lm_head) as language_model:
                    report["before"]["mmlu"] = mmlu.score(language_model, loaded.tokenizer, eval_batch_size,
                                                          runtime.autocast())
            write_reports(runtime.out_dir, report, splits.labels)
        info = classifier_info(splits.labels, classifier_cfg.pooling, max_length, pad_id, lora)
        task = classifier_task(model, datasets, splits.labels, train_cfg, runtime, class_weight=weights,
                               group_by_length=data_cfg.group_by_length, info=info, tokenizer=loaded.tokenizer_name)
        result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
        runtime.leave_process_group()  # the rest is rank 0's alone
        if not runtime.is_main or result.interrupted:  # an interrupted run has said how to resume
            return result.exit_code

        final = best_weights(model, runtime.out_dir, runtime.device, lora_body=model.gpt if lora else None)
        after = report["after"] = evaluate_classifier(model, datasets, splits.labels, eval_batch_size, runtime.device,
                                                      runtime.autocast())
        if mmlu is not None:
            with general_knowledge.with_lm_head(model.gpt, lm_head) as language_model:
                after["mmlu"] = mmlu.score(language_model, loaded.tokenizer, eval_batch_size, runtime.autocast())
        threshold = after["tuned_threshold"]["threshold"] if "tuned_threshold" in after else None
        save_checkpoint(final, model, tokenizer=loaded.tokenizer_name, step=result.steps, train_config=train_cfg.to_dict(),
                        classifier=classifier_info(splits.labels, classifier_cfg.pooling, max_length, pad_id,
                                                   threshold=threshold))
        report["run"] = {
            "model": loaded.description, "trains": trains, "trainable": train_cfg.trainable,
            "trainable_parameters": trainable_parameters, "total_parameters": total_parameters,
            "split_sizes": {name: len(d) for name, d in datasets.items()}, "max_length": max_length,
            "steps": result.steps, "stopped_early": result.stopped_early, "train_seconds": result.train_seconds,
            "wall_seconds": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib(runtime.device),
            **({"mmlu_subset": mmlu.description()} if mmlu is not None else {}),
        }
        write_reports(runtime.out_dir, report, splits.labels)
        print(summary_line("after training (test split)", after, splits.labels))
        if mmlu is not None:
            print(general_knowledge.summary_line(report["before"]["mmlu"], after["mmlu"]))
        print(f"{result.steps} steps, {result.train_seconds:.0f} s of training, {report['run']['wall_seconds']:.0f} s "
              f"in all; peak memory {report['run']['peak_memory_mib']:,.0f} MiB; wrote {runtime.out_dir / 'report.md'} "
              f"and {final}")
        return 0


if __name__ == "__main__":
    run_cli(main)
