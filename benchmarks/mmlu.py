"""MMLU scored by us and by lm-evaluation-harness' `hf` backend on the same items: agreement and items/s.

    python -m benchmarks.mmlu [--model smollm2-135m-instruct] [--per-subject 10] [--shots 0]
                              [--format mcf|cloze] [--subjects A,B] [--batch-size 8] [--harness-batch-size 8] [--out FILE.json]

Both sides score the same prompts: this script builds them with gpt.evaluate.mmlu (the first
`--per-subject` questions of every subject, `--shots` seeded same-subject examples) and hands
them to the harness as a local task (`dataset_path: json`), context and choices verbatim. The
harness runs transformers on our Hugging Face export of the same weights (`python -m gpt convert`,
tokenizer files included), in float32 on the CPU, as ours does.

Reported: each side's items/s over the scoring alone (models loaded beforehand; the harness' time
includes building its requests from the task, which is part of its cost), accuracy (acc and
acc_norm) for each, how many items pick differently, and the largest per-choice log-likelihood
difference. Needs the `eval` extra (lm-eval) and `python -m gpt fetch mmlu`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt.evaluate import mmlu
from gpt.evaluate.multiple_choice import multiple_choice_metrics, score_items
from gpt.fetch import cached_path
from gpt.weights import load_model_and_tokenizer

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def harness_scores(folder: Path, items: list, batch_size: int, work: Path) -> tuple[list[list[float]], float]:
    """The harness' per-choice log-likelihoods of `items` (hf backend on `folder`) and its scoring seconds."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = work / "items.jsonl"
    data.write_text("".join(json.dumps({"context": item.context, "choices": item.choices, "answer": item.answer})
                            + "\n" for item in items))
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / "mmlu_same_items.yaml").write_text(TASK_YAML.format(name="mmlu_same_items", data=data))
    lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch_size)
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=["mmlu_same_items"], task_manager=TaskManager(include_path=str(work / "tasks")),
                              log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - start
    samples = sorted(results["samples"]["mmlu_same_items"], key=lambda sample: sample["doc_id"])
    return [[float(ll) for ll, _ in sample["filtered_resps"]] for sample in samples], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--per-subject", type=int, default=10, help="the first N questions of every subject")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects (default: all 57)")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--format", choices=mmlu.FORMATS, default="mcf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="ours: contexts per forward pass")
    parser.add_argument("--harness-batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    pool = mmlu.read_mmlu(cached_path("mmlu"))
    subjects = [subject.strip() for subject in args.subjects.split(",")] if args.subjects else None
    questions = mmlu.select(pool, subjects, args.per_subject)
    items, _ = mmlu.build_items(questions, pool, args.shots, args.seed, args.format)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "hf"
        subprocess.run([sys.executable, "-m", "gpt", "convert", args.model, "--out", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
        theirs, their_seconds = harness_scores(folder, items, args.harness_batch_size, work)

    loaded = load_model_and_tokenizer(args.model)
    model = loaded.model.eval()
    start = time.perf_counter()
    ours = score_items(model, loaded.tokenizer, items, args.batch_size)
    our_seconds = time.perf_counter() - start

    theirs_scored = [{"answer": item.answer, "pred": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                      "pred_norm": max(range(len(lls)), key=lambda i: (lls[i] / max(len(item.choices[i]), 1), -i)),
                      "pred_per_token": 0}
                     for item, lls in zip(items, theirs)]
    our_metrics, their_metrics = multiple_choice_metrics(ours), multiple_choice_metrics(theirs_scored)
    differences = [abs(a - b) for entry, lls in zip(ours, theirs) for a, b in zip(entry["loglikelihoods"], lls)]
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": args.model, "items": len(items), "shots": args.shots, "format": args.format, "seed": args.seed,
        "ours": {"seconds": round(our_seconds, 1), "items_per_s": round(len(items) / our_seconds, 3),
                 "batch_size": args.batch_size, "acc": our_metrics["acc"], "acc_norm": our_metrics["acc_norm"],
                 **mmlu.accuracy_report(questions, ours)["overall"]},
        "harness_hf": {"seconds": round(their_seconds, 1), "items_per_s": round(len(items) / their_seconds, 3),
                       "batch_size": args.harness_batch_size, "acc": their_metrics["acc"],
                       "acc_norm": their_metrics["acc_norm"]},
        "speedup": round(their_seconds / our_seconds, 2),
        "items_picked_differently": sum(a["pred"] != b["pred"] for a, b in zip(ours, theirs_scored)),
        "max_loglikelihood_difference": max(differences),
        "command": "python -m benchmarks.mmlu " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
