"""configs/char.toml, the character-level first model: it builds through pretrain.py's config builder, a
2-step run of it (shrunk) trains, reports bits per byte as the byte tokenizer implies, and leaves a checkpoint
that loads back with the byte tokenizer and continues the prompt as the run's own sample did."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pretrain
from gpt.data import iterate_eval, pretraining_windows
from gpt.scripts import parse_script_args
from gpt.tokenizer import get_tokenizer
from gpt.weights import load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAR = REPO / "configs" / "char.toml"
EOT = 256  # the byte tokenizer's <|endoftext|>, the one token that is not one byte
SHRUNK = [
    "--config", str(CHAR), "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
    "--model.d_ff", "64", "--model.context_length", "32", "--train.batch_size", "4", "--train.max_steps", "2",
    "--train.warmup_steps", "1", "--train.eval_interval", "2", "--train.eval_batches", "3",
    "--train.log_interval", "1", "--train.dtype", "float32", "--train.curves", "false",
    "--sample.max_new_tokens", "12",
]


def char_config(*overrides: str) -> dict:
    _, config = parse_script_args(["--config", str(CHAR), *overrides], description="", sections=pretrain.SECTIONS,
                                  default_config=pretrain.DEFAULT_CONFIG)
    return config


def test_char_config_builds_a_byte_level_model():
    config = char_config()
    model, data, sample = config["model"], config["data"], config["sample"]
    tokenizer = get_tokenizer(data.tokenizer)
    assert data.tokenizer == "bytes" and model.vocab_size == tokenizer.n_vocab == 257
    assert (REPO / data.path).is_file()
    # The whole sample fits the context: generation stops at the context, so a longer one would be cut short.
    assert len(tokenizer.encode(sample.prompt)) + sample.max_new_tokens <= model.context_length
    assert config["train"].warmup_steps < config["train"].max_steps


@pytest.fixture(scope="module")
def accented_corpus(tmp_path_factory) -> Path:
    """A slice of Botchan with curly quotes and apostrophes and "thé" (3 and 2 bytes in UTF-8), so that bytes
    and characters differ: bits per character would not equal bits per byte here."""
    text = (REPO / "data" / "botchan.txt").read_text(encoding="utf-8-sig")[20_000:32_000]
    text = text.replace('"', "\u201c").replace("'", "\u2019").replace(" the ", " th\u00e9 ")
    assert len(text.encode("utf-8")) > len(text) + 100
    path = tmp_path_factory.mktemp("char") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def short_run(accented_corpus, tmp_path_factory) -> tuple[Path, str]:
    """The run folder of a 2-step run of configs/char.toml, shrunk, and what it printed."""
    out_dir = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pretrain.main([*SHRUNK, "--data.path", str(accented_corpus), "--train.out_dir", str(out_dir)]) == 0
    return out_dir, printed.getvalue()


def last_val_record(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "val"][-1]


def test_bits_per_byte_is_the_loss_in_bits_when_every_target_is_one_byte(short_run, accented_corpus):
    out_dir, _ = short_run
    # The validation windows the run scored (pretrain builds them alike): no <|endoftext|> among the targets.
    config = char_config(*SHRUNK[2:])
    val_set = pretraining_windows(accented_corpus, 32, get_tokenizer("bytes"), config["data"].val_fraction)[1]
    targets = torch.cat([y.flatten() for _, y in iterate_eval(val_set, 4, max_batches=3)])
    assert len(targets) == 3 * 4 * 32 and EOT not in targets.tolist()
    assert (targets > 127).sum() > 0  # the multi-byte characters' bytes are among them
    record = last_val_record(out_dir)
    assert record["step"] == 2
    assert math.isclose(record["bits_per_byte"], record["loss"] / math.log(2), rel_tol=1e-9)


def test_checkpoint_loads_back_with_the_byte_tokenizer(short_run, accented_corpus):
    out_dir, printed = short_run
    loaded = load_model_and_tokenizer(str(out_dir / "checkpoints" / "latest.pt"))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    assert loaded.tokenizer_name == "bytes" and tokenizer.n_vocab == 257 and tokenizer.eot_id == EOT
    assert (model.config.vocab_size, model.config.pos_emb, model.config.mlp) == (257, "rope", "swiglu")

    # Its validation loss, from full logits and plain cross-entropy, is the one the run recorded at step 2.
    val_set = pretraining_windows(accented_corpus, 32, tokenizer, 0.1)[1]
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
                  for x, y in iterate_eval(val_set, 4, max_batches=3)]
    assert math.isclose(sum(losses).item() / (3 * 4 * 32), last_val_record(out_dir)["loss"], rel_tol=1e-5)

    # Greedy decoding by argmax, bytes decoded by Python itself: the sample the run printed after training.
    prompt = char_config()["sample"].prompt
    ids = list(prompt.encode("utf-8"))
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = b"".join(bytes([i]) if i < EOT else b"<|endoftext|>" for i in ids).decode("utf-8", errors="replace")
    line = next(line for line in printed.splitlines() if line.startswith("sample after training:"))
    assert ast.literal_eval(line.split(":", 1)[1].strip()) == expected
