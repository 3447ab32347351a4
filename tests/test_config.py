"""Config: presets, validation messages that name the field, TOML files and --section.field overrides."""

import dataclasses
import json
import re
import typing

import pytest

from gpt.config import (
    DataConfig, LoRAConfig, ModelConfig, TrainConfig, build_config, parse_overrides, read_toml, save_config_json,
)
from gpt.errors import ConfigError

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def test_presets_resolve_derived_fields():
    gpt2 = ModelConfig.preset("gpt2-124m")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_kv_head, gpt2.d_ff, gpt2.head_dim) == (12, 12, 12, 3072, 64)
    smol = ModelConfig.preset("smollm2-135m")
    assert (smol.n_kv_head, smol.d_ff, smol.rope_theta, smol.norm, smol.mlp) == (3, 1536, 100000.0, "rmsnorm", "swiglu")
    # derived fields follow an overridden width instead of keeping the preset's value
    assert ModelConfig.preset("tiny", d_model=384, n_head=6).d_ff == 4 * 384


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=100, n_head=3), r"model\.n_head: d_model \(100\) must be divisible by n_head \(3\)"),
        (dict(n_head=12, n_kv_head=5), r"model\.n_kv_head: n_head \(12\) must be divisible by n_kv_head \(5\)"),
        (dict(n_layer="four"), r"model\.n_layer: expected int, got str 'four'"),
        (dict(bias=1), r"model\.bias: expected bool, got int 1"),
        (dict(dropout="0.1"), r"model\.dropout: expected float"),
        (dict(norm="batchnorm"), r"model\.norm: must be one of layernorm, rmsnorm; got 'batchnorm'"),
        (dict(n_layers=4), r"model\.n_layers: unknown field"),
        (dict(vocab_size=0), r"model\.vocab_size: must be positive"),
    ],
)
def test_model_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(fields)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*gpt2-124m"):
        ModelConfig.preset("gpt5")


def test_int_is_accepted_for_float_fields():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_toml_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layer = 3\n\n[train]\nlr = 1e-3\nmax_steps = 50\n')
    config = build_config(SECTIONS, read_toml(path),
                          parse_overrides(["--model.n_layer", "2", "--train.compile=true", "--data.stride", "64"]))
    assert config["model"].n_layer == 2  # command line beats the file
    assert config["model"].d_model == 256  # from the preset
    assert config["train"].lr == 1e-3 and config["train"].max_steps == 50  # from the file
    assert config["train"].compile is True
    assert config["data"].stride == 64
    assert config["train"].batch_size == TrainConfig().batch_size  # untouched default


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.max_step", "5"], r"train\.max_step: unknown field"),
        (["--optim.lr", "5"], r"optim: unknown config section"),
        (["--train.max_steps", "many"], r"train\.max_steps: expected int, got 'many'"),
        (["--train.compile", "maybe"], r"train\.compile: expected true or false"),
        (["--train.lr"], r"train\.lr: missing a value"),
        (["train.lr", "1"], r"unrecognized argument 'train\.lr'"),
    ],
)
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        build_config(SECTIONS, {}, parse_overrides(args))


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        read_toml(path)
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        read_toml(tmp_path / "missing.toml")


def test_a_config_file_that_is_not_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a TOML config file"):
        read_toml(tmp_path)
    binary = tmp_path / "model.toml"
    binary.write_bytes(b"PK\x03\x04\xff\x00")
    with pytest.raises(ConfigError, match=r"model\.toml: not a UTF-8 text file \(byte 4: 0xff\)"):
        read_toml(binary)


@pytest.mark.parametrize("toml", [{"train": 3}, {"train": "fast"}, {"model": [1, 2]}])
def test_a_section_that_is_not_a_table_is_named(toml):
    name = next(iter(toml))
    with pytest.raises(ConfigError, match=rf"{name}: expected a table \[{name}\], got "):
        build_config(SECTIONS, toml)


FLOAT_FIELDS = [(cls, f.name) for cls in (ModelConfig, TrainConfig, DataConfig, LoRAConfig)
                for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is float]


@pytest.mark.parametrize("cls, name", FLOAT_FIELDS, ids=[f"{c.section_name}.{n}" for c, n in FLOAT_FIELDS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_no_float_field_takes_nan_or_inf(cls, name, value):
    with pytest.raises(ConfigError, match=rf"^{cls.section_name}\.{name}: must be a finite number, got {value}$"):
        cls.from_dict({name: value})


@pytest.mark.parametrize("fields, message", [
    ({"beta1": 1.5}, "train.beta1: must be in [0, 1), got 1.5"),
    ({"beta1": -0.1}, "train.beta1: must be in [0, 1), got -0.1"),
    ({"beta2": 1}, "train.beta2: must be in [0, 1), got 1.0"),
    ({"eps": -1}, "train.eps: must be positive, got -1.0"),
    ({"eps": 0}, "train.eps: must be positive, got 0.0"),
    ({"seed": -1}, "train.seed: must be in [0, 2**32), got -1"),
    ({"seed": 2**32}, "train.seed: must be in [0, 2**32), got 4294967296"),
])
def test_train_config_checks_the_optimizer_and_the_seed(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**fields)
    assert TrainConfig(beta1=0.0, beta2=0.999, eps=1e-12, seed=2**32 - 1).beta2 == 0.999  # the edges that are fine


@pytest.mark.parametrize("cls, fields, message", [
    (ModelConfig, {"norm_eps": 0}, "model.norm_eps: must be positive, got 0.0"),
    (ModelConfig, {"rope_theta": -1}, "model.rope_theta: must be positive, got -1.0"),
    (LoRAConfig, {"rank": 0}, "lora.rank: must be positive, got 0"),
    (LoRAConfig, {"alpha": -2}, "lora.alpha: must be positive, got -2.0"),
])
def test_each_positive_field_is_named_alone(cls, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cls(**fields)


def test_resolved_config_round_trips_through_json(tmp_path):
    config = build_config(SECTIONS, {"model": {"preset": "smollm2-135m"}})
    save_config_json(config, tmp_path / "config.json")
    loaded = json.loads((tmp_path / "config.json").read_text())
    assert ModelConfig.from_dict(loaded["model"]) == config["model"]
    assert TrainConfig.from_dict(loaded["train"]) == config["train"]
