"""Fill a model with foreign weights one tensor at a time, never holding two copies.

Every importer (Hugging Face folders, GGUF files) works the same way:

1. build the `GPT` on the meta device: parameters have shapes but no memory;
2. read the source tensor by tensor, convert each to our layout and `place` it,
   which swaps the meta parameter for a real one (checking the shape first);
3. `finish`: fill the tensors a format may leave out (zero biases), complain
   about any still missing, re-tie the LM head, rebuild the RoPE tables.

Peak memory is then about one copy of the weights plus the tensor in flight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import UserError
from ..model import GPT


class ModelAssembler:
    """A meta-device `GPT` being filled with real tensors; `source` names the file in error messages."""

    def __init__(self, config: ModelConfig, source: str, dtype: torch.dtype = torch.float32) -> None:
        self.source = source
        self.dtype = dtype
        with torch.device("meta"):
            self.model = GPT(config)
        # named_parameters() lists a shared Parameter once, so a tied lm_head.weight is not expected here.
        self.expected_shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        self.filled: set[str] = set()

    def place(self, name: str, tensor: torch.Tensor, source_name: str) -> None:
        """Put `tensor` in as parameter `name` (ours), converted to the model dtype.

        `source_name` is the tensor's name in the file, used in error messages.
        """
        if name not in self.expected_shapes:
            raise UserError(f"{self.source}: tensor {source_name} has no place in this model (it would be {name})")
        if tuple(tensor.shape) != self.expected_shapes[name]:
            raise UserError(
                f"{self.source}: tensor {source_name} has shape {tuple(tensor.shape)}, "
                f"but the config asks for {self.expected_shapes[name]}"
            )
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        setattr(module, leaf, nn.Parameter(tensor.to(self.dtype).contiguous()))
        self.filled.add(name)

    def finish(self, zero_if_missing: Iterable[str] = ()) -> GPT:
        """The finished model in eval mode; names in `zero_if_missing` may be absent and become zeros."""
        for name in zero_if_missing:
            if name not in self.filled:
                self.place(name, torch.zeros(self.expected_shapes[name]), f"{name} (zeros)")
        missing = [name for name in self.expected_shapes if name not in self.filled]
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise UserError(f"{self.source}: tensors missing for {shown} (names in our model's terms)")
        model = self.model
        if model.config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        model.reset_rope_tables("cpu")
        return model.eval()
