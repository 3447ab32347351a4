"""Growing a trained model into a bigger one that computes the same function.

    grown = grow_model(model, n_layer=8, d_model=256)   # logits equal to model's before any step
    python pretrain.py --init.from runs/small --init.grow "n_layer=8,d_model=256" ...

A grown model starts where the small one stopped: its logits equal the small model's (up
to float rounding) before the first training step, so the bigger model spends its steps
on what the small one could not learn instead of relearning what it could. Every size
below may grow, none may shrink; everything else in the ModelConfig (norm, positions,
MLP kind, bias, tying, dropout, attn_impl, loss_impl) is copied over.

Depth, `n_layer=N` (N >= n_layer). The N - n_layer new blocks are copies of evenly spaced
existing blocks, each inserted right after the block it copies (a block copied twice has
both copies after it). A copy's residual-writing projections, the attention out_proj and
the MLP down_proj, weights and biases, are zero, so the copy adds exactly zero to the
residual stream: x + 0 + 0 = x. It still trains: the gradient of a zero out_proj is
(gradient at the residual stream) x (attention output), and that output is not zero,
because the copy's q/k/v/up projections are the trained ones. Once out_proj and down_proj
move off zero, the rest of the copy gets gradients too.

Width, `d_model=M` with M = k * d_model for an integer k. Every width scales by k:
d_model, n_head, n_kv_head and d_ff. head_dim = d_model / n_head stays, so RoPE's tables
and the attention scale 1/sqrt(head_dim) are the same as before. The residual stream
becomes k stacked copies [x, x, ..., x] of the old one:

- the token (and learned position) embeddings are tiled k times along d_model;
- norm weights and biases are tiled. LayerNorm's mean and variance (RMSNorm's mean
  square) over k identical copies equal those over one, so with the same eps the
  normalized output is again k copies of the old output;
- every linear layer W (out, in) becomes W' (k*out, k*in), k x k blocks, block (j, i) =
  W * alpha[j, i] elementwise, where for each output copy j the alphas over the input
  copies i sum to 1 at every entry; biases are tiled. The input copies are identical, so
  output copy j = sum_i (W * alpha[j, i]) x = W x: k copies of the old output.
  The alphas are 1/k * (1 + SPLIT_NOISE * z), z standard normal (seeded by `seed`) minus
  its mean over the input copies, so they sum to exactly 1 in exact arithmetic;
- heads: tiling the q rows k times gives the heads [h_0..h_{H-1}, copies of h_0..h_{H-1},
  ...], new head h + j*H being copy j of old head h; k and v tile the same way, kv head
  g + j*H_kv being copy j of old kv head g. With grouped-query attention (group size
  H / H_kv, unchanged because both counts scale by k) new query head h + j*H reads kv
  head (h + j*H) // group = h // group + j*H_kv: copy j of the kv head old head h read.
  So every new head computes its old head's output, and the concatenated heads are k
  copies of the old attention output, which out_proj's split turns into k copies again;
- the MLP's hidden units are k copies (GELU and SwiGLU act elementwise), down_proj splits;
- an untied LM head (vocab, d_model) becomes (vocab, k*d_model), one output block split
  over k input blocks: logits = sum_i (W * alpha_i) y = W y. A tied head IS the tiled
  embedding, [E, E, ..., E], so it would sum k equal terms and give k times the logits;
  the final norm's weight (and bias) are divided by k instead, making its output copies
  y / k and the logits k * E (y / k) = E y.

Why random splits and not W / k everywhere: with equal splits every copy of a unit has the
same weights, the same inputs and so the same gradient; the same AdamW update keeps them
equal, and the k copies stay one model's worth of features forever (the same symmetry
that forbids initializing a network with all-equal weights). With splits that differ
per copy, the gradient reaching input copy i, sum_j (W * alpha[j, i])^T g_j, differs
between copies, the copies' updates differ, and training pulls them apart.

MLP width alone, `d_ff=F` (F >= d_ff, any F; with `d_model` too, F >= k * d_ff). The new
hidden units get random up (and gate) rows, with the standard deviation of the layer's
trained rows and zero biases, and zero down_proj columns: whatever they compute is
multiplied by zero. Their down_proj columns still get gradients (g x hidden, and hidden is
not zero, which is why the up rows are random, not zero: zero rows and zero columns
would give each other zero gradients forever).

Context, `context_length=C`: RoPE models only, where positions have no parameters (the
cos/sin tables are rebuilt for C, their first rows unchanged). A learned position table
has no trained rows for positions past the old context, so it is refused. n_head and
n_kv_head follow d_model; vocab_size is the tokenizer's. A grown model has no LoRA
adapters and no quantized layers: merge or dequantize first.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from .config import ModelConfig
from .errors import ConfigError, UserError
from .model import GPT

GROWABLE = ("n_layer", "d_model", "d_ff", "context_length")
# How far the width split's alphas spread around 1/k (relative): enough to break the copies' symmetry,
# far from alphas of opposite signs, whose cancellation would cost float precision.
SPLIT_NOISE = 0.25

_FIXED_FIELDS = {
    "n_head": "n_head follows d_model (widening d_model k times makes k times the heads, head_dim stays)",
    "n_kv_head": "n_kv_head follows d_model (widening d_model k times makes k times the kv heads)",
    "vocab_size": "vocab_size is the tokenizer's and does not grow",
}
# Residual-writing projections: zero in a depth copy, so the copy adds nothing to the residual stream.
_RESIDUAL_WRITERS = ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_NORM_KEYS = ("attn_norm.weight", "attn_norm.bias", "mlp_norm.weight", "mlp_norm.bias")
_LINEAR_NAMES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# ----------------------------------------------------------------------------
# What to grow
# ----------------------------------------------------------------------------


def check_growable(key: str, name: str) -> None:
    """A ConfigError naming `key` unless `name` is a ModelConfig field that can grow."""
    if name in _FIXED_FIELDS:
        raise ConfigError(f"{key}: {name} cannot be given: {_FIXED_FIELDS[name]}")
    if name not in GROWABLE:
        raise ConfigError(f"{key}: {name!r} cannot grow; the fields that grow: {', '.join(GROWABLE)}")


def parse_grow_spec(spec: str, key: str = "init.grow") -> dict[str, int]:
    """"n_layer=8,d_model=256" -> {"n_layer": 8, "d_model": 256}; a ConfigError naming `key` for a bad spec.

    Only the form is checked here; whether each size fits the model is grow_model's check.
    """
    if not spec.strip():
        raise ConfigError(f"{key}: empty; expected name=size pairs such as 'n_layer=8,d_model=256'")
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not name:
            raise ConfigError(f"{key}: {item.strip()!r} is not name=size (as in 'n_layer=8,d_model=256')")
        check_growable(key, name)
        if name in sizes:
            raise ConfigError(f"{key}: {name} is given twice")
        if not re.fullmatch(r"[0-9]+", value):
            raise ConfigError(f"{key}: {name}={value!r} is not a positive integer")
        if int(value) == 0:
            raise ConfigError(f"{key}: {name} must be positive, got 0")
        sizes[name] = int(value)
    return sizes


def grown_config(old: ModelConfig, sizes: dict[str, int]) -> ModelConfig:
    """The config of `old` grown to `sizes`; a UserError naming the field for a size that cannot be grown to."""
    for name, size in sizes.items():
        check_growable("grow", name)
        if not isinstance(size, int) or isinstance(size, bool):
            raise UserError(f"grow: {name} must be an integer, got {size!r}")
        if size < getattr(old, name):
            raise UserError(f"grow: {name}={size} is smaller than the model's {name} ({getattr(old, name)}); "
                            f"growing never shrinks a model")
    d_model = sizes.get("d_model", old.d_model)
    if d_model % old.d_model:
        raise UserError(f"grow: d_model={d_model} is not a multiple of the model's d_model ({old.d_model}); "
                        f"widening stacks copies of the residual stream: use {2 * old.d_model}, "
                        f"{3 * old.d_model}, ...")
    k = d_model // old.d_model
    d_ff = sizes.get("d_ff", k * old.d_ff)
    if d_ff < k * old.d_ff:
        raise UserError(f"grow: d_ff={d_ff} is smaller than {k * old.d_ff}, the model's d_ff ({old.d_ff}) "
                        f"times the width factor {k} that d_model={d_model} sets")
    context_length = sizes.get("context_length", old.context_length)
    if context_length > old.context_length and old.pos_emb != "rope":
        raise UserError(f"grow: context_length={context_length} needs RoPE: this model's positions are a learned "
                        f"table with no trained rows past {old.context_length}")
    return dataclasses.replace(
        old, n_layer=sizes.get("n_layer", old.n_layer), d_model=d_model, n_head=k * old.n_head,
        n_kv_head=k * old.n_kv_head, d_ff=d_ff, context_length=context_length,
    )


# ----------------------------------------------------------------------------
# Growing the weights
# ----------------------------------------------------------------------------


def copied_blocks(old_layers: int, new_layers: int) -> list[int]:
    """Which old block each new block starts from, in order: [0, 1, 1, 2, 3, 3] for 4 -> 6.

    The copies are of evenly spaced blocks, each right after its source."""
    extra = new_layers - old_layers
    copied = [(2 * i + 1) * old_layers // (2 * extra) for i in range(extra)]  # the centres of `extra` equal spans
    return [source for source in range(old_layers) for _ in range(1 + copied.count(source))]


def deepen(state: dict[str, torch.Tensor], old_layers: int, new_layers: int) -> dict[str, torch.Tensor]:
    """The state of `new_layers` blocks: each copy follows its source, its residual writers zero."""
    blocks: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(old_layers)}
    grown = {}
    for name, tensor in state.items():
        match = _BLOCK_KEY.fullmatch(name)
        if match:
            blocks[int(match[1])][match[2]] = tensor
        else:
            grown[name] = tensor
    previous = -1
    for index, source in enumerate(copied_blocks(old_layers, new_layers)):
        is_copy = source == previous
        for rest, tensor in blocks[source].items():
            silenced = is_copy and rest in _RESIDUAL_WRITERS
            grown[f"blocks.{index}.{rest}"] = torch.zeros_like(tensor) if silenced else tensor
        previous = source
    return grown


def split(weight: torch.Tensor, k_out: int, k_in: int, generator: torch.Generator) -> torch.Tensor:
    """W (out, in) -> (k_out * out, k_in * in) of blocks W * alpha[j, i], the alphas of each j summing to 1 over i.

    Fed k_in equal copies of an input, it gives k_out copies of W's output."""
    noise = torch.randn(k_out, k_in, *weight.shape, generator=generator, dtype=torch.float64)  # (ko, ki, out, in)
    alpha = (1 + SPLIT_NOISE * (noise - noise.mean(dim=1, keepdim=True))) / k_in
    blocks = weight.double().cpu() * alpha  # (ko, ki, out, in)
    out_features, in_features = weight.shape
    grown = blocks.permute(0, 2, 1, 3).reshape(k_out * out_features, k_in * in_features)  # row j*out+r, col i*in+c
    return grown.to(weight.device, weight.dtype)


def role(name: str) -> str:
    """How a state_dict entry of a plain GPT widens: "embedding", "final_norm", "tiled", "linear" or "head"."""
    if name in ("tok_emb.weight", "pos_emb.weight"):
        return "embedding"
    if name in ("final_norm.weight", "final_norm.bias"):
        return "final_norm"
    if name == "lm_head.weight":
        return "head"
    match = _BLOCK_KEY.fullmatch(name)
    module, _, kind = (match[2] if match else "").rpartition(".")
    if match and (match[2] in _NORM_KEYS or (module in _LINEAR_NAMES and kind == "bias")):
        return "tiled"
    if match and module in _LINEAR_NAMES and kind == "weight":
        return "linear"
    raise UserError(f"grow: cannot grow a model holding {name}: only a plain GPT of gpt/model.py grows "
                    f"(merge LoRA adapters and load unquantized weights first)")


def widen(state: dict[str, torch.Tensor], k: int, tied: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The state of a k times wider model whose residual stream is k copies of the old one."""
    grown = {}
    for name, tensor in state.items():
        kind = role(name)
        if kind == "embedding":
            grown[name] = tensor.repeat(1, k)  # (rows, D) -> (rows, k*D)
        elif kind == "final_norm":
            grown[name] = tensor.repeat(k) / k if tied else tensor.repeat(k)  # a tied head sums k equal terms
        elif kind == "tiled":
            grown[name] = tensor.repeat(k)  # (n,) -> (k*n,)
        elif kind == "linear":
            grown[name] = split(tensor, k, k, generator)  # (out, in) -> (k*out, k*in)
        else:  # the head comes after the embedding in the state_dict
            grown[name] = grown["tok_emb.weight"] if tied else split(tensor, 1, k, generator)  # (V, k*D)
    return grown


def widen_mlp(state: dict[str, torch.Tensor], d_ff: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every MLP at `d_ff` hidden units: random up/gate rows, zero biases and zero down_proj columns for the new."""
    grown = dict(state)
    for name, tensor in state.items():
        if name.endswith(("mlp.up_proj.weight", "mlp.gate_proj.weight")):
            rows = torch.randn(d_ff - tensor.shape[0], tensor.shape[1], generator=generator)  # (new units, D)
            rows = rows.to(tensor.device, tensor.dtype) * tensor.float().std().item()  # the trained rows' scale
            grown[name] = torch.cat([tensor, rows])  # (d_ff, D)
        elif name.endswith(("mlp.up_proj.bias", "mlp.gate_proj.bias")):
            grown[name] = torch.cat([tensor, tensor.new_zeros(d_ff - tensor.shape[0])])  # (d_ff,)
        elif name.endswith("mlp.down_proj.weight"):
            grown[name] = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], d_ff - tensor.shape[1])], dim=1)
    return grown


def grow_model(model: GPT, *, seed: int = 0, **sizes: int) -> GPT:
    """A new GPT, grown to `sizes` (n_layer, d_model, d_ff, context_length), whose logits equal `model`'s.

    `model` is left as it was; the new model has its device, dtype and train/eval mode, and a
    ModelConfig equal to its own except the grown sizes. `seed` draws the width splits and new
    MLP rows (torch's global random state is left alone). The method: this module's docstring.
    """
    if not isinstance(model, GPT):
        raise UserError(f"grow: expected a GPT of gpt/model.py, got {type(model).__name__}")
    old = model.config
    new = grown_config(old, sizes)
    generator = torch.Generator().manual_seed(seed)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    for name in state:
        role(name)  # a LoRA adapter or a quantized layer: a clear error before any work
    if new.n_layer > old.n_layer:
        state = deepen(state, old.n_layer, new.n_layer)
    if new.d_model > old.d_model:
        state = widen(state, new.d_model // old.d_model, old.tie_embeddings, generator)
    if new.d_ff > new.d_model // old.d_model * old.d_ff:
        state = widen_mlp(state, new.d_ff, generator)
    like = model.tok_emb.weight
    with torch.random.fork_rng(devices=[]):  # the new model's random init is overwritten: keep the caller's stream
        grown = GPT(new)
    grown.to(device=like.device, dtype=like.dtype)  # the RoPE tables too, as they were in `model`
    grown.load_state_dict(state)
    return grown.train(model.training)


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def parameter_count(config: ModelConfig) -> int:
    """The parameters of GPT(config), from the config alone (a tied head counted once)."""
    D, F, bias = config.d_model, config.d_ff, int(config.bias)
    q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    norm = D * (2 if config.norm == "layernorm" and config.bias else 1)
    attention = D * q_width + 2 * D * kv_width + q_width * D + bias * (q_width + 2 * kv_width + D)
    mlp_inputs = 2 if config.mlp == "swiglu" else 1
    mlp = mlp_inputs * (D * F + bias * F) + F * D + bias * D
    block = 2 * norm + attention + mlp
    embeddings = config.vocab_size * D + (config.context_length * D if config.pos_emb == "learned" else 0)
    head = 0 if config.tie_embeddings else config.vocab_size * D
    return embeddings + config.n_layer * block + norm + head


def short_count(count: int) -> str:
    """1234567 -> "1.2M"; also "B" and "K"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def describe_growth(old: ModelConfig, new: ModelConfig) -> str:
    """"grown 4 -> 8 layers, d_model 128 -> 256 (n_head 4 -> 8, d_ff 512 -> 1024): 1.2M -> 4.5M parameters"."""
    parts = []
    if new.n_layer != old.n_layer:
        parts.append(f"{old.n_layer} -> {new.n_layer} layers")
    if new.d_model != old.d_model:
        follow = [f"n_head {old.n_head} -> {new.n_head}"]
        if old.n_kv_head != old.n_head:
            follow.append(f"n_kv_head {old.n_kv_head} -> {new.n_kv_head}")
        follow.append(f"d_ff {old.d_ff} -> {new.d_ff}")
        parts.append(f"d_model {old.d_model} -> {new.d_model} ({', '.join(follow)})")
    elif new.d_ff != old.d_ff:
        parts.append(f"d_ff {old.d_ff} -> {new.d_ff}")
    if new.context_length != old.context_length:
        parts.append(f"context_length {old.context_length} -> {new.context_length}")
    counts = f"{short_count(parameter_count(old))} -> {short_count(parameter_count(new))} parameters"
    return f"grown {', '.join(parts)}: {counts}" if parts else f"not grown (every size as before): {counts}"
