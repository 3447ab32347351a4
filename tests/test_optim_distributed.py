"""gpt/optim.py on DTensor parameters, as FSDP2 shards them: two CPU processes over gloo.

Two ranks shard parameters along dim 0 (`distribute_tensor(..., [Shard(0)])`, uneven
where the first dimension is odd) and run our AdamW and `clip_grad_norm` on them. The
references run in this process on the whole tensors: our AdamW on plain tensors (bit for
bit) and `torch.nn.utils.clip_grad_norm_`. Starting the two processes (each imports torch)
is most of the time, so one run of the workers serves every test of the file.

The fused path's kernel updates tensors of 6 elements and more alone here, smaller ones
gathered (`FUSED_MIN_ELEMENTS`): a shard may go one way and its whole tensor the other,
with the same arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gpt.optim
from gpt.optim import AdamW, clip_grad_norm

pytestmark = pytest.mark.slow  # two processes (~10-40 s); CI runs the slow set too

WORLD_SIZE = 2
# (5, 3): rank 0 holds 3 rows, rank 1 holds 2. (1,): rank 1 holds an empty shard.
SHAPES = [(5, 3), (4, 6), (7,), (2, 3, 2), (1,)]
STEPS = 6
PATHS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
ADAMW_CASES = [(path, weight_decay) for path in PATHS for weight_decay in (0.0, 0.1)]
FUSED_MIN_ELEMENTS = 6
MAX_NORMS = (0.5, 1e6)  # clipping active, inactive


def initial_values() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def gradients(step: int) -> list[torch.Tensor | None]:
    """Seeded random gradients for one step; the 1-D bias has none every third step."""
    generator = torch.Generator().manual_seed(100 + step)
    grads: list[torch.Tensor | None] = [torch.randn(shape, generator=generator) for shape in SHAPES]
    if step % 3 == 2:
        grads[2] = None
    return grads


def train(params: list[torch.Tensor], optimizer: AdamW, to_param_layout, steps: range) -> None:
    """`steps` AdamW steps with a changing learning rate; `to_param_layout` makes a full gradient like the params."""
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        for param, grad in zip(params, gradients(step)):
            param.grad = None if grad is None else to_param_layout(grad)
        optimizer.step()


def make_optimizer(params: list[torch.Tensor], path: str, weight_decay: float) -> AdamW:
    return AdamW(
        [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
        betas=(0.9, 0.95), weight_decay=weight_decay, **PATHS[path],
    )


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2))


def mlp_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + rank))


def train_mlp(model: nn.Module, path: str, losses_of_step) -> None:
    """Steps of clipped AdamW on `model` by `path`; `losses_of_step(step)` is the loss to backpropagate."""
    optimizer = AdamW(model.parameters(), lr=1e-2, **PATHS[path])
    for step in range(STEPS):
        losses_of_step(step).backward()
        clip_grad_norm(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()


class Sharded(nn.Module):
    """The parameters in a module, as `torch.distributed.checkpoint.state_dict` wants them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(params)


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    """One rank: every scenario of the file on DTensor parameters; rank 0 saves the gathered results."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    torch.set_num_threads(1)
    gpt.optim.FUSED_MIN_ELEMENTS = FUSED_MIN_ELEMENTS
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))

        def shard(tensor: torch.Tensor) -> torch.Tensor:
            return distribute_tensor(tensor, mesh, [Shard(0)])

        def sharded_params() -> list[nn.Parameter]:
            return [nn.Parameter(shard(value)) for value in initial_values()]

        results: dict = {"adamw": {}, "clip": {}}
        for path, weight_decay in ADAMW_CASES:
            params = sharded_params()
            optimizer = make_optimizer(params, path, weight_decay)
            train(params, optimizer, shard, range(STEPS))
            state = optimizer.state_dict()["state"]
            results["adamw"][(path, weight_decay)] = {
                "params": [p.full_tensor() for p in params],
                "exp_avg": [state[i]["exp_avg"].full_tensor() for i in range(len(params))],
                "exp_avg_sq": [state[i]["exp_avg_sq"].full_tensor() for i in range(len(params))],
                "steps": [state[i]["step"] for i in range(len(params))],
                "moments_sharded": all(
                    isinstance(state[i][key], DTensor) and state[i][key].placements == (Shard(0),)
                    for i in range(len(params)) for key in ("exp_avg", "exp_avg_sq")
                ),
            }

        # Resume through torch.distributed.checkpoint: half the steps, save, load into a fresh run, the rest.
        first_half = sharded_params()
        first_half_optimizer = make_optimizer(first_half, "foreach", 0.1)
        train(first_half, first_half_optimizer, shard, range(STEPS // 2))
        checkpoint_dir = Path(out_dir) / "dcp"
        dcp.save({"optimizer": get_optimizer_state_dict(Sharded(first_half), first_half_optimizer)},
                 checkpoint_id=checkpoint_dir)
        resumed = sharded_params()
        resumed_optimizer = make_optimizer(resumed, "foreach", 0.1)
        loaded = {"optimizer": get_optimizer_state_dict(Sharded(resumed), resumed_optimizer)}
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_optimizer_state_dict(Sharded(resumed), resumed_optimizer, loaded["optimizer"])
        for param, value in zip(resumed, first_half):
            param.data.copy_(value.data)
        train(resumed, resumed_optimizer, shard, range(STEPS // 2, STEPS))
        results["resumed"] = [p.full_tensor() for p in resumed]

        # A DTensor parameter with a plain gradient is refused, not updated with mismatched shards.
        param = nn.Parameter(shard(torch.ones(4)))
        param.grad = torch.ones(4)
        try:
            AdamW([param]).step()
            results["plain_grad_refused"] = False
        except RuntimeError as error:
            results["plain_grad_refused"] = "sharded like its parameter" in str(error)

        # FSDP2 itself: each rank's batch, gradients averaged over the ranks by fully_shard.
        from torch.distributed.fsdp import fully_shard

        results["fsdp2"] = {}
        for path in ("foreach", "fused"):
            model = tiny_mlp()
            fully_shard(model, mesh=mesh)
            train_mlp(model, path, lambda step: model(mlp_batch(rank, step)).square().mean())
            results["fsdp2"][path] = [p.full_tensor() for p in model.parameters()]

        # Clipping: all gradients sharded but the last, which every rank holds whole (Replicate).
        for max_norm in MAX_NORMS:
            grads = [g for g in gradients(0) if g is not None]
            params = [nn.Parameter(shard(torch.zeros(g.shape))) for g in grads[:-1]]
            params.append(nn.Parameter(distribute_tensor(torch.zeros(grads[-1].shape), mesh, [Replicate()])))
            for param, grad in zip(params, grads):
                param.grad = distribute_tensor(grad, mesh, param.placements)
            norm = clip_grad_norm(params, max_norm)
            norms = [torch.zeros(()) for _ in range(WORLD_SIZE)]
            dist.all_gather(norms, norm)
            results["clip"][max_norm] = {
                "norm_is_plain": type(norm) is torch.Tensor and norm.ndim == 0,
                "norms_of_ranks": norms,
                "grads": [p.grad.full_tensor() for p in params],
            }
        if rank == 0:
            torch.save(results, Path(out_dir) / "results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict:
    """The workers' results, from one run of two processes."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("optim_distributed")
    mp.spawn(_worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out_dir / "results.pt", weights_only=False)


@pytest.mark.parametrize("path, weight_decay", ADAMW_CASES)
def test_adamw_on_sharded_params_equals_adamw_on_whole_params(
    sharded_results, monkeypatch: pytest.MonkeyPatch, path: str, weight_decay: float
) -> None:
    monkeypatch.setattr(gpt.optim, "FUSED_MIN_ELEMENTS", FUSED_MIN_ELEMENTS)
    sharded = sharded_results["adamw"][(path, weight_decay)]
    params = [nn.Parameter(value) for value in initial_values()]
    optimizer = make_optimizer(params, path, weight_decay)
    train(params, optimizer, lambda grad: grad, range(STEPS))

    assert sharded["moments_sharded"]
    for index, (param, start) in enumerate(zip(params, initial_values())):
        state = optimizer.state[param]
        assert not torch.equal(param, start)
        assert torch.equal(sharded["params"][index], param)
        assert torch.equal(sharded["exp_avg"][index], state["exp_avg"])
        assert torch.equal(sharded["exp_avg_sq"][index], state["exp_avg_sq"])
        assert sharded["steps"][index] == state["step"]
    assert sharded["steps"][2] == STEPS - STEPS // 3  # the bias skipped every third step


def test_a_resume_through_distributed_checkpoint_continues_bit_for_bit(sharded_results) -> None:
    straight = sharded_results["adamw"][("foreach", 0.1)]["params"]
    for resumed, uninterrupted in zip(sharded_results["resumed"], straight):
        assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_fsdp2_training_equals_training_on_both_batches(
    sharded_results, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """fully_shard's parameters through clip_grad_norm and AdamW, against one process averaging both ranks' losses."""
    monkeypatch.setattr(gpt.optim, "FUSED_MIN_ELEMENTS", FUSED_MIN_ELEMENTS)
    model = tiny_mlp()
    start = [p.detach().clone() for p in model.parameters()]

    def loss_of_both_batches(step: int) -> torch.Tensor:
        return sum(model(mlp_batch(rank, step)).square().mean() for rank in range(WORLD_SIZE)) / 2

    train_mlp(model, path, loss_of_both_batches)
    for sharded, param, initial in zip(sharded_results["fsdp2"][path], model.parameters(), start):
        assert not torch.equal(param, initial)
        # Bit for bit: a sum of two gradients rounds the same in either order, and the
        # halvings (of the loss here, of the summed gradient in FSDP2) are exact.
        assert torch.equal(sharded, param.detach())


def test_a_plain_gradient_of_a_sharded_param_is_refused(sharded_results) -> None:
    assert sharded_results["plain_grad_refused"]


@pytest.mark.parametrize("max_norm", MAX_NORMS)
def test_clip_grad_norm_on_sharded_grads_equals_torch_on_whole_grads(sharded_results, max_norm) -> None:
    sharded = sharded_results["clip"][max_norm]
    grads = [g for g in gradients(0) if g is not None]
    params = [nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    reference_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

    assert sharded["norm_is_plain"]
    rank0_norm, rank1_norm = sharded["norms_of_ranks"]
    assert torch.equal(rank0_norm, rank1_norm)
    # A sum of squares in another order: float32 rounding, a few ulps of a norm around 8.
    assert rank0_norm.item() == pytest.approx(reference_norm.item(), rel=1e-6)
    if max_norm < reference_norm:
        assert not torch.equal(params[0].grad, grads[0])
    for clipped, reference in zip(sharded["grads"], params):
        torch.testing.assert_close(clipped, reference.grad, rtol=1e-6, atol=0)
    # The clipped gradients have the norm asked for (the 1e-6 guard aside).
    clipped_norm = math.sqrt(sum(g.double().square().sum().item() for g in sharded["grads"]))
    assert clipped_norm == pytest.approx(min(max_norm, reference_norm.item()), rel=1e-5)
