"""Generation: greedy with and without the KV cache, batches of uneven prompts, eos, sampling filters."""

import pytest
import torch

from gpt.config import ModelConfig
from gpt.generate import generate, sample_next_token
from gpt.model import GPT


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    style = {} if request.param == "gpt2" else dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=101, context_length=48, d_model=32, n_layer=2, n_head=4, **style)).eval()


def greedy_by_full_forward(model, prompt, steps):
    """The reference: re-run the whole sequence and take the argmax of the last position."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


def test_cached_greedy_equals_argmax_of_full_forward(model):
    prompt = [5, 17, 42, 8]
    expected = greedy_by_full_forward(model, prompt, 20)
    cached = generate(model, torch.tensor(prompt), max_new_tokens=20, temperature=0.0)
    uncached = generate(model, torch.tensor(prompt), max_new_tokens=20, use_cache=False)
    assert cached.tolist() == expected
    assert uncached.tolist() == expected


def test_batch_of_uneven_prompts_equals_each_alone(model):
    prompts = [[1, 2, 3, 4, 5, 6], [7], [9, 10, 11]]
    batch = generate(model, prompts, max_new_tokens=12)
    for prompt, row in zip(prompts, batch):
        assert row == greedy_by_full_forward(model, prompt, 12)


def test_stops_at_eos(model):
    prompt = [3, 1, 4]
    free_run = greedy_by_full_forward(model, prompt, 10)
    eos = free_run[5]  # the third generated token
    out = generate(model, [prompt], max_new_tokens=10, eos_id=eos)[0]
    assert out == free_run[: free_run.index(eos, 3) + 1]
    tensor_out = generate(model, torch.tensor([prompt, prompt]), max_new_tokens=10, eos_id=eos)
    assert tensor_out.shape[1] == len(out)  # the whole batch stopped, nothing past eos


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(ValueError, match="context_length"):
        generate(model, torch.zeros(40, dtype=torch.long), max_new_tokens=20)


def test_top_k_one_is_greedy_and_sampling_is_seeded():
    logits = torch.randn(4, 50)
    sampled = sample_next_token(logits, temperature=1.0, top_k=1)
    assert torch.equal(sampled, logits.argmax(-1))
    a = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_temperature_divides_the_logits():
    """Sampled frequencies follow softmax(logits / T): 20,000 draws, within 0.015 of each probability."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 2.0):
        draws = sample_next_token(logits.expand(20_000, 4), temperature, generator=torch.Generator().manual_seed(0))
        frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
        expected = torch.exp(logits / temperature) / torch.exp(logits / temperature).sum()
        torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_top_p_stops_at_the_token_whose_mass_reaches_p():
    """Two equally likely tokens (0.5 each): the first alone reaches top_p = 0.5, so the other is never drawn."""
    logits = torch.zeros(2000, 2)
    draws = sample_next_token(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert len(set(draws.tolist())) == 1
    both = sample_next_token(logits, 1.0, top_p=0.51, generator=torch.Generator().manual_seed(0))
    assert set(both.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two only
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([sample_next_token(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s))
                         for s in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    share_of_first = (draws == 0).float().mean().item()
    assert abs(share_of_first - 0.5 / 0.8) < 0.08
