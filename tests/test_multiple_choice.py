"""Multiple-choice scoring against transformers on the same weights, and the harness' token split."""

import numpy as np
import pytest
import torch

from gpt.config import ModelConfig
from gpt.evaluate.multiple_choice import (
    MultipleChoiceItem,
    _batches,
    _shared_start_groups,
    continuation_loglikelihoods,
    continuation_loglikelihoods_reference,
    encode_pair,
    multiple_choice_metrics,
    score_items,
)
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer
from gpt.weights import save_pretrained

transformers = pytest.importorskip("transformers")
TOKENIZER = get_tokenizer("gpt2")
ITEMS = [
    MultipleChoiceItem("Question: What is 2 + 2?\nAnswer:", [" 3", " 4", " five", " 22"], 1),
    MultipleChoiceItem("The cat sat on the ", ["mat", "moon and the stars", "dog"], 0),
    MultipleChoiceItem("", ["Hello world", "Goodbye"], 1),
    MultipleChoiceItem("A long context " * 30, [" ends here", " ends there, far away"], 0),
]


ARCHITECTURES = {
    "gpt2": {},
    "llama": {"norm": "rmsnorm", "pos_emb": "rope", "mlp": "swiglu", "n_kv_head": 1, "bias": False},
}


def build_models(folder, **architecture):
    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=50257, context_length=64, d_model=32, n_layer=2, n_head=2, **architecture))
    save_pretrained(ours.eval(), folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def both_families(request, tmp_path_factory):
    return build_models(tmp_path_factory.mktemp(request.param), **ARCHITECTURES[request.param])


def test_the_token_split_follows_the_harness():
    context = "Question: What is 2 + 2?\nAnswer:"
    assert encode_pair(TOKENIZER, context, " 4") == (TOKENIZER.encode(context), TOKENIZER.encode(" 4"))
    # Whitespace at the end of the context belongs to the continuation.
    assert encode_pair(TOKENIZER, context + " ", "4") == encode_pair(TOKENIZER, context, " 4")
    assert encode_pair(TOKENIZER, "", "Hello") == ([TOKENIZER.eot_id], TOKENIZER.encode("Hello"))
    # A continuation merged into the context's last token by BPE: the split is on the whole's tokens.
    context_ids, continuation_ids = encode_pair(TOKENIZER, "The cat sat on the ", "mat")
    assert context_ids + continuation_ids == TOKENIZER.encode("The cat sat on the mat")


def reference_loglikelihood(theirs, context: list[int], continuation: list[int]) -> float:
    """transformers' model on the whole sequence, unbatched, left-cut to its context length."""
    ids = (context + continuation)[-65:]
    with torch.no_grad():
        logprobs = torch.log_softmax(theirs(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
    n = len(continuation)
    return float(logprobs[-n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum())


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("scorer", [continuation_loglikelihoods, continuation_loglikelihoods_reference])
def test_loglikelihoods_equal_transformers_on_the_same_weights(both_families, scorer, batch_size):
    ours, theirs = both_families
    requests = [encode_pair(TOKENIZER, item.context, choice) for item in ITEMS for choice in item.choices]
    # Shared contexts whose continuations differ in length, a context cut from the left by a long
    # continuation beside a short one, and a one-token continuation of a full window.
    long_context = TOKENIZER.encode("word " * 80)
    requests += [(long_context[:40], TOKENIZER.encode(" one two three four five six seven eight nine ten")),
                 (long_context[:40], TOKENIZER.encode(" one")), (long_context, [11]),
                 (long_context[:62], TOKENIZER.encode(" and so on"))]
    # Contexts that begin alike (few-shot examples before different questions), one of them the start itself,
    # and one whose remainder and continuation no longer fit beside the start in one batch.
    start = TOKENIZER.encode("Examples: " + "one two three " * 8)
    requests += [(start + TOKENIZER.encode(f" question {n}?" * n), TOKENIZER.encode(" yes" if n % 2 else " no, not"))
                 for n in range(1, 5)]
    requests += [(start, TOKENIZER.encode(" maybe")), (start + TOKENIZER.encode(" the end" * 15), [11, 12]),
                 (start + [13, 14], TOKENIZER.encode(" and then" * 10))]
    scores = scorer(ours, requests, batch_size)
    assert len(scores) == len(requests)
    for (context, continuation), (loglikelihood, tokens, _) in zip(requests, scores):
        assert tokens == len(continuation)
        assert loglikelihood == pytest.approx(reference_loglikelihood(theirs, context, continuation), abs=1e-4)


def test_contexts_that_begin_alike_run_their_start_once():
    start = tuple(range(100, 130))
    # One context shows less of the shared start (a question drawn as an example, shown another in its
    # place); sorted next to the group, it stays apart rather than cutting the group's start short.
    edge = start[:20] + (0,) * 12
    contexts = [start + (1, 2, 3), (7,) * 40, start + (4,), start, edge, (7,) * 10 + (8,) * 30, (9, 9)]
    groups = [(shared, sorted(members)) for shared, members in _shared_start_groups(contexts)]
    assert groups == [(29, [start, start + (1, 2, 3), start + (4,)]),
                      (0, sorted([edge, (7,) * 10 + (8,) * 30, (7,) * 40, (9, 9)]))]  # the rest, batched together
    # A start shared by many, but short beside what they hold (a header before long questions): no group.
    header = tuple(range(200, 220))
    questions = [header + (n,) * 30 + (1,) for n in range(5)]
    assert _shared_start_groups(questions) == [(0, questions)]
    # A batch holds the shared start, its widest remainder and its longest continuation within the context.
    extra = {start + (1, 2, 3): 0, start + (4,): 31, start: 0}
    assert _batches([start, start + (1, 2, 3), start + (4,)], 29, extra, 8, 62) == [[start + (1, 2, 3)],
                                                                                   [start + (4,), start]]
    assert _batches([start, start + (1, 2, 3), start + (4,)], 29, extra, 8, 64) == [[start + (1, 2, 3), start + (4,),
                                                                                    start]]


def test_each_request_reported_once_as_scored(models):
    ours, _ = models
    requests = [encode_pair(TOKENIZER, item.context, choice) for item in ITEMS for choice in item.choices]
    heard = []
    continuation_loglikelihoods(ours, requests, 2, heard.append)
    assert sorted(index for batch in heard for index in batch) == list(range(len(requests)))
    done = []
    score_items(ours, TOKENIZER, ITEMS, 2, done.append)
    assert sum(done) == len(ITEMS)


def test_metrics_pick_as_the_harness_does(models):
    ours, theirs = models
    scored = score_items(ours, TOKENIZER, ITEMS, batch_size=4)
    correct = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    for item, entry in zip(ITEMS, scored):
        pairs = [encode_pair(TOKENIZER, item.context, choice) for choice in item.choices]
        lls = np.array([reference_loglikelihood(theirs, c, k) for c, k in pairs])
        chars = np.array([float(len(choice)) for choice in item.choices])
        tokens = np.array([float(len(k)) for _, k in pairs])
        correct["acc"] += int(np.argmax(lls) == item.answer)
        correct["acc_norm"] += int(np.argmax(lls / chars) == item.answer)
        correct["acc_per_token"] += int(np.argmax(lls / tokens) == item.answer)
        assert entry["pred"] == int(np.argmax(lls)) and entry["pred_norm"] == int(np.argmax(lls / chars))
    assert multiple_choice_metrics(scored) == {name: count / len(ITEMS) for name, count in correct.items()}


def test_greedy_flag(models):
    ours, _ = models
    context = TOKENIZER.encode("Once upon a time")
    with torch.no_grad():
        best = int(ours(torch.tensor([context]))[0, -1].argmax())
    [(_, _, greedy)], [(_, _, not_greedy)] = (continuation_loglikelihoods(ours, [(context, [best])]),
                                              continuation_loglikelihoods(ours, [(context, [(best + 1) % 50257])]))
    assert greedy and not not_greedy
