"""Continued pretraining (`pretrain.py --init.from M`): the model keeps its shape and its own tokenizer.

Runs are tiny (one layer, d_model 32, a few steps) on a slice of Botchan. The figures of
continued.json are checked against computations that do not go through pretrain.py: full
logits and cross-entropy on the validation windows, cut here from the split, and
`text_metrics` on the reference text, for the starting model and for checkpoints/final.pt.
The GGUF model the tests write has its own byte-level tokenizer (byte tokens in reverse
order, a few merges), so its ids are not GPT-2's: data tokenized with GPT-2's would not fit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pretrain
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.cli import generate_cli
from gpt.config import InitConfig, ModelConfig, build_config
from gpt.data import load_text_corpus, pretraining_windows, prepare
from gpt.errors import ConfigError, UserError
from gpt.evaluate import text_metrics
from gpt.gguf_file import import_gguf
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, get_tokenizer
from gpt.weights import load_pretrained
from gpt.weights.gguf_export import TOKEN_CONTROL, TOKEN_NORMAL, MetadataEntry, write_gguf
from gpt.weights.tokenizer_files import char_of_byte

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--train.batch_size", "4", "--train.log_interval", "1", "--train.warmup_steps", "1",
         "--train.dtype", "float32", "--sample.max_new_tokens", "3", "--train.lr", "3e-3"]
SCRATCH = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "64"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d", "e r", "o u", "Ġ s"]
EOT = "<|endoftext|>"


def run(out_dir: Path, corpus: Path, *args: str) -> dict:
    """pretrain.py in this process; its continued.json when it wrote one."""
    assert pretrain.main([*SMALL, "--data.path", str(corpus), "--train.out_dir", str(out_dir), *args]) == 0
    report = out_dir / "continued.json"
    return json.loads(report.read_text()) if report.exists() else {}


def val_losses(out_dir: Path) -> list[float]:
    records = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["split"] == "val"]


def write_tiny_gguf(path: Path) -> Path:
    """A one-layer Llama-family GGUF model whose tokenizer is its own: the 256 byte tokens in reverse order
    after <|endoftext|>, then the merged tokens (smollm pre-tokenizer, so digits split one by one)."""
    gguf = import_gguf()
    tokens = [EOT, *reversed(char_of_byte()), *("".join(m.split()) for m in MERGES)]
    types = [TOKEN_CONTROL] + [TOKEN_NORMAL] * (len(tokens) - 1)
    T = gguf.GGUFValueType
    tokenizer = [MetadataEntry("tokenizer.ggml.model", "gpt2", T.STRING),
                 MetadataEntry("tokenizer.ggml.pre", "smollm", T.STRING),
                 MetadataEntry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
                 MetadataEntry("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
                 MetadataEntry("tokenizer.ggml.merges", MERGES, T.ARRAY, T.STRING),
                 MetadataEntry("tokenizer.ggml.eos_token_id", 0, T.UINT32)]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=len(tokens), context_length=64, d_model=32, n_layer=1, n_head=2, n_kv_head=1,
                            d_ff=64, norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False))
    write_gguf(model, path, "f32", tokenizer, "tiny-llama")
    return path


def validation_reference(model: GPT, tokenizer: Tokenizer, corpus: Path, window: int) -> dict[str, float]:
    """Loss, perplexity and bits per byte of every full window of the validation split, from full logits."""
    _, val, _ = load_text_corpus(corpus, tokenizer, 0.1)
    loss_sum, tokens, scored_bytes = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(val) - window, window):
            chunk = torch.as_tensor(val[start:start + window + 1], dtype=torch.long)
            logits = model(chunk[None, :-1])[0]  # (T, V)
            loss_sum += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
            tokens += window
            scored_bytes += len(tokenizer.decode_bytes(chunk[1:].tolist()))
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss_sum / (math.log(2) * scored_bytes)}


def assert_figures(recorded: dict, expected: dict, rel: float = 1e-5) -> None:
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert math.isclose(recorded[key], expected[key], rel_tol=rel), (key, recorded[key], expected[key])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Another stretch of Botchan, what continued training should not forget."""
    path = tmp_path_factory.mktemp("reference") / "reference.txt"
    path.write_text((REPO / "data" / "botchan.txt").read_text(encoding="utf-8-sig")[60_000:62_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, corpus) -> Path:
    """A GPT-2-family model trained from scratch for 4 steps, evaluated at the start and the end only."""
    out_dir = tmp_path_factory.mktemp("scratch") / "run"
    run(out_dir, corpus, *SCRATCH, "--train.max_steps", "4", "--train.eval_interval", "4", "--train.eval_batches", "2")
    return out_dir


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, corpus, tiny_gguf, reference) -> tuple[Path, dict]:
    """The GGUF model continued for 3 steps, in windows of 32 of its 64 tokens; the evaluation sees every
    validation window (16 batches of 4 hold them all)."""
    out_dir = tmp_path_factory.mktemp("continued") / "run"
    report = run(out_dir, corpus, "--init.from", str(tiny_gguf), "--data.window", "32", "--train.max_steps", "3",
                 "--train.eval_interval", "3", "--train.eval_batches", "16", "--eval.reference", str(reference))
    return out_dir, report


def test_a_gguf_model_trains_on_its_own_tokens_and_its_checkpoints_name_its_tokenizer(gguf_run, tiny_gguf, corpus,
                                                                                     reference, capsys):
    out_dir, report = gguf_run
    tokenizer = get_tokenizer(str(tiny_gguf))
    assert tokenizer.encode("the 42") != get_tokenizer("gpt2").encode("the 42")
    for name in ("latest", "best", "final"):
        assert load_checkpoint(out_dir / "checkpoints" / f"{name}.pt")["tokenizer"] == str(tiny_gguf.resolve())
    assert json.loads((out_dir / "config.json").read_text())["model"]["norm"] == "rmsnorm"  # the GGUF's shape
    assert report["window"] == 32 and report["steps"] == 3

    start, final = load_pretrained(tiny_gguf), load_pretrained(out_dir / "checkpoints" / "final.pt")
    for figures, model in ((report["before"], start), (report["after"], final)):
        assert_figures(figures["validation"], validation_reference(model, tokenizer, corpus, 32))
        expected = text_metrics(model, tokenizer, reference.read_text(encoding="utf-8"), 32, 32, 4)
        assert_figures(figures["reference"], expected, rel=1e-6)
    assert report["after"]["validation"]["loss"] < report["before"]["validation"]["loss"]
    assert val_losses(out_dir)[0] == pytest.approx(report["before"]["validation"]["loss"], rel=1e-6)

    # The generate verb loads the run folder with the GGUF's tokenizer: its greedy text is this loop's.
    ids = tokenizer.encode("the")
    with torch.no_grad():
        for _ in range(6):
            next_id = int(final(torch.tensor([ids]))[0, -1].argmax())
            if next_id == tokenizer.eot_id:
                break
            ids.append(next_id)
    capsys.readouterr()
    assert generate_cli(["--model", str(out_dir), "--prompt", "the", "--max-new-tokens", "6",
                         "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(ids) + "\n"


def test_a_prepared_token_folder_must_come_from_the_models_tokenizer(tmp_path, gguf_run, tiny_gguf, corpus):
    prepare(corpus, tmp_path / "tokens", val_fraction=0.1, workers=1, tokenizer=str(tiny_gguf))
    out_dir = tmp_path / "run"
    run(out_dir, tmp_path / "tokens", "--init.from", str(tiny_gguf), "--data.window", "32", "--train.max_steps", "1",
        "--train.eval_batches", "16")
    _, report = gguf_run  # the same validation tokens as from the text, so the same loss
    assert val_losses(out_dir)[0] == pytest.approx(report["before"]["validation"]["loss"], rel=1e-6)

    train_set, _ = pretraining_windows(tmp_path / "tokens", 32, get_tokenizer(str(tiny_gguf)), 0.1, train_tokens=500)
    assert len(train_set) == (500 - 33) // 32 + 1
    prepare(corpus, tmp_path / "gpt2-tokens", val_fraction=0.1, workers=1)
    with pytest.raises(UserError, match=r"gpt2-tokens/meta.json: the tokens were written by the tokenizer 'gpt2', "
                                        r"but this run uses 'tiny.gguf'"):
        pretrain.main([*SMALL, "--init.from", str(tiny_gguf), "--data.path", str(tmp_path / "gpt2-tokens"),
                       "--train.out_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_lora_on_one_of_our_checkpoints_merges_into_a_plain_final_checkpoint(tmp_path, scratch_run, corpus,
                                                                             reference):
    out_dir = tmp_path / "lora"
    report = run(out_dir, corpus, "--init.from", str(scratch_run), "--train.trainable", "lora", "--lora.rank", "4",
                 "--lora.targets", "q_proj,v_proj", "--train.lr", "1e-2", "--data.window", "32",
                 "--train.max_steps", "3", "--train.eval_interval", "3", "--train.eval_batches", "16",
                 "--eval.reference", str(reference))
    assert report["trainable"] == "lora" and report["tokenizer"] == "gpt2"
    start = load_pretrained(scratch_run)
    final = load_pretrained(out_dir / "checkpoints" / "final.pt")  # a plain GPT: no adapter weights in it
    before, after = start.state_dict(), final.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"blocks.0.attn.q_proj.weight", "blocks.0.attn.v_proj.weight"}
    from_folder = load_pretrained(out_dir).state_dict()  # the run folder stands for final.pt, not best.pt's adapters
    assert from_folder.keys() == after.keys() and all(torch.equal(from_folder[n], after[n]) for n in after)

    gpt2 = get_tokenizer("gpt2")
    for figures, model in ((report["before"], start), (report["after"], final)):
        assert_figures(figures["validation"], validation_reference(model, gpt2, corpus, 32))
        expected = text_metrics(model, gpt2, reference.read_text(encoding="utf-8"), 32, 32, 4)
        assert_figures(figures["reference"], expected, rel=1e-6)


def test_resuming_with_another_architecture_or_tokenizer_names_both(tmp_path, scratch_run, corpus, tiny_gguf):
    shutil.copytree(scratch_run, tmp_path / "run")
    with pytest.raises(UserError, match=r"checkpoint vs this run: n_layer 1 vs 2\)"):
        run(tmp_path / "run", corpus, *SCRATCH, "--model.n_layer", "2", "--train.max_steps", "6",
            "--train.resume", "auto")

    same_shape_other_tokenizer = tmp_path / "other.pt"
    config = ModelConfig.from_dict(load_checkpoint(scratch_run)["model_config"])
    save_checkpoint(same_shape_other_tokenizer, GPT(config), tokenizer=str(tiny_gguf.resolve()))
    with pytest.raises(UserError, match=rf"tokenizer 'gpt2' vs '{tiny_gguf.resolve()}'"):
        run(tmp_path / "run", corpus, "--init.from", str(same_shape_other_tokenizer), "--train.max_steps", "6",
            "--train.resume", "auto")


def test_a_grown_model_starts_where_the_small_one_stopped_and_trains_on(tmp_path, scratch_run, corpus):
    out_dir = tmp_path / "grown"
    report = run(out_dir, corpus, "--init.from", str(scratch_run), "--init.grow", "n_layer=2,d_model=64",
                 "--train.max_steps", "3", "--train.eval_interval", "3", "--train.eval_batches", "2")
    grown = load_checkpoint(out_dir / "checkpoints" / "final.pt")["model_config"]
    assert (grown["n_layer"], grown["d_model"], grown["n_head"]) == (2, 64, 4)
    assert report["grow"] == "n_layer=2,d_model=64" and report["window"] == 64
    first, *_, last = val_losses(out_dir)
    assert abs(first - val_losses(scratch_run)[-1]) < 1e-4  # the same validation batches, the same function
    assert last < first


@pytest.mark.parametrize("args, message", [
    (["--init.from", "GGUF", "--model.n_layer", "2"], "--model.n_layer: model.* settings apply to a model from "
                                                      "scratch only"),
    (["--init.from", "GGUF", "--data.window", "65"], "data.window: 65 exceeds the model's context length (64)"),
    ([*SCRATCH, "--init.grow", "n_layer=2"], "init.grow: 'n_layer=2' grows a trained model; give it with init.from"),
    (["--init.from", "GGUF", "--init.grow", "n_layer=0"], "init.grow: n_layer must be positive, got 0"),
    ([*SCRATCH, "--data.train_tokens", "10000000"], "data.train_tokens: 10,000,000 is more than the training split "
                                                    "holds"),
    ([*SCRATCH, "--eval.reference", "no-such-file.txt"], "eval.reference: cannot read no-such-file.txt"),
])
def test_bad_settings_stop_before_the_run_folder_exists(tmp_path, corpus, tiny_gguf, args, message):
    args = [str(tiny_gguf) if arg == "GGUF" else arg for arg in args]
    with pytest.raises(UserError) as error:
        pretrain.main([*SMALL, "--data.path", str(corpus), "--train.out_dir", str(tmp_path / "run"), *args])
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_init_from_is_written_from_in_toml_json_and_on_the_command_line():
    config = build_config({"init": InitConfig}, {"init": {"from": "runs/small"}}, {"init": {"grow": "n_layer=2"}})
    assert config["init"].from_ == "runs/small"
    assert config["init"].to_dict() == {"from": "runs/small", "grow": "n_layer=2"}
    assert build_config({"init": InitConfig}, {}, {"init": {"from": "x.gguf"}})["init"].from_ == "x.gguf"
    with pytest.raises(ConfigError, match="init.from_: unknown field; known fields: from, grow"):
        build_config({"init": InitConfig}, {}, {"init": {"from_": "x"}})
    assert any(line.startswith("  --init.from str") for line in InitConfig.field_help())


def test_train_tokens_keeps_the_start_of_the_training_split_and_the_whole_validation_split(corpus):
    gpt2 = get_tokenizer("gpt2")
    full_train, full_val = pretraining_windows(corpus, 32, gpt2, 0.1)
    first, val = pretraining_windows(corpus, 32, gpt2, 0.1, train_tokens=1000)
    assert len(first) == (1000 - 33) // 32 + 1 < len(full_train)
    assert all(torch.equal(first[i][0], full_train[i][0]) for i in range(len(first)))
    assert torch.equal(torch.as_tensor(val.tokens), torch.as_tensor(full_val.tokens))
