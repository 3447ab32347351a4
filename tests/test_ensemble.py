"""Ensembles (gpt/ensemble.py, and --model given more than once to generate, evaluate and classify):
the mean of the members' probabilities, held to plain computations from each member's full logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from gpt.checkpoint import save_checkpoint
from gpt.classifier import GPTClassifier, classifier_info, classify_cli
from gpt.cli import evaluate_cli, generate_cli
from gpt.config import ModelConfig
from gpt.ensemble import Ensemble, check_shared_tokenizer, mixture_log_probs
from gpt.errors import UserError
from gpt.evaluate import text_metrics
from gpt.generate import generate, sample_next_token
from gpt.model import GPT
from gpt.tokenizer import byte_alphabet, get_tokenizer

TOKENIZER = get_tokenizer("gpt2")
N_VOCAB = TOKENIZER.n_vocab  # 50257
TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith hurried home. " * 2


def tiny_lm(seed: int, **overrides) -> GPT:
    config = ModelConfig(**{**dict(vocab_size=N_VOCAB, context_length=64, d_model=32, n_layer=1, n_head=2,
                                   tie_embeddings=False), **overrides})
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # sharper distributions than the init's: the members then disagree visibly
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def members() -> list[GPT]:
    """Two different models with the GPT-2 tokenizer: GPT-2 style, and Llama style with padding rows
    (50304 token rows) and a shorter context."""
    return [tiny_lm(0), tiny_lm(1, vocab_size=50304, context_length=48, pos_emb="rope", norm="rmsnorm",
                                mlp="swiglu", bias=False)]


@pytest.fixture(scope="module")
def checkpoints(members, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("members")
    paths = [folder / "a.pt", folder / "b.pt"]
    for path, model in zip(paths, members):
        save_checkpoint(path, model, tokenizer="gpt2", step=0)
    return paths


# ----------------------------------------------------------------------------
# The reference: each member's full logits, softmax over the tokenizer's tokens, mean, log
# ----------------------------------------------------------------------------


def reference_mixture_log_prob(models: list[GPT], context: list[int]) -> torch.Tensor:
    """log of the mean of the members' next-token probabilities after `context`, (N_VOCAB,), in float64."""
    with torch.no_grad():
        probabilities = [F.softmax(model(torch.tensor([context]))[0, -1, :N_VOCAB].double(), dim=-1)
                         for model in models]
    return torch.stack(probabilities).mean(dim=0).log()


def reference_losses(models: list[GPT], ids: list[int], window: int, stride: int) -> list[float]:
    """-log p(target) of the mixture for every target, each scored once by the first window that covers it."""
    losses, scored, start = {}, set(), 0
    while True:
        chunk = ids[start:start + window + 1]
        for offset in range(len(chunk) - 1):
            target_index = start + offset + 1
            if target_index not in scored:
                scored.add(target_index)
                log_p = reference_mixture_log_prob(models, chunk[:offset + 1])
                losses[target_index] = -float(log_p[chunk[offset + 1]])
        if start + window >= len(ids) - 1:
            break
        start += stride
    assert scored == set(range(1, len(ids)))
    return [losses[i] for i in sorted(losses)]


def reference_greedy(models: list[GPT], prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from the mixture, each step a full forward pass of every member (no cache)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(reference_mixture_log_prob(models, ids).argmax()))
    return ids[len(prompt):]


# ----------------------------------------------------------------------------
# The mixture
# ----------------------------------------------------------------------------


def test_mixture_log_probs_is_the_log_of_the_mean_probability():
    log_probs = torch.log_softmax(torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = log_probs.exp().mean(dim=0).log()
    assert torch.allclose(mixture_log_probs(log_probs), expected, atol=1e-6)
    assert not torch.allclose(mixture_log_probs(log_probs), torch.log_softmax(log_probs.mean(dim=0), dim=-1))
    certain = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]])  # each member sure of another token
    assert torch.allclose(mixture_log_probs(certain), torch.tensor([math.log(0.5)] * 2))


@pytest.mark.parametrize("window, stride", [(48, 24), (16, 5)])
def test_text_metrics_equal_the_mean_of_the_members_probabilities(members, window, stride):
    ensemble = Ensemble(members, ["a", "b"], TOKENIZER)
    assert ensemble.context_length == 48
    ids = TOKENIZER.encode(TEXT)
    metrics = ensemble.text_metrics(TEXT, window, stride, batch_size=3)
    losses = reference_losses(members, ids, window, stride)
    assert metrics["scored_tokens"] == len(ids) - 1 == len(losses)
    assert math.isclose(metrics["loss"], sum(losses) / len(losses), rel_tol=1e-5)
    scored_bytes = len(TOKENIZER.decode_bytes(ids[1:]))
    assert math.isclose(metrics["bits_per_byte"], sum(losses) / (math.log(2) * scored_bytes), rel_tol=1e-5)
    for member, figures in zip(members, metrics["members"]):  # each member alone, over the tokenizer's tokens
        alone = reference_losses([member], ids, window, stride)
        assert math.isclose(figures["loss"], sum(alone) / len(alone), rel_tol=1e-5)
    best_member = min(figures["loss"] for figures in metrics["members"])
    assert metrics["loss"] != pytest.approx(best_member, rel=1e-3)  # the members differ: the test can tell


def test_an_ensemble_of_one_model_twice_is_that_model(members):
    model = members[0]
    twice = Ensemble([model, model], ["a", "a"], TOKENIZER)
    alone = text_metrics(model, TOKENIZER, TEXT, 32, 16)  # the single-model path: the fused loss
    both = twice.text_metrics(TEXT, 32, 16)
    assert math.isclose(both["loss"], alone["loss"], rel_tol=1e-5)
    prompts = [TOKENIZER.encode("Hello there"), TOKENIZER.encode("The clocks were striking")]
    expected = generate(model, prompts, 10)
    assert twice.generate(prompts, 10) == expected


def test_greedy_generation_equals_a_plain_loop_without_cache(members):
    ensemble = Ensemble(members, ["a", "b"], TOKENIZER)
    prompts = [TOKENIZER.encode("It was a bright cold day"), TOKENIZER.encode("Winston")]  # left-padded in a batch
    outputs = ensemble.generate(prompts, 12)
    for prompt, output in zip(prompts, outputs):
        assert output[len(prompt):] == reference_greedy(members, prompt, 12)
    alone = [generate(member, prompts[:1], 12)[0] for member in members]
    assert outputs[0] not in alone  # the mixture decodes otherwise than either member: the test can tell


def test_sampling_draws_from_the_mean_distribution(members):
    """Temperature, top-k and top-p apply to the mixture: the ensemble's draws are the sampler's draws from
    the reference mixture, with the same random numbers."""
    ensemble = Ensemble(members, ["a", "b"], TOKENIZER)
    prompt = TOKENIZER.encode("Winston")
    settings = dict(temperature=0.8, top_k=50, top_p=0.9)
    draws = next(ensemble.stream_tokens([prompt] * 64, 1, **settings, generator=torch.Generator().manual_seed(0)))
    mixture = reference_mixture_log_prob(members, prompt).float().expand(64, -1)  # (64, N_VOCAB)
    expected = sample_next_token(mixture, **settings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, expected)
    assert len(set(draws.tolist())) > 1  # a spread-out distribution: the draws say something


# ----------------------------------------------------------------------------
# The verbs: generate and evaluate with --model repeated
# ----------------------------------------------------------------------------


def test_evaluate_text_of_an_ensemble_and_of_one_model(checkpoints, members, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert evaluate_cli(["--model", str(checkpoints[0]), "--text", str(text)]) == 0
    single = json.loads(capsys.readouterr().out)
    assert "members" not in single and single["window"] == 64  # one model: as before
    assert evaluate_cli(["--model", str(checkpoints[0]), "--model", str(checkpoints[1]), "--text", str(text),
                         "--window", "16", "--stride", "8"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert set(both) == set(single) | {"members"} and (both["window"], both["stride"]) == (16, 8)
    losses = reference_losses(members, TOKENIZER.encode(TEXT), 16, 8)
    assert abs(both["loss"] - sum(losses) / len(losses)) < 1e-4  # printed to 4 decimals
    assert [m["model"] for m in both["members"]] == [str(path) for path in checkpoints]
    assert set(both["members"][0]) == {"model", "loss", "perplexity", "bits_per_byte"}


def test_evaluate_prompts_and_generate_with_an_ensemble(checkpoints, members, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello there"}) + "\n" + json.dumps({"prompt": "Winston"}) + "\n")
    out = tmp_path / "responses.jsonl"
    sources = ["--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1])]
    assert evaluate_cli([*sources, "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6"]) == 0
    for record, prompt in zip(map(json.loads, out.read_text().splitlines()), ["Hello there", "Winston"]):
        expected = reference_greedy(members, TOKENIZER.encode(prompt), 6)
        assert record["response"] == TOKENIZER.decode([t for t in expected if t != TOKENIZER.eot_id])
    capsys.readouterr()
    assert generate_cli([*sources, "--prompt", "Winston", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    expected = reference_greedy(members, TOKENIZER.encode("Winston"), 8)
    assert capsys.readouterr().out.rstrip("\n") == "Winston" + TOKENIZER.decode(expected)


def byte_level_gguf(path: Path) -> Path:
    """A GGUF file holding only a tokenizer: the 256 bytes, three merges and <|endoftext|>."""
    import gguf

    tokens = [*byte_alphabet(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == "<|endoftext|>" else 1 for token in tokens])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_eos_token_id(len(tokens) - 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_members_must_share_a_tokenizer(checkpoints, tmp_path):
    first, copy = byte_level_gguf(tmp_path / "first.gguf"), byte_level_gguf(tmp_path / "copy.gguf")
    check_shared_tokenizer(["x", "y"], [get_tokenizer(str(first)), get_tokenizer(str(copy))])  # two files, one vocabulary
    other = tmp_path / "other.pt"
    save_checkpoint(other, tiny_lm(2, vocab_size=260), tokenizer=str(first))
    for verb, extra in ((evaluate_cli, ["--text", str(first)]), (generate_cli, [])):
        with pytest.raises(UserError, match=r"an ensemble needs one tokenizer: .*a\.pt uses gpt2 \(50,257 tokens\) "
                                            r"but .*other\.pt uses first\.gguf \(260 tokens\)"):
            verb(["--model", str(checkpoints[0]), "--model", str(other), *extra])


def test_evaluate_task_refuses_an_ensemble_before_loading(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate_cli(["--model", str(checkpoints[0]), "--model", str(tmp_path / "missing.pt"), "--task", "mc",
                      "--data", str(checkpoints[0])])
    assert stopped.value.code == 2 and "not supported there yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# classify with the checkpoint repeated
# ----------------------------------------------------------------------------

LABELS = ["ham", "spam"]
TEXTS = ["WIN a FREE prize now", "see you at lunch", "urgent: claim your cash", "sorry, running late",
         "txt STOP to end", "love you mum", "call now for the award", "ok, home later", "Free entry to win",
         "lunch tomorrow?", "you have won 1000 pounds", "meeting moved to 3pm"]
TRUE = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]


def tiny_classifier(seed: int, labels: list[str] = LABELS) -> GPTClassifier:
    config = ModelConfig(vocab_size=N_VOCAB, context_length=32, d_model=32, n_layer=1, n_head=2)
    torch.manual_seed(seed)
    model = GPTClassifier(GPT(config), len(labels), max_length=32).eval()
    with torch.no_grad():  # a bold random head: confident, varied predictions
        model.head.weight.normal_(0.0, 3.0)
    return model


def save_classifier(path: Path, model: GPTClassifier, labels: list[str] = LABELS) -> Path:
    save_checkpoint(path, model, tokenizer="gpt2", step=0,
                    classifier=classifier_info(labels, "last", 32, TOKENIZER.padding_id, threshold=0.4))
    return path


def own_probabilities(model: GPTClassifier, texts: list[str]) -> np.ndarray:
    """Each text alone through the model: softmax of its class logits, (N, C)."""
    with torch.no_grad():
        rows = [model(torch.tensor([TOKENIZER.encode(text)]), torch.tensor([len(TOKENIZER.encode(text))]))
                .softmax(dim=-1)[0] for text in texts]
    return torch.stack(rows).numpy()


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> tuple[list[GPTClassifier], list[Path]]:
    folder = tmp_path_factory.mktemp("classifiers")
    models = [tiny_classifier(seed) for seed in range(3)]
    return models, [save_classifier(folder / f"c{seed}.pt", model) for seed, model in enumerate(models)]


def test_classify_averages_the_members_probabilities(classifiers, capsys):
    models, paths = classifiers
    expected = np.mean([own_probabilities(model, TEXTS) for model in models], axis=0)
    args = [word for path in paths for word in ("--checkpoint", str(path))]
    assert classify_cli([*args, "--json", *TEXTS]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    for row, probabilities in zip(rows, expected):
        assert [row["probabilities"][label] for label in LABELS] == pytest.approx(probabilities, abs=1e-5)
        assert row["label"] == LABELS[int(probabilities.argmax())]
    assert classify_cli(["--model", str(paths[0]), "--model", str(paths[1]), "--threshold", "0.5", TEXTS[0]]) == 0


def test_classify_eval_scores_equal_scikit_learn(classifiers, tmp_path, capsys):
    models, paths = classifiers
    data = tmp_path / "test.tsv"
    data.write_text("".join(f"{LABELS[label]}\t{text}\n" for label, text in zip(TRUE, TEXTS)), encoding="utf-8")
    own = [own_probabilities(model, TEXTS) for model in models]
    mean = np.mean(own, axis=0)
    capsys.readouterr()
    assert classify_cli([word for path in paths for word in ("--checkpoint", str(path))] + ["--eval", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == len(TEXTS) and report["models"] == [str(path) for path in paths]
    for scores, probabilities in [(report, mean), *zip(report["members"], own)]:
        predicted = probabilities.argmax(axis=1)
        assert scores["accuracy"] == pytest.approx(accuracy_score(TRUE, predicted))
        assert scores["macro_f1"] == pytest.approx(f1_score(TRUE, predicted, average="macro", zero_division=0))
        per_class = f1_score(TRUE, predicted, average=None, labels=[0, 1], zero_division=0)
        assert [scores["per_class"][label]["f1"] for label in LABELS] == pytest.approx(per_class)
        assert scores["roc_auc"] == pytest.approx(roc_auc_score(TRUE, probabilities[:, 1]))
    assert len(set(mean.argmax(axis=1))) == 2  # both classes predicted: the F1 figures are not trivial

    assert classify_cli(["--checkpoint", str(paths[0]), "--eval", str(data), "--threshold", "tuned"]) == 0
    single = json.loads(capsys.readouterr().out)  # one model: its tuned threshold, no members
    assert single["threshold"] == 0.4 and "members" not in single
    predicted = (own[0][:, 1] >= 0.4).astype(int)
    assert single["macro_f1"] == pytest.approx(f1_score(TRUE, predicted, average="macro", zero_division=0))


def test_classify_one_model_prints_as_before(classifiers, capsys):
    models, paths = classifiers
    assert classify_cli(["--checkpoint", str(paths[0]), TEXTS[0], TEXTS[1]]) == 0
    captured = capsys.readouterr()
    probabilities = own_probabilities(models[0], TEXTS[:2])
    for line, text, row in zip(captured.out.splitlines(), TEXTS, probabilities):
        label = LABELS[int(row.argmax())]
        assert line == f"{label:<4}  ham {row[0]:.4f}  spam {row[1]:.4f}  {text}"
    assert "ensemble" not in captured.err


def test_classify_ensemble_errors(classifiers, tmp_path):
    _, paths = classifiers
    other = save_classifier(tmp_path / "other.pt", tiny_classifier(5, ["spam", "ham"]), ["spam", "ham"])
    with pytest.raises(UserError, match=r"same labels in the same order: .*c0\.pt has \['ham', 'spam'\] "
                                        r"but .*other\.pt has \['spam', 'ham'\]"):
        classify_cli(["--checkpoint", str(paths[0]), "--checkpoint", str(other), "hello"])
    with pytest.raises(UserError, match="--threshold tuned: .*does not carry over to the ensemble"):
        classify_cli(["--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]), "--threshold", "tuned", "hi"])
    data = tmp_path / "bad.tsv"
    data.write_text("ham\thello\nspma\tWIN now\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.tsv, line 2: label 'spma' is not one of the model's labels"):
        classify_cli(["--checkpoint", str(paths[0]), "--eval", str(data)])
    for argv in (["hello"], ["--checkpoint", str(paths[0]), "--eval", str(data), "hello"]):
        with pytest.raises(SystemExit):
            classify_cli(argv)
