"""`--model gpt` in lm-evaluation-harness against the harness' own `hf` backend on the same weights.

A tiny random GPT-2-vocabulary model is saved as one of our checkpoints and exported with
`python -m gpt convert`; the harness runs local tasks (JSON data files written here) of every
request type through both backends: multiple choice (loglikelihood), perplexity
(loglikelihood_rolling, texts longer than the 64-token context) and generation (generate_until,
two sets of stop strings). The `hf` backend runs unbatched as the reference; ours runs batched.
The slow test does the same with SmolLM2-135M-Instruct, whose beginning-of-text token is not its
end-of-text token. Everything is offline: the data files are local, the datasets cache is in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402  (the test extra installs it; a missing one should fail, not skip)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gpt.checkpoint import save_checkpoint  # noqa: E402
from gpt.config import ModelConfig  # noqa: E402
from gpt.errors import UserError  # noqa: E402
from gpt.evaluate.harness import HarnessModel  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.tokenizer import get_tokenizer  # noqa: E402
from gpt.weights import convert_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = get_tokenizer("gpt2")
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen", "tiny_gen_long"]

MULTIPLE_CHOICE = [
    {"question": "Question: What is 2 + 2?\nAnswer:", "choices": [" 3", " 4", " five", " 22"], "answer": 1},
    {"question": "The cat sat on the ", "choices": ["mat", "moon and the stars", "dog"], "answer": 0},
    {"question": "", "choices": ["Hello world", "Goodbye"], "answer": 1},  # scored after the prefix token
    {"question": "A long context " * 30, "choices": [" ends here", " ends there, far away"], "answer": 0},
    {"question": "Paris is the capital of", "choices": [" France", " Spain", " Italy"], "answer": 0},
    {"question": "Q: Pick a letter.\nA:", "choices": [" A", " B", " C", " D"], "answer": 2},
]
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.",
         "It was the best of times, it was the worst of times. " * 8,  # several 64-token windows
         "Numbers 12345 and café ünïcödé 🙂, tabs\tand  spaces."]
PROMPTS = ["Once upon a time", "The answer is", "Q: What is the capital of France?\nA:", "A long prompt " * 30,
           "1, 2, 3,", "Hello"]
STOPS = ["s", "e"]  # common letters: most generations stop early, some inside a token


def write_tasks(folder: Path, extra_items: Sequence[dict] = ()) -> None:
    """The four task YAMLs and their JSONL data in `folder`, the datasets cache beside them."""
    folder.mkdir()
    for name, records in (("mc", [*MULTIPLE_CHOICE, *extra_items]), ("ppl", [{"text": t} for t in TEXTS]),
                          ("gen", [{"prompt": p, "target": "Paris"} for p in PROMPTS])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    generation = 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n' \
                 "generation_kwargs:\n  until: %s\n  max_gen_toks: 12\n  do_sample: false\n" \
                 "metric_list:\n  - metric: exact_match\n"
    bodies = {
        "tiny_mc": ("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                          'doc_to_target: answer\ntarget_delimiter: ""\n'
                          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "tiny_ppl": ("ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                            "  - metric: bits_per_byte\n"),
        "tiny_gen": ("gen", generation % json.dumps(STOPS)),
        "tiny_gen_long": ("gen", generation % json.dumps(["never appears"])),
    }
    for name, (data, body) in bodies.items():
        source = f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / f'{data}.jsonl'))}\n" \
                 f"  cache_dir: {json.dumps(str(folder.parent / 'datasets-cache'))}\n"
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\n{source}test_split: test\n{body}",
                                             encoding="utf-8")


def evaluate(tasks: Path, model: str, model_args: dict, batch_size: int) -> dict:
    """The harness' results (samples included) of TASKS in `tasks` with one backend, on the CPU."""
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
                                   batch_size=batch_size, device="cpu", log_samples=True, bootstrap_iters=0)


def samples(results: dict, task: str) -> list:
    """The backend's filtered responses of each document of `task`, in document order."""
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def assert_backends_agree(ours: dict, theirs: dict) -> None:
    """Per item: log-likelihoods within 1e-3 and the same greedy flags (multiple choice), rolling
    log-likelihoods within 1e-3, the same generations; the same accuracies."""
    for our_doc, their_doc in zip(samples(ours, "tiny_mc"), samples(theirs, "tiny_mc"), strict=True):
        assert [ll for ll, _ in our_doc] == pytest.approx([ll for ll, _ in their_doc], abs=1e-3)
        assert [greedy for _, greedy in our_doc] == [greedy for _, greedy in their_doc]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]
    assert [doc[0] for doc in samples(ours, "tiny_ppl")] == pytest.approx(
        [doc[0] for doc in samples(theirs, "tiny_ppl")], abs=1e-3)
    for task in ("tiny_gen", "tiny_gen_long"):
        assert samples(ours, task) == samples(theirs, task)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Noise in every weight, norm gains around 1: varied predictions, unlike the near-uniform init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A folder with run/ (our checkpoint), hf/ (its export) and tasks/."""
    root = tmp_path_factory.mktemp("harness")
    model = GPT(ModelConfig(vocab_size=50257, context_length=64, d_model=32, n_layer=2, n_head=2)).eval()
    randomize_(model)
    save_checkpoint(root / "run" / "checkpoints" / "latest.pt", model, tokenizer="gpt2")
    assert convert_cli([str(root / "run"), "--out", str(root / "hf")]) == 0
    context = "Paris is the capital of"
    with torch.no_grad():
        best = int(model(torch.tensor([TOKENIZER.encode(context)]))[0, -1].argmax())
    greedy_item = {"question": context, "choices": [" France", TOKENIZER.decode([best])], "answer": 0}
    write_tasks(root / "tasks", [greedy_item])  # one choice is the model's greedy next token
    return root


@pytest.fixture(scope="module")
def runs(exported) -> dict[str, dict]:
    """Both backends on all tasks: `hf` unbatched (the reference) and ours in batches of 3."""
    return {"hf": evaluate(exported / "tasks", "hf", {"pretrained": str(exported / "hf")}, batch_size=1),
            "gpt": evaluate(exported / "tasks", "gpt", {"model": str(exported / "hf")}, batch_size=3)}


def test_every_request_type_matches_the_hf_backend(runs):
    assert_backends_agree(runs["gpt"], runs["hf"])
    assert any(greedy for doc in samples(runs["hf"], "tiny_mc") for _, greedy in doc)
    assert runs["gpt"]["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        runs["hf"]["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-4)


def test_generations_stop_at_the_stop_strings(runs):
    stopped, full = ([doc[0] for doc in samples(runs["gpt"], task)] for task in ("tiny_gen", "tiny_gen_long"))
    assert all(f.startswith(s) and not any(stop in s for stop in STOPS) for s, f in zip(stopped, full))
    assert any(len(s) < len(f) for s, f in zip(stopped, full))


@pytest.mark.slow  # a whole lm-eval process (about 40 s): the default suite keeps to its time
def test_command_line_runs_our_checkpoint(exported, runs, tmp_path):
    """`python -m gpt lm-eval` as a user types it, on the run folder (not the export): the same scores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "gpt", "lm-eval", "--model", "gpt", "--model_args", f"model={exported / 'run'}",
         "--tasks", "tiny_mc,tiny_ppl", "--include_path", str(exported / "tasks"), "--device", "cpu",
         "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tiny_mc" in completed.stdout and "acc" in completed.stdout  # the harness' results table
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))["results"]
    assert results["tiny_mc"]["acc,none"] == runs["hf"]["results"]["tiny_mc"]["acc,none"]
    [samples_file] = (tmp_path / "out").rglob("samples_tiny_ppl_*.jsonl")
    rolling = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
    ours = [float(s["filtered_resps"][0]) for s in sorted(rolling, key=lambda s: s["doc_id"])]
    assert ours == pytest.approx([doc[0] for doc in samples(runs["hf"], "tiny_ppl")], abs=1e-3)


@pytest.mark.parametrize("changes, message", [
    ({"model": None}, "needs --model_args model=M"),
    ({"pretrained": "x"}, "unknown model_args pretrained"),
    ({"batch_size": "auto"}, "no automatic batch size"),
    ({"max_length": 65}, r"max_length=65 exceeds the model's context length \(64\)"),
])
def test_bad_model_args_name_the_argument(exported, changes, message):
    with pytest.raises(UserError, match=message):
        HarnessModel(**{"model": str(exported / "hf"), "device": "cpu", **changes})


def test_sampling_and_oversized_generations_are_refused(exported):
    model = HarnessModel(model=str(exported / "hf"), device="cpu")
    for gen_kwargs, message in (({"do_sample": True, "temperature": 0.7}, "decodes greedily"),
                                ({"max_gen_toks": 64}, "leaves no room for a prompt in max_length=64")):
        with pytest.raises(UserError, match=message):
            model.generate_until([Instance("generate_until", {}, ("Hello", {"until": ["\n"], **gen_kwargs}), 0)])


@pytest.mark.slow
def test_smollm2_matches_the_hf_backend(smollm2_gguf, tmp_path):
    """A real model whose beginning-of-text token (the prefix of empty contexts and rolling texts) is not
    its end-of-text token, against the hf backend on its export."""
    assert convert_cli([str(smollm2_gguf), "--out", str(tmp_path / "hf")]) == 0
    write_tasks(tmp_path / "tasks")
    assert_backends_agree(evaluate(tmp_path / "tasks", "gpt", {"model": str(smollm2_gguf)}, batch_size=4),
                          evaluate(tmp_path / "tasks", "hf", {"pretrained": str(tmp_path / "hf")}, batch_size=1))
