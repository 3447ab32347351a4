"""gpt: a from-scratch GPT in pure PyTorch.

The public API, in the order a model's life goes::

    cfg = gpt.ModelConfig.preset("gpt2-124m")
    model = gpt.GPT(cfg)
    tok = gpt.get_tokenizer("gpt2")
    out = gpt.generate(model, ids, max_new_tokens=50)
"""
