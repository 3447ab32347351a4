"""The serving engine (gpt/serve/engine.py) on tiny models, without HTTP.

The references are independent of the engine: `gpt.generate` on each prompt alone, and
log-softmax of a full forward `model(ids)`. Requests are made concurrent by submitting them
before `start()`, so the first iteration admits them together.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import gpt.serve.engine as engine_module
from gpt.config import ModelConfig
from gpt.generate import generate
from gpt.model import GPT
from gpt.serve import Engine, Finished, QueueFull, SamplingParams, TokenEvent

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
PROMPTS = [[5, 17, 42, 8], [7], [9, 10, 11], list(range(20, 40)), [50, 51], [3] * 10, [88, 7, 1], [60, 2, 2, 9, 4]]


def random_model(style: str) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=101, context_length=64, d_model=32, n_layer=2, n_head=4,
                           **(LLAMA if style == "llama" else {}))).eval()


@pytest.fixture(params=["gpt2", "llama"])
def model(request) -> GPT:
    return random_model(request.param)


@pytest.fixture(scope="module")
def trained_model() -> GPT:
    """A model trained for a moment on a full-period sequence t -> (5t + 3) mod 64: varied greedy
    continuations and peaked logits, unlike a random model's."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context_length=64, d_model=48, n_layer=2, n_head=4, **LLAMA))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        ids = [torch.randint(0, 64, (16,))]
        for _ in range(32):
            ids.append((5 * ids[-1] + 3) % 64)
        ids = torch.stack(ids, dim=1)  # (16, 33)
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class Collector:
    """An on_event callback that keeps a request's events and says when its Finished came."""

    def __init__(self, log: list | None = None) -> None:
        self.events: list[TokenEvent | Finished] = []
        self.done = threading.Event()
        self.log = log  # a shared list: the order of events across requests

    def __call__(self, event: TokenEvent | Finished) -> None:
        self.events.append(event)
        if self.log is not None:
            self.log.append((self, event))
        if isinstance(event, Finished):
            self.done.set()

    def wait(self) -> Finished:
        assert self.done.wait(60), "the request never finished"
        assert sum(isinstance(e, Finished) for e in self.events) == 1
        return self.events[-1]

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def logprobs(self) -> list[tuple[float | None, list | None]]:
        return [(e.logprob, e.top_logprobs) for e in self.events if isinstance(e, TokenEvent)]


@contextlib.contextmanager
def running(engine: Engine):
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(drain_seconds=0)


def run_together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Collector]:
    """Submit every request before the engine starts, so they decode side by side; wait for all."""
    collectors = [Collector() for _ in prompts]
    for prompt, p, collector in zip(prompts, params, collectors):
        engine.submit(prompt, p, collector)
    with running(engine):
        for collector in collectors:
            collector.wait()
    return collectors


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def alone(model: GPT, prompt: list[int], steps: int, **kwargs) -> list[int]:
    return generate(model, [prompt], steps, temperature=0.0, **kwargs)[0][len(prompt):]


# ----------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_concurrent_greedy_equals_generate_alone(model, max_batch):
    collectors = run_together(Engine(model, max_batch=max_batch), PROMPTS, [greedy(20)] * len(PROMPTS))
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.tokens == alone(model, prompt, 20)
        assert collector.wait() == Finished("length", len(prompt), 20)


def test_concurrent_greedy_equals_generate_alone_on_a_trained_model(trained_model):
    prompts = [[1], [8, 43], [30, 25, 0, 3], [7, 7, 7], list(range(0, 60, 3)), [63, 2], [11, 58, 33], [40]]
    collectors = run_together(Engine(trained_model), prompts, [greedy(24)] * len(prompts))
    for prompt, collector in zip(prompts, collectors):
        assert collector.tokens == alone(trained_model, prompt, 24)
    assert len({tuple(c.tokens) for c in collectors}) == len(prompts)  # not degenerate: all different


def sampling(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=seed, logprobs=2)


@pytest.mark.parametrize("max_batch", [1, 8])
def test_seeded_sampling_alone_equals_concurrent(model, max_batch):
    seeds = range(len(PROMPTS))
    together = run_together(Engine(model, max_batch=max_batch), PROMPTS, [sampling(s) for s in seeds])
    for prompt, seed, collector in zip(PROMPTS, seeds, together):
        [solo] = run_together(Engine(model, max_batch=max_batch), [prompt], [sampling(seed)])
        assert collector.events == solo.events  # tokens and logprobs, bitwise
    assert len({tuple(c.tokens) for c in together}) > 1


def test_under_autocast_a_request_is_still_the_same_alone_or_concurrent(model):
    prompts, params = PROMPTS[:4], [sampling(seed) for seed in range(4)]
    together = run_together(Engine(model, dtype=torch.bfloat16), prompts, params)
    for prompt, p, collector in zip(prompts, params, together):
        [solo] = run_together(Engine(model, dtype=torch.bfloat16), [prompt], [p])
        assert collector.events == solo.events


def test_seeded_sampling_equals_generate_with_that_seed(trained_model):
    """max_batch=1 runs generate's kernels: a seeded request gives generate's tokens with that generator."""
    prompts = [[1], [8, 43], [30, 25, 0, 3]]
    params = [SamplingParams(max_tokens=20, temperature=1.5, top_k=20, top_p=0.9, seed=seed) for seed in range(3)]
    for prompt, p, collector in zip(prompts, params, run_together(Engine(trained_model, max_batch=1), prompts, params)):
        expected = generate(trained_model, [prompt], 20, temperature=1.5, top_k=20, top_p=0.9,
                            generator=torch.Generator().manual_seed(p.seed))[0][len(prompt):]
        assert collector.tokens == expected


def test_a_request_gets_the_same_logits_in_any_slot(model):
    """max_batch=5: the engine widens its step until every row computes alike, so the last slot equals the first."""
    engine = Engine(model, max_batch=5)
    assert engine.width >= 5
    target = [5, 9, 13, 2]
    [solo] = run_together(engine, [target], [greedy(12, logprobs=3)])
    fillers = [[7 + i, 3] for i in range(4)]
    *_, last = run_together(Engine(model, max_batch=5), fillers + [target], [greedy(30)] * 4 + [greedy(12, logprobs=3)])
    assert last.events == solo.events


def test_a_request_joins_while_others_decode(model):
    order: list = []
    first_tokens = threading.Event()
    long = [Collector(order), Collector(order)]
    joiner = Collector(order)
    engine = Engine(model, max_batch=4)

    def watch(event):  # the first long request's callback: signal after its 5th token
        long[0](event)
        if len(long[0].tokens) == 5:
            first_tokens.set()

    engine.submit(PROMPTS[0], greedy(40), watch)
    engine.submit(PROMPTS[1], greedy(40), long[1])
    with running(engine):
        assert first_tokens.wait(60)
        engine.submit(PROMPTS[2], greedy(10), joiner)
        for collector in (*long, joiner):
            collector.wait()
    assert long[0].tokens == alone(model, PROMPTS[0], 40)
    assert long[1].tokens == alone(model, PROMPTS[1], 40)
    assert joiner.tokens == alone(model, PROMPTS[2], 10)
    joiner_done = next(i for i, (c, e) in enumerate(order) if c is joiner and isinstance(e, Finished))
    long_done = next(i for i, (c, e) in enumerate(order) if c is long[0] and isinstance(e, Finished))
    assert joiner_done < long_done  # it decoded beside them, not after them


# ----------------------------------------------------------------------------- stopping


def test_stop_token_ids_and_eos_end_the_request_after_that_token(model):
    prompt = PROMPTS[0]
    free_run = alone(model, prompt, 20)
    stop = free_run[4]
    cut = free_run[: free_run.index(stop) + 1]
    [by_stop] = run_together(Engine(model), [prompt], [greedy(20, stop_token_ids=(stop,))])
    [by_eos] = run_together(Engine(model, eos_ids=[stop]), [prompt], [greedy(20)])
    for collector in (by_stop, by_eos):
        assert collector.tokens == cut
        assert collector.wait() == Finished("stop", len(prompt), len(cut))
    assert by_eos.tokens == alone(model, prompt, 20, eos_id=stop)


def test_max_tokens_ends_with_length(model):
    together = run_together(Engine(model), [PROMPTS[0], PROMPTS[1]], [greedy(3), greedy(0)])
    assert together[0].wait() == Finished("length", 4, 3) and len(together[0].tokens) == 3
    assert together[1].events == [Finished("length", 1, 0)]


# ----------------------------------------------------------------------------- cancel, queue, errors


def test_cancel_frees_the_slot_for_a_queued_request(model):
    order: list = []
    first, second = Collector(order), Collector(order)
    engine = Engine(model, max_batch=1)

    def cancel_after_three(event):
        first(event)
        if len(first.tokens) == 3:
            handle.cancel()

    handle = engine.submit(PROMPTS[0], greedy(50), cancel_after_three)
    engine.submit(PROMPTS[1], greedy(10), second)
    queued_then_cancelled = Collector()
    engine.submit(PROMPTS[2], greedy(10), queued_then_cancelled).cancel()
    with running(engine):
        finished = first.wait()
        second.wait()
        queued_then_cancelled.wait()
    assert finished == Finished("cancelled", len(PROMPTS[0]), 3)  # freed at the next step, no 4th token
    assert queued_then_cancelled.events == [Finished("cancelled", len(PROMPTS[2]), 0)]
    assert second.tokens == alone(model, PROMPTS[1], 10)
    assert order.index((first, finished)) < order.index((second, second.events[0]))
    assert engine.stats == {"active": 0, "queued": 0, "completed": 3}


def test_a_full_queue_refuses_and_bad_requests_are_value_errors(model):
    engine = Engine(model, max_queue=2, max_context=32)
    collectors = [Collector(), Collector()]
    for collector in collectors:
        engine.submit([1, 2], greedy(5), collector)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], greedy(5), Collector())
    assert engine.stats == {"active": 0, "queued": 2, "completed": 0}
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], greedy(5), Collector())
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_tokens \(5\) = 35 exceeds the context of 32"):
        engine.submit([1] * 30, greedy(5), Collector())
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(logprobs=-1), dict(max_tokens=-1)):
        with pytest.raises(ValueError):
            engine.submit([1], SamplingParams(**{"max_tokens": 1, **bad}), Collector())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([101], greedy(1), Collector())
    engine.shutdown()  # never started: the queued requests are cancelled
    assert [c.wait().reason for c in collectors] == ["cancelled", "cancelled"]
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit([1], greedy(1), Collector())


def test_an_exception_fails_only_its_own_request(model, monkeypatch):
    real_sample = engine_module.sample_next_token

    def sample_failing_at_half_temperature(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("sampler broke")
        return real_sample(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "sample_next_token", sample_failing_at_half_temperature)

    class FailingCallback(Collector):
        def __call__(self, event):
            super().__call__(event)
            if len(self.events) == 2:
                raise ValueError("client went away")

    prompts = PROMPTS[:4]
    collectors = [Collector(), Collector(), FailingCallback(), Collector()]
    engine = Engine(model)
    engine.submit(prompts[0], greedy(12), collectors[0])
    engine.submit(prompts[1], SamplingParams(max_tokens=12, temperature=0.5), collectors[1])
    engine.submit(prompts[2], greedy(12), collectors[2])
    engine.submit(prompts[3], greedy(12), collectors[3])
    with running(engine):
        for collector in collectors:
            collector.wait()
    assert collectors[1].events == [Finished("error", len(prompts[1]), 0, "RuntimeError: sampler broke")]
    assert collectors[2].wait() == Finished("error", len(prompts[2]), 1, "ValueError: client went away")
    for i in (0, 3):
        assert collectors[i].tokens == alone(model, prompts[i], 12)


# ----------------------------------------------------------------------------- logprobs and score


def reference_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log_softmax of a full forward's logits (T, V): row t is the distribution of token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


@pytest.mark.parametrize("max_batch", [1, 8])
def test_logprobs_of_generated_tokens_equal_the_model_distribution(model, max_batch):
    params = [greedy(10, logprobs=3), sampling(seed=1), greedy(6, logprobs=0)]
    prompts = PROMPTS[:3]
    for prompt, collector in zip(prompts, run_together(Engine(model, max_batch=max_batch), prompts, params)):
        reference = reference_logprobs(model, prompt + collector.tokens)
        for step, (token, (logprob, top)) in enumerate(zip(collector.tokens, collector.logprobs)):
            expected = reference[len(prompt) - 1 + step]
            assert logprob == pytest.approx(float(expected[token]), abs=1e-5)
            values, ids = expected.topk(len(top))
            assert [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)


def test_score_equals_log_softmax_of_a_full_forward(model):
    prompt = PROMPTS[3]
    reference = reference_logprobs(model, prompt)
    engine = Engine(model)
    inline = engine.score(prompt, top_k=3)  # no scheduler thread yet: runs inline
    busy = [Collector() for _ in range(3)]
    for i, collector in enumerate(busy):
        engine.submit(PROMPTS[i], greedy(30), collector)
    with running(engine):
        on_thread = engine.score(prompt, top_k=3)  # queued for the scheduler thread, between steps
        for collector in busy:
            collector.wait()
    assert on_thread == inline
    assert inline[0] == (None, [])
    assert len(inline) == len(prompt)
    for t, (logprob, top) in enumerate(inline[1:], start=1):
        assert logprob == pytest.approx(float(reference[t - 1, prompt[t]]), abs=1e-5)
        values, ids = reference[t - 1].topk(3)
        assert [i for i, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
    for i, collector in enumerate(busy):
        assert collector.tokens == alone(model, PROMPTS[i], 30)


# ----------------------------------------------------------------------------- shutdown


def test_shutdown_drains_running_and_queued_requests(model):
    engine = Engine(model, max_batch=2)
    collectors = [Collector() for _ in range(5)]
    engine.start()
    for prompt, collector in zip(PROMPTS, collectors):
        engine.submit(prompt, greedy(15), collector)
    engine.shutdown(drain_seconds=60)
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.wait().reason == "length"
        assert collector.tokens == alone(model, prompt, 15)
    with pytest.raises(RuntimeError):
        engine.submit([1], greedy(1), Collector())


def test_shutdown_cancels_what_the_drain_time_does_not_cover(model):
    engine = Engine(model, max_batch=1)
    collectors = [Collector() for _ in range(3)]
    for prompt, collector in zip(PROMPTS, collectors):
        engine.submit(prompt, greedy(40), collector)
    engine.start()
    engine.shutdown(drain_seconds=0)
    assert [c.wait().reason for c in collectors] == ["cancelled"] * 3
    assert engine.stats == {"active": 0, "queued": 0, "completed": 3}
