"""curves.png: drawn from metrics.jsonl when a run ends (finished, interrupted by SIGTERM, without
matplotlib, with a plot that fails), and read_metrics' checks of the file."""

import builtins
import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

import gpt.tasks
import pretrain
from gpt.curves import evaluations, plot_run_curves, read_metrics, run_curves_figure
from gpt.data import BatchLoader
from gpt.errors import UserError
from gpt.train import TrainingStopped

BATCH, CONTEXT = 4, 32  # every training window is full: a step trains on BATCH * CONTEXT tokens
SMALL_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", str(CONTEXT),
    "--train.batch_size", str(BATCH), "--train.eval_batches", "2", "--train.log_interval", "1",
    "--train.warmup_steps", "2", "--train.dtype", "float32", "--sample.max_new_tokens", "3",
    "--train.max_steps", "6", "--train.eval_interval", "3",
]


def run(out_dir: Path, corpus: Path, exit_code: int = 0) -> None:
    assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(out_dir)]) == exit_code


def records(out_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or ()) > 10  # drawn, not blank


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus) -> Path:
    out_dir = tmp_path_factory.mktemp("finished")
    run(out_dir, corpus)
    return out_dir


def test_a_finished_run_has_curves_of_its_metrics(finished):
    assert_png(finished / "curves.png", (1500, 400))  # 15 x 4 inches at 100 dpi
    train, val = records(finished, "train"), records(finished, "val")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in val] == [0, 3, 6]

    by_step, by_tokens, lr = run_curves_figure(read_metrics(finished / "metrics.jsonl"), "run").axes
    train_line, val_line = by_step.lines
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(train_line.get_ydata()) == [r["loss"] for r in train]
    assert list(val_line.get_xdata()) == [0, 3, 6] and list(val_line.get_ydata()) == [r["loss"] for r in val]
    train_line, val_line = by_tokens.lines
    assert list(train_line.get_xdata()) == [step * BATCH * CONTEXT for step in range(1, 7)]
    assert list(val_line.get_xdata()) == [step * BATCH * CONTEXT for step in (0, 3, 6)]
    assert list(val_line.get_ydata()) == [r["loss"] for r in val]
    assert list(lr.lines[0].get_ydata()) == [r["lr"] for r in train]


def test_a_run_stopped_by_sigterm_has_its_curves(tmp_path, corpus, monkeypatch):
    original, calls = BatchLoader.next_batch, {"n": 0}

    def next_batch_with_sigterm(self):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch_with_sigterm)
    run(tmp_path, corpus, exit_code=128 + signal.SIGTERM)
    assert records(tmp_path, "train")[-1]["step"] == 4
    assert_png(tmp_path / "curves.png", (1500, 400))


@pytest.mark.parametrize("failure, curves", [(float("nan"), True), (KeyboardInterrupt, False)],
                         ids=["non-finite-loss", "second-ctrl-c"])
def test_a_run_that_fails_has_its_curves_unless_told_to_stop_at_once(tmp_path, corpus, monkeypatch, failure, curves):
    """A non-finite loss stops the run with an error: its curves show what led there. A second Ctrl-C
    (a KeyboardInterrupt through the loop) means out at once: no plot."""
    real_loss, calls = gpt.tasks.next_token_loss, {"n": 0}

    def loss_that_fails(model, batch):
        calls["n"] += 1
        if calls["n"] == 3 and failure is KeyboardInterrupt:
            raise KeyboardInterrupt
        return real_loss(model, batch) * (failure if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(gpt.tasks, "next_token_loss", loss_that_fails)
    with pytest.raises(TrainingStopped if curves else KeyboardInterrupt):
        run(tmp_path, corpus)
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2]
    assert (tmp_path / "curves.png").is_file() == curves


def test_curves_false_draws_nothing(tmp_path, corpus):
    assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(tmp_path),
                          "--train.curves", "false"]) == 0
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "curves.png").exists()


def test_without_matplotlib_a_run_ends_normally_without_curves(tmp_path, corpus, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run(tmp_path, corpus)
    assert not (tmp_path / "curves.png").exists()
    assert (tmp_path / "checkpoints" / "latest.pt").is_file()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_a_plot_that_fails_leaves_the_run_whole_and_no_partial_file(tmp_path, corpus, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def savefig_fails(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError("the plot broke")

    monkeypatch.setattr(Figure, "savefig", savefig_fails)
    run(tmp_path, corpus)
    assert "[curves.png not written: the plot broke]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "run.lock"]
    assert [r["step"] for r in records(tmp_path, "val")] == [0, 3, 6]


def test_read_metrics_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(UserError, match=r"metrics.jsonl: no such file"):
        read_metrics(path)
    path.write_text('{"step": 0, "split": "val", "loss": 2.0}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2, column 1: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 0, "split": "val"}\n\n{"split": "train", "loss": 1.0}\n')
    with pytest.raises(UserError, match=r'metrics.jsonl, line 3: a metrics record is an object with an integer "step"'):
        read_metrics(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 1: a metrics record"):
        read_metrics(path)


def test_read_metrics_skips_a_last_line_cut_short_and_keeps_a_whole_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "split": "val", "loss": 2.0}\n{"step": 1, "split": "tr')
    assert read_metrics(path) == [{"step": 0, "split": "val", "loss": 2.0}]
    path.write_text('{"step": 0, "split": "val", "loss": 2.0}\n{"step": 1, "split": "train", "loss": 1.5}')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_nothing_logged_draws_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_run_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()


def test_evaluations_of_older_runs_take_tokens_seen_from_the_train_record_of_their_step():
    old = [{"step": 0, "split": "val", "loss": 3.0, "tokens": 64},  # "tokens" of a val record: tokens scored
           {"step": 5, "split": "train", "loss": 2.5, "tokens": 640},
           {"step": 5, "split": "val", "loss": 2.4, "tokens": 64},
           {"step": 7, "split": "val", "loss": 2.3, "tokens": 64}]  # no train record at step 7
    assert [r.get("tokens_seen") for r in evaluations(old)] == [0, 640, None]
    assert evaluations([{"step": 5, "split": "val", "loss": 2.4, "tokens_seen": 320}])[0]["tokens_seen"] == 320
