"""gpt: a from-scratch GPT in pure PyTorch.

The public API, in the order a model's life goes::

    cfg = gpt.ModelConfig.preset("gpt2-124m")
    model = gpt.GPT(cfg)                       # model(input_ids) -> logits (B, T, vocab_size)
    tok = gpt.get_tokenizer("gpt2")
    out = gpt.generate(model, ids, max_new_tokens=50, temperature=0.0, eos_id=tok.eot_id)
    opt = gpt.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    model = gpt.load_pretrained(path)          # HF GPT-2 / Llama folder, GGUF file, our checkpoint
    gpt.save_pretrained(model, out_dir)        # a folder transformers loads
"""

from .cache import KVCache
from .config import ModelConfig, TrainConfig
from .generate import generate
from .model import GPT
from .optim import AdamW
from .tokenizer import get_tokenizer
from .weights import load_pretrained, save_pretrained

__all__ = ["ModelConfig", "TrainConfig", "GPT", "KVCache", "get_tokenizer", "generate", "AdamW",
           "load_pretrained", "save_pretrained"]
