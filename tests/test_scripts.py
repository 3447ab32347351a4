"""gpt.scripts, what the training scripts share: arguments, what trains, the best weights at the end."""

from __future__ import annotations

import pytest
import torch

import finetune_classifier
import finetune_instruct
from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import ConfigError, UserError
from gpt.lora import count_parameters
from gpt.model import GPT
from gpt.scripts import best_weights, load_model, parse_script_args, parse_trainable, set_trainable

LORA = dict(rank=2, alpha=4.0, dropout=0.0, targets=["q_proj"])


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=61, context_length=16, d_model=32, n_layer=2, n_head=4))


def classifier_args(*argv: str):
    return parse_script_args(list(argv), description="d", sections=finetune_classifier.SECTIONS,
                             default_config=finetune_classifier.DEFAULT_CONFIG, model_help="m")


def test_model_argument_takes_a_preset_and_refuses_shape_changes_of_pretrained_models():
    source, config = classifier_args("--model", "tiny", "--model.n_layer", "1")
    assert source == "" and config["model"].n_layer == 1 and config["model"].d_model == 256  # tiny, not the toml's 128
    source, config = classifier_args()
    assert source == "" and config["model"].d_model == 128  # configs/classifier.toml's [model]
    with pytest.raises(UserError, match=r"--model.n_layer: model.\* settings apply to a model from scratch only"):
        classifier_args("--model", "smollm2-135m-instruct", "--model.n_layer", "1")


def test_defaults_config_file_and_overrides(tmp_path):
    """The default --model and config file of the instruct script, a --config file, and an override on top."""
    sections, default = finetune_instruct.SECTIONS, finetune_instruct.DEFAULT_CONFIG

    def parse(*argv: str):
        return parse_script_args(list(argv), description="d", sections=sections, default_config=default,
                                 model_default="smollm2-135m-instruct", model_help="m")

    source, config = parse()
    assert source == "smollm2-135m-instruct" and config["train"].trainable == "lora"
    assert config["data"].template == "chatml"  # configs/instruct.toml, not the dataclass default "model"
    own = tmp_path / "own.toml"
    own.write_text('[train]\nmax_steps = 7\n[data]\ntemplate = "alpaca"\n')
    source, config = parse("--config", str(own), "--model", "tiny", "--train.max_steps", "9")
    assert source == "tiny" and config["train"].max_steps == 9 and config["data"].template == "alpaca"
    with pytest.raises(ConfigError, match="train.trainable"):
        parse("--train.trainable", "head")  # the instruct script trains lora or all


def test_parse_trainable_takes_the_kinds_a_script_allows():
    assert parse_trainable("last:3") == ("last", 3) and parse_trainable("head") == ("head", 0)
    assert parse_trainable("lora", ("lora", "all")) == ("lora", 0)
    for spec, kinds in [("last", None), ("last:0", None), ("last:x", None), ("head:1", None), ("lora:2", None),
                        ("everything", None), ("last:1", ("lora", "all"))]:
        with pytest.raises(ConfigError, match="train.trainable"):
            parse_trainable(spec, *(kinds,) if kinds else ())


def test_set_trainable_on_a_language_model_without_a_separate_head():
    model = tiny_gpt()
    total = sum(p.numel() for p in model.parameters())
    assert set_trainable(model, "all") == "all parameters" and count_parameters(model) == (total, total)
    with pytest.raises(UserError, match="needs a separate head"):
        set_trainable(tiny_gpt(), "last:1")
    lora_model = tiny_gpt()
    description = set_trainable(lora_model, "lora", LORA)
    adapters = 2 * 2 * (32 + 32)  # q_proj (32 -> 32) of two blocks, rank 2: A (2, 32) + B (32, 2)
    assert count_parameters(lora_model) == (adapters, total + adapters)
    assert description == "LoRA adapters (rank 2) on 2 layers"


def test_best_weights_loads_the_best_checkpoint_and_merges_the_adapters(tmp_path):
    """The best checkpoint, saved with adapters in place, comes back into the model and is folded into plain
    weights: the logits equal those of the model when it was saved."""
    model = tiny_gpt(seed=1).eval()
    set_trainable(model, "lora", LORA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)  # a trained adapter
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    save_checkpoint(tmp_path / "checkpoints" / "best.pt", model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # training went on past the best step
    final = best_weights(model, tmp_path, torch.device("cpu"), lora_body=model)
    assert final == tmp_path / "checkpoints" / "final.pt"
    assert not any("lora" in key for key in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_load_model_from_scratch_or_a_source():
    config = ModelConfig(vocab_size=50257, context_length=16, d_model=32, n_layer=1, n_head=4)
    loaded = load_model("", config)
    assert loaded.model.config == config and loaded.tokenizer_name == "gpt2"
    assert load_model("tiny").model.config == ModelConfig.preset("tiny")  # a preset name, random init
    with pytest.raises(UserError, match="no model"):
        load_model("")
