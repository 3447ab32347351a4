"""Import and export of weights: Hugging Face GPT-2 and Llama folders, GGUF files, our checkpoints.

    model = load_pretrained("path/to/hf-folder")        # GPT2LMHeadModel or LlamaForCausalLM
    model = load_pretrained("model.gguf")               # llama or gpt2 architecture, any quantization gguf reads
    model = load_pretrained("runs/pretrain-.../")       # our checkpoint file or run folder
    model = load_pretrained("smollm2-135m-instruct")    # a known model, fetched once into ~/.cache/gpt
    save_pretrained(model, "out/")                      # config.json + model.safetensors for transformers

`python -m gpt convert SRC --out DIR` does both in one go (see `convert.py`);
`--to gguf --type q8_0 --out model.gguf` writes a GGUF file for llama.cpp instead.

Modules: `load.py` tells the kinds of source apart, `assemble.py` fills a
meta-device model tensor by tensor, `hf.py` reads Hugging Face folders and
`hf_export.py` writes them, `gguf.py` reads GGUF files and `gguf_export.py`
writes them (`modelfile.py`: the Ollama Modelfile beside one), `tokenizer_files.py`
writes Hugging Face tokenizer files, `convert.py` is the command line.
"""

from __future__ import annotations

from .convert import convert_cli
from .hf_export import save_pretrained
from .load import LoadedModel, is_preset_name, load_model_and_tokenizer, load_pretrained, source_kind

__all__ = ["load_pretrained", "save_pretrained", "source_kind", "convert_cli", "load_model_and_tokenizer",
           "LoadedModel", "is_preset_name"]
