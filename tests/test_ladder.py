"""python -m gpt ladder: rungs run as ordinary run folders, grown rungs start where their source ended,
the summary agrees with the rungs' own metrics.jsonl, a second run continues, bad ladder files are clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt.data import BatchLoader
from gpt.errors import ConfigError, UserError
from gpt.ladder import comparison, ladder_cli, write_plot
from gpt.weights import load_pretrained

REPO = Path(__file__).resolve().parents[1]
SHARED = """
[model]
context_length = 32
n_layer = 1
d_model = 32
n_head = 2

[train]
batch_size = 4
eval_batches = 2
eval_interval = 2
log_interval = 1
warmup_steps = 1
lr = 1e-2
dtype = "float32"

[data]
path = "{corpus}"

[sample]
max_new_tokens = 2
"""
RUNGS = """
[[rung]]
name = "a"
train_tokens = 1000
max_steps = 4

[[rung]]
name = "b"
grow = "n_layer=2"
max_steps = 4

[[rung]]
name = "b-scratch"
control_of = "b"
"""


def ladder_file(folder: Path, corpus: Path, rungs: str = RUNGS, shared: str = SHARED) -> Path:
    path = folder / "ladder.toml"
    path.write_text(shared.format(corpus=corpus) + rungs, encoding="utf-8")
    return path


def records(run_folder: Path, split: str) -> list[dict]:
    lines = (run_folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, corpus) -> Path:
    """The three-rung ladder, run once to the end; its folder."""
    folder = tmp_path_factory.mktemp("ladder")
    assert ladder_cli(["--config", str(ladder_file(folder, corpus)), "--out", str(folder / "out")]) == 0
    return folder / "out"


def test_each_rung_is_an_ordinary_run_folder_of_the_planned_model(ladder):
    for name, n_layer in (("a", 1), ("b", 2), ("b-scratch", 2)):
        folder = ladder / name
        for file in ("config.json", "metrics.jsonl", "checkpoints/latest.pt", "checkpoints/best.pt"):
            assert (folder / file).is_file(), f"{folder / file}"
        config = load_pretrained(folder).config
        assert (config.n_layer, config.d_model, config.context_length) == (n_layer, 32, 32)
    assert json.loads((ladder / "b" / "config.json").read_text())["init"]["from"] == str(ladder / "a")
    assert json.loads((ladder / "b-scratch" / "config.json").read_text())["init"]["from"] == ""
    assert records(ladder / "a", "train")[-1]["tokens"] == 4 * 4 * 32


def test_a_grown_rung_starts_at_its_sources_best_validation_loss(ladder):
    source = [r["loss"] for r in records(ladder / "a", "val") if r["step"] > 0]
    grown_start = records(ladder / "b", "val")[0]
    assert grown_start["step"] == 0
    assert grown_start["loss"] == pytest.approx(min(source), abs=1e-4)  # best.pt: its weights, grown without change
    scratch_start = records(ladder / "b-scratch", "val")[0]["loss"]
    assert scratch_start > min(source) + 0.05  # an untrained model is measurably worse: the check can fail


def test_the_summary_holds_the_rungs_own_figures(ladder):
    summary = json.loads((ladder / "ladder.json").read_text())
    rungs = {rung["name"]: rung for rung in summary["rungs"]}
    assert list(rungs) == ["a", "b", "b-scratch"]
    for name, rung in rungs.items():
        val, train = records(ladder / name, "val"), records(ladder / name, "train")
        losses = [r["loss"] for r in val]
        assert rung["steps"] == val[-1]["step"] == train[-1]["step"] == 4
        assert rung["tokens_seen"] == train[-1]["tokens"]
        assert rung["val_loss_step0"] == losses[0]
        assert rung["val_loss_final"] == losses[-1]
        assert rung["val_loss_best"] == min(losses[1:])
        assert [p["loss"] for p in rung["curve"]] == losses
        assert rung["status"] == "finished"
    assert rungs["a"]["train_tokens"] == 1000 and rungs["b"]["train_tokens"] is None
    assert rungs["b"]["chain_tokens_seen"] == rungs["a"]["tokens_seen"] + rungs["b"]["tokens_seen"]
    assert rungs["b"]["chain_steps"] == 8 and rungs["b-scratch"]["chain_steps"] == 4
    assert rungs["b"]["parameters"] == rungs["b-scratch"]["parameters"] == sum(
        p.numel() for p in load_pretrained(ladder / "b").parameters())

    # grown vs scratch, worked out here from the two metrics.jsonl files
    [entry] = summary["comparisons"]
    grown, scratch = records(ladder / "b", "val"), records(ladder / "b-scratch", "val")
    target = scratch[-1]["loss"]
    reached = next((r for r in grown if r["loss"] <= target), None)
    assert entry["control_final_loss"] == target
    assert entry["control_loss_at_grown_steps"] == next(r["loss"] for r in scratch if r["step"] == grown[-1]["step"])
    if reached is None:
        assert entry["grown_reaches_control_final"] is None and "did not reach" in entry["sentence"]
    else:
        assert entry["grown_reaches_control_final"]["step"] == reached["step"]
        assert entry["grown_reaches_control_final"]["chain_tokens_seen"] == (
            records(ladder / "a", "train")[-1]["tokens"] + reached["tokens_seen"])
    markdown = (ladder / "ladder.md").read_text()
    assert all(f"| {name} |" in markdown for name in rungs) and entry["sentence"] in markdown
    assert (ladder / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_ladder_continues_where_it_stopped(tmp_path, corpus, ladder, monkeypatch, capsys):
    """Ctrl-C during rung b stops the ladder with b saved; the next run skips a, finishes b and runs the
    control, ending with the figures of the uninterrupted ladder."""
    path = ladder_file(tmp_path, corpus)
    out = tmp_path / "out"
    original, calls = BatchLoader.next_batch, {"n": 0}

    def next_batch_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # rung a takes 4 batches; b's second step
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(BatchLoader, "next_batch", next_batch_with_interrupt)
        assert ladder_cli(["--config", str(path), "--out", str(out)]) == 128 + signal.SIGINT
    assert records(out / "b", "val")[-1]["step"] == 2 and not (out / "b-scratch").exists()
    partial = {r["name"]: r for r in json.loads((out / "ladder.json").read_text())["rungs"]}
    assert {name: r["status"] for name, r in partial.items()} == {"a": "finished", "b": "unfinished",
                                                                  "b-scratch": "not started"}
    assert (partial["b"]["steps"], partial["b"]["tokens_seen"]) == (2, records(out / "b", "val")[-1]["tokens_seen"])
    assert (partial["b-scratch"]["steps"], partial["b-scratch"]["tokens_seen"]) == (0, 0)

    a_metrics = (out / "a" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    started = time.perf_counter()
    assert ladder_cli(["--config", str(path), "--out", str(out)]) == 0
    seconds = time.perf_counter() - started
    assert "a: finished before" in capsys.readouterr().out
    resumed = {r["name"]: r for r in json.loads((out / "ladder.json").read_text())["rungs"]}
    assert resumed["a"]["wall_seconds"] == partial["a"]["wall_seconds"]  # measured when it ran, kept
    assert 0 < resumed["b"]["wall_seconds"] - partial["b"]["wall_seconds"] < seconds  # both parts of b
    assert (out / "a" / "metrics.jsonl").read_bytes() == a_metrics
    for name in ("b", "b-scratch"):  # the uninterrupted ladder's losses, bit for bit
        assert [r["loss"] for r in records(out / name, "val")] == [r["loss"] for r in records(ladder / name, "val")]

    capsys.readouterr()
    assert ladder_cli(["--config", str(path), "--out", str(out)]) == 0  # all finished: nothing trains
    assert capsys.readouterr().out.count("finished before") == 3

    path.write_text(path.read_text().replace("lr = 1e-2", "lr = 2e-2"))
    with pytest.raises(UserError, match=r"train.lr 0.01 there, 0.02 now"):
        ladder_cli(["--config", str(path), "--out", str(out)])


def test_the_plot_is_skipped_with_a_note_without_matplotlib(ladder, tmp_path, monkeypatch, capsys):
    summary = json.loads((ladder / "ladder.json").read_text())
    for module in ("matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # as if matplotlib were not installed
    assert write_plot(summary, tmp_path / "ladder.png") is None
    assert not (tmp_path / "ladder.png").exists()
    assert "no matplotlib" in capsys.readouterr().err


def curve(*losses: float) -> list[dict]:
    return [{"step": 10 * i, "tokens_seen": 100 * i, "loss": loss, "chain_steps": 50 + 10 * i,
             "chain_tokens_seen": 500 + 100 * i, "chain_train_flops": 1e6 * (5 + i)} for i, loss in enumerate(losses)]


def test_grown_vs_scratch_says_when_neither_reaches_the_other():
    grown = {"name": "g", "started_as": "grown from s", "curve": curve(5.0, 4.5, 4.2), "val_loss_final": 4.2,
             "val_loss_best": 4.2, "steps": 20}
    scratch = {"name": "c", "started_as": "scratch", "curve": curve(9.0, 5.0, 4.0), "val_loss_final": 4.0,
               "val_loss_best": 4.0, "steps": 20}
    entry = comparison(grown, scratch)
    assert entry["grown_reaches_control_final"] is None
    assert "g (grown from s) did not reach the from-scratch c's final validation loss 4.0000" in entry["sentence"]
    assert entry["control_reaches_grown_final"]["step"] == 20
    assert entry["control_loss_at_grown_steps"] == 4.0 and entry["sentence"].endswith(
        "After 20 steps, as many as g's own, c was at 4.0000.")
    assert ("c reached g's final loss 4.2000 at its step 20 (70 steps, 700 tokens, 7e+06 training FLOPs), where g "
            "took 70 steps, 700 tokens, 7e+06 training FLOPs.") in entry["sentence"]
    entry = comparison(grown, {**scratch, "curve": curve(9.0, 6.0, 4.6), "val_loss_final": 4.6})
    assert entry["grown_reaches_control_final"]["step"] == 10 and entry["grown_reaches_control_final"][
        "chain_tokens_seen"] == 600
    assert "never reached g's final loss 4.2000" in entry["sentence"]


BAD_LADDERS = [
    ("", "rung: no rungs"),
    ('[[rung]]\nmax_steps = 4\n', r"\[\[rung\]\] 1.name: missing"),
    ('[[rung]]\nname = "a/b"\n', "is not a folder name"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "a"\n', r"\[\[rung\]\] 2 \(a\).name: 'a' is the name of an earlier"),
    ('[[rung]]\nname = "a"\nmax_step = 4\n', r"\[\[rung\]\] 1 \(a\).max_step: unknown field"),
    ('[[rung]]\nname = "a"\ngrow = "n_layer=2"\n', r"\[\[rung\]\] 1 \(a\).init: the first rung has no rung before"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "b"\ngrow = "n_layer=x"\n',
     r"\[\[rung\]\] 2 \(b\).grow: n_layer='x' is not a positive integer"),
    ('[[rung]]\nname = "a"\nmodel = { n_layer = 2 }\n[[rung]]\nname = "b"\ngrow = "n_layer=1"\n',
     r"\[\[rung\]\] 2 \(b\).grow: n_layer=1 is smaller than the model's n_layer \(2\)"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "b"\ngrow = "d_model=48"\n', r"\(b\).grow: d_model=48 is not a multiple"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "b"\nfrom = "c"\n', r"\(b\).from: 'c' is not an earlier rung"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "b"\ngrow = "n_layer=2"\nmodel = { d_model = 64 }\n',
     r"\(b\).model: a grown rung's model is its source's"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "c"\ncontrol_of = "a"\n', r"\(c\).control_of: 'a' starts from scratch"),
    ('[[rung]]\nname = "c"\ncontrol_of = "b"\n[[rung]]\nname = "b"\n', r"\(c\).control_of: 'b' comes after this"),
    ('[[rung]]\nname = "c"\ncontrol_of = "x"\n', r"\(c\).control_of: 'x' is not another rung"),
    ('[[rung]]\nname = "a"\ntrain_tokens = 0\n', r"\(a\).train_tokens: expected a positive integer, got 0"),
    ('[[rung]]\nname = "a"\nmodel = { n_head = 3 }\n', r"\[\[rung\]\] 1 \(a\): model.n_head: d_model \(32\)"),
    ('[[rung]]\nname = "a"\ntrain = { batch_size = 8 }\n', r"\(a\).train.batch_size: decides the validation"),
    ('[[rung]]\nname = "a"\ntrain = { max_steps = 8 }\n', r"\(a\).train.max_steps: set by the ladder"),
    ('[[rung]]\nname = "a"\ntrain = { patience = 2 }\n', r"\(a\): train.patience 2"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "b"\nmodel = { context_length = 64 }\n',
     r"\(b\): the window length .* is 64, but 32 for a: every rung is measured on the same validation windows"),
    ('[[rung]]\nname = "a"\n[[rung]]\nname = "b"\ngrow = "context_length=64"\n', r"\(b\).grow: context_length"),
    ('[trian]\n[[rung]]\nname = "a"\n', "trian: unknown table"),
    ('[ladder]\nout = "x"\n[[rung]]\nname = "a"\n', "ladder.out: unknown field"),
]


@pytest.mark.parametrize("rungs, message", BAD_LADDERS)
def test_bad_ladder_files_name_the_rung_and_key(tmp_path, corpus, rungs, message):
    path = ladder_file(tmp_path, corpus, rungs)
    with pytest.raises(ConfigError, match=message) as caught:
        ladder_cli(["--config", str(path), "--out", str(tmp_path / "out"), "--plan"])
    assert str(caught.value).startswith(f"{path}: ")
    assert not (tmp_path / "out").exists()


def test_a_shared_ladder_field_is_refused(tmp_path, corpus):
    path = ladder_file(tmp_path, corpus, RUNGS, SHARED.replace("[data]", '[data]\ntrain_tokens = 5'))
    with pytest.raises(ConfigError, match=r"data.train_tokens: set by the ladder \(the rung's train_tokens\)"):
        ladder_cli(["--config", str(path), "--plan"])


def test_the_command_line_reports_a_bad_file_in_one_line(tmp_path, corpus):
    path = ladder_file(tmp_path, corpus, '[[rung]]\nname = "a"\n[[rung]]\nname = "b"\ngrow = "n_head=4"\n')
    done = subprocess.run([sys.executable, "-m", "gpt", "ladder", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: {path}: [[rung]] 2 (b).grow: n_head cannot be given")


def test_the_default_ladder_is_valid(capsys):
    assert ladder_cli(["--plan"]) == 0
    plan = capsys.readouterr().out
    assert plan.count("python pretrain.py") == 4
    assert "--init.from runs/ladder/2-deeper --init.grow d_model=128" in plan
