"""The one-row fast path of gpt.linear against the plain product and nn.Linear."""

import pytest
import torch
import torch.nn.functional as F

from gpt.linear import Linear, row_blocked_product


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 200])
@pytest.mark.parametrize("rows", [1, 3])
def test_row_blocked_product_equals_the_plain_product(blocks, rows):
    """The weight cut into row blocks (overlapping where 101 rows do not divide evenly) gives hidden @ W.T."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(101, 32, generator=generator)  # (V, D)
    hidden = torch.randn(rows, 32, generator=generator)
    logits = row_blocked_product(hidden, weight, blocks)
    assert logits.shape == (rows, 101)
    torch.testing.assert_close(logits, hidden @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_one_row_without_grad_equals_nn_linear(bias):
    """A decoding step's one-row product takes the row-blocked path; it must equal F.linear, bias included."""
    torch.manual_seed(0)
    layer = Linear(32, 101, bias=bias)
    x = torch.randn(1, 1, 32)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (1, 1, 101)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out_with_grad = layer(x)  # autograd on: nn.Linear's own path, gradients flow
    out_with_grad.sum().backward()
    assert layer.weight.grad is not None
