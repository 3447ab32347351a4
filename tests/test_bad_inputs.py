"""Every bad value is a clear error: exit code 2, one `error:` line naming the culprit, no traceback, nothing lost.

Each case is one line of CASES: a command (`pretrain.py ...`, `gpt VERB ...` for `python -m gpt VERB ...`),
then the strings its error line must hold, the key or flag and the value or file at fault. Every command
runs in a fresh folder holding the inputs of `write_inputs` (bad configs, model files, token folders,
labelled data, prompts); `assert_clear_error` checks the exit code, that the last line of stderr is the
error (ours, `error: ...`, or argparse's, `prog: error: argument ...`) and names each culprit, that no
traceback was printed, and that the folder is byte for byte as it was: no input overwritten, no run
folder left behind.

The table runs in this process, through the same `run_cli(main)` the command line runs, so a case costs
milliseconds rather than the seconds a fresh interpreter spends importing torch. SUBPROCESS_CASES runs one
case per entry point as a real `python` process: the proof that no traceback reaches the terminal.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpt.__main__ import main as gpt_main
from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import run_cli
from gpt.model import GPT

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("pretrain.py", "finetune_classifier.py", "finetune_instruct.py")

# ----------------------------------------------------------------------------
# Running a command and judging its error
# ----------------------------------------------------------------------------


def command(line: str, checkpoint: Path) -> list[str]:
    """"gpt generate --model {ckpt}" -> ["python", "-m", "gpt", "generate", "--model", "/.../model.pt"]."""
    words = [word.replace("{ckpt}", str(checkpoint)) for word in shlex.split(line)]
    return ["python", *words] if words[0] in SCRIPTS else ["python", "-m", *words]


def _entry_point(cmd: list[str]) -> Callable[[], int | None]:
    """What `cmd` runs, as a function of no arguments: a script's `main(argv)` or `python -m gpt`'s."""
    if cmd[1:3] == ["-m", "gpt"]:
        return lambda: gpt_main(cmd[3:])
    script = importlib.import_module(Path(cmd[1]).stem)
    return lambda: script.main(cmd[2:])


def run_command(cmd: list[str], cwd: Path, in_process: bool = True) -> tuple[int, str]:
    """(exit code, stderr) of `cmd` (["python", "-m", "gpt", ...] or ["python", "SCRIPT.py", ...]) run in `cwd`.

    In process, the command's main function runs under `run_cli` as on the command line; an exception
    that escapes it is printed as the traceback a terminal would show, with exit code 1.
    """
    if not in_process:
        argv = [sys.executable, *(str(REPO / word) if word in SCRIPTS else word for word in cmd[1:])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr
    stderr = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        try:
            run_cli(_entry_point(cmd))
        except SystemExit as exited:
            code = exited.code
        except Exception:
            traceback.print_exc(file=stderr)
            code = 1
    return code, stderr.getvalue()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def assert_clear_error(cmd: list[str], *culprits: str, cwd: Path, in_process: bool = True) -> str:
    """Run `cmd` in `cwd` and assert a clear error: exit code 2, no traceback, a last stderr line that is the
    error (`error: ...` or argparse's `prog: error: ...`) and names every culprit, and `cwd` unchanged.
    Returns that line."""
    before = snapshot(cwd)
    code, stderr = run_command(cmd, cwd, in_process)
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit code {code}, stderr:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    assert last.startswith("error: ") or re.match(r"\S.*: error: ", last), f"not an error line: {last!r}"
    for culprit in culprits:
        assert culprit in last, f"{culprit!r} is not named in {last!r}"
    assert snapshot(cwd) == before, f"{shlex.join(cmd)} changed or left files in {cwd}"
    return last


# ----------------------------------------------------------------------------
# The inputs the cases point at
# ----------------------------------------------------------------------------


def write_token_folder(folder: Path, meta: dict | str | None) -> None:
    """train.bin and val.bin as `prepare` writes them, with `meta` as meta.json (text as is; None: none)."""
    folder.mkdir()
    np.arange(300, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(folder / "val.bin")
    if meta is not None:
        (folder / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def labelled_rows(extra: str) -> str:
    """Ten ham and ten spam lines (TSV), then `extra`."""
    rows = [f"ham\tsee you at lunch {i}" for i in range(10)] + [f"spam\tWIN a free prize {i}" for i in range(10)]
    return "\n".join(rows) + "\n" + extra


@functools.cache
def gguf_with_text_metadata() -> bytes:
    """A GGUF file (llama architecture) whose embedding length is a string."""
    import gguf  # the gguf extra, imported only when a case needs the file

    with tempfile.TemporaryDirectory() as folder:
        writer = gguf.GGUFWriter(Path(folder) / "bad.gguf", "llama")
        writer.add_string("llama.embedding_length", "lots")
        writer.add_uint32("llama.attention.head_count", 2)
        writer.add_tensor("token_embd.weight", np.zeros((10, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return (Path(folder) / "bad.gguf").read_bytes()


def write_inputs(folder: Path) -> None:
    """The files the cases name, relative to the folder they run in."""
    (folder / "a_folder").mkdir()
    (folder / "a_file").write_text("a plain file, not a folder\n")
    (folder / "binary.toml").write_bytes(b"\xff\xfe\x00\x01[train]\n")
    (folder / "not_a_table.toml").write_text("train = 3\n")
    (folder / "nan.toml").write_text("[train]\nlr = nan\n")
    (folder / "text.gguf").write_text("hello, I am not a GGUF file\n")
    (folder / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (folder / "text_metadata.gguf").write_bytes(gguf_with_text_metadata())
    for name, config in (("hf_not_json", "not json {"), ("hf_missing_key", '{"model_type": "gpt2"}'),
                         ("hf_string", '{"model_type": "llama", "vocab_size": 100, "hidden_size": "32", '
                                       '"num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64}')):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(config)
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "train_tokens": 300, "val_tokens": 100}
    write_token_folder(folder / "tokens_big_vocab", {**meta, "tokenizer": "gpt2", "vocab_size": 65536})
    write_token_folder(folder / "tokens_other_tokenizer", {**meta, "tokenizer": "SmolLM2.gguf", "vocab_size": 49152})
    write_token_folder(folder / "tokens_no_meta", None)
    write_token_folder(folder / "tokens_bad_meta", '{"tokenizer": "gpt2", ')
    (folder / "typo.tsv").write_text(labelled_rows("spma\tcall now to claim\n"))  # line 21
    (folder / "case.tsv").write_text(labelled_rows("Ham\tsee you later\nHam\tok mum\n"))  # lines 21 and 22
    (folder / "stray.jsonl").write_text("".join(json.dumps({"text": f"text {i}", "label": ["pos", "neg"][i % 2]}) + "\n"
                                                for i in range(20)) + '{"text": "who knows", "label": "maybe"}\n')
    (folder / "prompts.jsonl").write_text('{"prompt": "Hello"}\n')
    (folder / "empty_prompt.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": ""}\n')
    (folder / "bad_reference.jsonl").write_text('{"prompt": "Hello", "reference": 42}\n')
    (folder / "text.txt").write_text("It was a bright cold day in April, and the clocks were striking thirteen.\n" * 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2-shaped model (context 64) as our checkpoint file, for the verbs that load one."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=64, d_model=32, n_layer=1, n_head=2))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, tokenizer="gpt2", step=0)
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    write_inputs(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------

def case(line: str, *culprits: str, marks: pytest.MarkDecorator | tuple = ()) -> Any:
    """One row of a table: the command line, and the strings its error line must name."""
    return pytest.param(line, culprits, id=line, marks=marks)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")

CASES = [
    # pretrain.py: config values, config files, token folders
    case("pretrain.py --train.lr nan", "train.lr", "nan"),
    case("pretrain.py --train.lr inf", "train.lr", "inf"),
    case("pretrain.py --train.min_lr -inf", "train.min_lr", "-inf"),
    case("pretrain.py --train.beta1 1.5", "train.beta1", "1.5"),
    case("pretrain.py --train.beta2 1", "train.beta2", "1.0"),
    case("pretrain.py --train.eps -1", "train.eps", "-1"),
    case("pretrain.py --train.weight_decay nan", "train.weight_decay", "nan"),
    case("pretrain.py --train.device cuda", "train.device", "'cuda'", "available here: cpu", marks=NO_CUDA),
    case("pretrain.py --train.device cuda:99", "train.device", "'cuda:99'"),
    case("pretrain.py --train.device mps", "train.device", "'mps'", marks=NO_MPS),
    case("pretrain.py --train.device banana", "train.device", "'banana'"),
    case("pretrain.py --train.seed -1", "train.seed", "-1"),
    case("pretrain.py --train.seed 4294967296", "train.seed", "4294967296"),
    case("pretrain.py --config a_folder", "a_folder", "folder"),
    case("pretrain.py --config binary.toml", "binary.toml", "UTF-8"),
    case("pretrain.py --config not_a_table.toml", "train", "int 3"),
    case("pretrain.py --config nan.toml", "train.lr", "nan"),
    case("pretrain.py --model.norm_eps nan", "model.norm_eps", "nan"),
    case("pretrain.py --model.rope_theta 0", "model.rope_theta", "0"),
    case("pretrain.py --model.dropout inf", "model.dropout", "inf"),
    case("pretrain.py --data.val_fraction nan", "data.val_fraction", "nan"),
    case("pretrain.py --sample.max_new_tokens -3", "sample.max_new_tokens", "-3"),
    case("pretrain.py --sample.prompt ''", "sample.prompt", "empty"),
    case("pretrain.py --data.path tokens_big_vocab", "tokens_big_vocab/meta.json", "vocab_size 65,536", "50,257"),
    case("pretrain.py --data.path tokens_other_tokenizer", "tokens_other_tokenizer/meta.json", "'SmolLM2.gguf'"),
    case("pretrain.py --data.path tokens_no_meta", "tokens_no_meta/meta.json", "missing"),
    case("pretrain.py --data.path tokens_bad_meta", "tokens_bad_meta/meta.json", "not readable JSON"),
    # finetune_classifier.py: labels that look like mistakes, and its config sections
    case("finetune_classifier.py --data.path typo.tsv", "typo.tsv", "'spma'", "line 21", "data.min_label_count"),
    case("finetune_classifier.py --data.path case.tsv", "case.tsv", "'Ham'", "'ham'", "line 21", "line 22"),
    case("finetune_classifier.py --data.path stray.jsonl", "stray.jsonl", "'maybe'", "line 21"),
    case("finetune_classifier.py --data.min_label_count 0", "data.min_label_count", "0"),
    case("finetune_classifier.py --data.seed -1", "data.seed", "-1"),
    case("finetune_classifier.py --data.val_fraction nan", "data.val_fraction", "nan"),
    case("finetune_classifier.py --lora.alpha nan", "lora.alpha", "nan"),
    case("finetune_classifier.py --lora.rank 0", "lora.rank", "0"),
    case("finetune_classifier.py --train.beta1 -0.5", "train.beta1", "-0.5"),
    case("finetune_classifier.py --train.device cuda:99", "train.device", "'cuda:99'"),
    case("finetune_classifier.py --config a_folder", "a_folder"),
    # finetune_instruct.py (every case stops before its default model is loaded)
    case("finetune_instruct.py --data.val_fraction 1.5", "data.val_fraction", "1.5"),
    case("finetune_instruct.py --data.test_fraction nan", "data.test_fraction", "nan"),
    case("finetune_instruct.py --data.max_new_tokens 0", "data.max_new_tokens", "0"),
    case("finetune_instruct.py --train.eps 0", "train.eps", "0"),
    case("finetune_instruct.py --lora.dropout nan", "lora.dropout", "nan"),
    case("finetune_instruct.py --train.device banana", "train.device", "'banana'"),
    # generate and chat: sampling values, prompts, devices, model files
    case("gpt generate --model {ckpt} --max-new-tokens -5", "--max-new-tokens", "-5"),
    case("gpt generate --model {ckpt} --max-new-tokens 0", "--max-new-tokens", "0"),
    case("gpt generate --model {ckpt} --max-new-tokens 64", "--max-new-tokens 64", "64-token context"),
    case("gpt generate --model {ckpt} --temperature -1", "--temperature", "-1"),
    case("gpt generate --model {ckpt} --temperature nan", "--temperature", "nan"),
    case("gpt generate --model {ckpt} --top-p 0", "--top-p", "0"),
    case("gpt generate --model {ckpt} --top-p 1.5", "--top-p", "1.5"),
    case("gpt generate --model {ckpt} --top-p nan", "--top-p", "nan"),
    case("gpt generate --model {ckpt} --top-k -1", "--top-k", "-1"),
    case("gpt generate --model {ckpt} --prompt ''", "--prompt", "empty"),
    case("gpt generate --model {ckpt} --device cuda:99", "--device", "'cuda:99'"),
    case("gpt generate --model {ckpt} --device banana", "--device", "'banana'"),
    case("gpt generate --model {ckpt} --seed -1", "--seed", "-1"),
    case("gpt generate --model text.gguf", "text.gguf", "not a GGUF file"),
    case("gpt generate --model truncated.gguf", "truncated.gguf", "cannot read this GGUF file"),
    case("gpt generate --model text_metadata.gguf", "text_metadata.gguf", "llama.embedding_length", "'lots'"),
    case("gpt generate --model hf_not_json", "hf_not_json/config.json", "not valid JSON"),
    case("gpt generate --model hf_missing_key", "hf_missing_key/config.json", "'vocab_size'"),
    case("gpt generate --model hf_string", "hf_string/config.json", "hidden_size", '"32"'),
    case("gpt chat --model {ckpt} --temperature inf", "--temperature", "inf"),
    case("gpt chat --model {ckpt} --top-k x", "--top-k", "'x'"),
    case("gpt chat --model {ckpt} --max-new-tokens -1", "--max-new-tokens", "-1"),
    # evaluate: windows, batches, output and input files
    case("gpt evaluate --model {ckpt} --prompts prompts.jsonl --max-new-tokens -1", "--max-new-tokens", "-1"),
    case("gpt evaluate --model {ckpt} --text text.txt --stride -1", "--stride", "-1"),
    case("gpt evaluate --model {ckpt} --text text.txt --stride 0", "--stride", "0"),
    case("gpt evaluate --model {ckpt} --text text.txt --batch-size 0", "--batch-size", "0"),
    case("gpt evaluate --model {ckpt} --text text.txt --window 1", "--window", "1"),
    case("gpt evaluate --model {ckpt} --text text.txt --window 100000", "--window 100000", "context length (64)"),
    case("gpt evaluate --model {ckpt} --text text.txt --window 16 --stride 32", "--stride 32", "--window 16"),
    case("gpt evaluate --model {ckpt} --text text.txt --stride 100", "--stride 100", "window (64 tokens)"),
    case("gpt evaluate --model {ckpt} --prompts prompts.jsonl --out a_folder", "--out", "a_folder"),
    case("gpt evaluate --model {ckpt} --prompts prompts.jsonl --out a_file/responses.jsonl", "--out", "a_file"),
    case("gpt evaluate --model {ckpt} --prompts prompts.jsonl --out prompts.jsonl", "--out prompts.jsonl", "input"),
    case("gpt evaluate --model {ckpt} --text missing.txt", "--text", "missing.txt"),
    case("gpt evaluate --model {ckpt} --prompts a_folder", "--prompts", "a_folder"),
    case("gpt evaluate --model {ckpt} --prompts empty_prompt.jsonl", "empty_prompt.jsonl, line 2", "'prompt'"),
    case("gpt evaluate --model {ckpt} --prompts bad_reference.jsonl", "bad_reference.jsonl, line 1", "'reference'",
         "42"),
    case("gpt evaluate --model {ckpt} --text text.txt --device cuda:99", "--device", "'cuda:99'"),
    # prepare, fetch, convert
    case("gpt prepare text.txt --out a_file", "--out", "a_file"),
    case("gpt prepare text.txt --out a_file/tokens", "--out", "a_file"),
    case("gpt prepare text.txt --out tokens --workers 0", "--workers", "0"),
    case("gpt prepare text.txt --out tokens --val-fraction 1", "--val-fraction", "1"),
    case("gpt prepare text.txt --out tokens --val-fraction nan", "--val-fraction", "nan"),
    case("gpt prepare text.txt --out tokens --seed -1", "--seed", "-1"),
    case("gpt fetch smollm2-135m-instruct --cache-dir a_file", "--cache-dir", "a_file"),
    case("gpt fetch gpt-5", "'gpt-5'"),
    case("gpt convert text.gguf --out exported", "text.gguf", "not a GGUF file"),
    case("gpt convert hf_not_json --out exported", "hf_not_json/config.json", "not valid JSON"),
    # bench: every argument, --out included, is checked before anything is measured
    case("gpt bench --out a_folder", "--out", "a_folder"),
    case("gpt bench --out a_file/bench.json", "--out", "a_file"),
    case("gpt bench --rounds 0", "--rounds", "0"),
    case("gpt bench --threads -1", "--threads", "-1"),
    case("gpt bench --new-tokens -4", "--new-tokens", "-4"),
    case("gpt bench --device cuda:99", "--device", "'cuda:99'"),
    case("gpt bench --gen-batch-sizes 1,0", "--gen-batch-sizes", "'1,0'"),
    # classify
    case("gpt classify --checkpoint {ckpt} --batch-size 0 hello", "--batch-size", "0"),
    case("gpt classify --checkpoint {ckpt} --device cuda:99 hello", "--device", "'cuda:99'"),
    case("gpt classify --checkpoint {ckpt} --file a_folder", "--file", "a_folder"),
    # serve: every flag is checked before the server starts listening
    case("gpt serve --checkpoint {ckpt} --port 70000", "--port", "70000"),
    case("gpt serve --checkpoint {ckpt} --port http", "--port", "'http'"),
    case("gpt serve --checkpoint {ckpt} --max-batch 0", "--max-batch", "0"),
    case("gpt serve --checkpoint {ckpt} --max-queue -1", "--max-queue", "-1"),
    case("gpt serve --checkpoint {ckpt} --max-tokens-limit 0", "--max-tokens-limit", "0"),
    case("gpt serve --checkpoint {ckpt} --dtype float8", "--dtype", "'float8'"),
    case("gpt serve --checkpoint {ckpt} --device cuda:99", "--device", "'cuda:99'"),
]


@pytest.mark.parametrize("line, culprits", CASES)
def test_bad_input_is_a_clear_error(line, culprits, inputs, checkpoint):
    assert_clear_error(command(line, checkpoint), *culprits, cwd=inputs)


SUBPROCESS_CASES = [
    case("pretrain.py --train.lr nan", "train.lr", "nan"),
    case("pretrain.py --data.path tokens_big_vocab", "tokens_big_vocab/meta.json", "vocab_size 65,536"),
    case("finetune_classifier.py --data.path typo.tsv", "typo.tsv", "'spma'", "line 21"),
    case("finetune_instruct.py --config binary.toml", "binary.toml", "UTF-8"),
    case("gpt generate --model {ckpt} --top-p 0", "--top-p", "0"),
    case("gpt evaluate --model {ckpt} --text text.txt --window 100000", "--window 100000", "context length (64)"),
    case("gpt convert text.gguf --out exported", "text.gguf", "not a GGUF file"),
    case("gpt bench --out a_folder", "--out", "a_folder"),
]


@pytest.mark.parametrize("line, culprits", SUBPROCESS_CASES)
def test_bad_input_is_a_clear_error_on_the_terminal(line, culprits, inputs, checkpoint):
    assert_clear_error(command(line, checkpoint), *culprits, cwd=inputs, in_process=False)


def test_the_table_covers_every_script_and_verb():
    lines = [c.values[0] for c in CASES]
    first_words = {line.split()[1] if line.startswith("gpt ") else line.split()[0] for line in lines}
    assert first_words >= {*SCRIPTS, "generate", "chat", "evaluate", "prepare", "convert", "fetch", "bench",
                           "classify"}
    assert len(lines) >= 60
