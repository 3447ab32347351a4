"""python -m gpt compare: config differences and final metrics of two real runs, checked against their files
and checkpoints; extra validation metrics; the output folder; bad run folders."""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

import pretrain
from gpt.checkpoint import load_checkpoint
from gpt.compare import compare_cli
from gpt.errors import UserError

SMALL_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "2",
    "--train.warmup_steps", "2", "--train.dtype", "float32", "--sample.max_new_tokens", "3",
    "--train.max_steps", "6", "--train.eval_interval", "3",
]
LRS = ("0.001", "0.003")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, corpus) -> list[Path]:
    folders = []
    for lr in LRS:
        out_dir = tmp_path_factory.mktemp(f"lr{lr}")
        assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(out_dir),
                              "--train.lr", lr]) == 0
        folders.append(out_dir)
    return folders


@pytest.fixture(scope="module")
def compared(two_runs, tmp_path_factory) -> tuple[Path, str]:
    """The output folder and what compare printed."""
    out, printed = tmp_path_factory.mktemp("compare"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert compare_cli([*map(str, two_runs), "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_the_table_lists_only_the_config_fields_that_differ(two_runs, compared):
    out, printed = compared
    result = json.loads((out / "compare.json").read_text())
    a, b = map(str, two_runs)
    assert result["runs"] == [a, b]
    assert result["config"] == {"train.lr": {a: 0.001, b: 0.003}}
    lr_line = next(line for line in printed.splitlines() if line.startswith("train.lr"))
    assert lr_line.split() == ["train.lr", "0.001", "0.003"]
    assert "train.batch_size" not in printed and "train.out_dir" not in printed
    assert (out / "compare.md").read_text().splitlines()[:3] == [
        f"|  | {a} | {b} |", "|---|---:|---:|", "| train.lr | 0.001 | 0.003 |"]


def test_final_metrics_match_the_run_files_and_checkpoints(two_runs, compared):
    out, _ = compared
    metrics = json.loads((out / "compare.json").read_text())["metrics"]
    for folder in two_runs:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        latest = load_checkpoint(folder / "checkpoints" / "latest.pt")
        best = load_checkpoint(folder / "checkpoints" / "best.pt")
        got = {row: values[str(folder)] for row, values in metrics.items()}
        assert got["val loss (last)"] == val[-1]["loss"] and got["val ppl (last)"] == val[-1]["ppl"]
        assert got["val loss (best)"] == best["best_val_loss"]
        assert got["val ppl (best)"] == pytest.approx(math.exp(best["best_val_loss"]), rel=1e-12)
        assert got["steps"] == latest["step"] == 6
        assert got["tokens seen"] == latest["tokens_seen"] == 6 * 4 * 32
        assert got["train seconds"] == pytest.approx(latest["train_seconds"], rel=1e-9)
        assert got["train loss (last)"] == train[-1]["loss"] and train[-1]["step"] == 6
        assert got["val bits_per_byte (last)"] == val[-1]["bits_per_byte"]
        assert set(got) == {"val loss (last)", "val loss (best)", "val ppl (last)", "val ppl (best)", "steps",
                            "tokens seen", "train seconds", "train loss (last)", "val bits_per_byte (last)"}


def test_the_plot_has_every_run(compared):
    out, _ = compared
    with Image.open(out / "compare.png") as image:
        assert image.format == "PNG" and image.size == (1200, 450)


def fake_run(folder: Path, config: dict, records: list[dict]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_other_validation_metrics_and_fields_one_run_lacks(tmp_path):
    records = [{"step": 0, "split": "val", "loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4, "lr": 0.0},
               {"step": 4, "split": "val", "loss": 0.5, "accuracy": 0.75, "macro_f1": 0.7, "lr": 0.001}]
    a = fake_run(tmp_path / "a", {"train": {"lr": 0.001}}, records)
    b = fake_run(tmp_path / "b", {"train": {"lr": 0.001}, "data": {"window": 0}}, records[:1])
    assert compare_cli([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["config"] == {"data.window": {str(b): 0}}
    assert result["metrics"]["val accuracy (last)"] == {str(a): 0.75, str(b): 0.5}
    assert result["metrics"]["val macro_f1 (last)"] == {str(a): 0.7, str(b): 0.4}
    assert result["metrics"]["val loss (best)"] == {str(a): 0.5, str(b): None}  # step 0 is never the best
    assert "| data.window | - | 0 |" in (tmp_path / "out" / "compare.md").read_text()


def test_a_diverged_evaluation_is_not_the_best(tmp_path):
    records = [{"step": 0, "split": "val", "loss": 2.0}, {"step": 2, "split": "val", "loss": 5.0},
               {"step": 4, "split": "val", "loss": float("nan")}]
    a = fake_run(tmp_path / "a", {}, records)
    assert compare_cli([str(a), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "compare.json").read_text())["metrics"]
    assert metrics["val loss (best)"] == {str(a): None}


def test_the_default_output_folder_is_new_under_runs(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compare_cli(list(map(str, two_runs))) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("compare-")
    assert sorted(p.name for p in folder.iterdir()) == ["compare.json", "compare.md", "compare.png"]


def test_bad_run_folders_and_outputs(two_runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: not a training run's folder \(no config.json or metrics.jsonl"):
        compare_cli([str(tmp_path / "empty")])
    with pytest.raises(UserError, match=r"missing: no such folder"):
        compare_cli([str(two_runs[0]), str(tmp_path / "missing")])
    broken = fake_run(tmp_path / "broken", {}, [])
    (broken / "config.json").write_text('{\n  "train": {"lr": 0.001,}\n}')
    with pytest.raises(UserError, match=r"config.json, line 2, column 25: not valid JSON"):
        compare_cli([str(broken)])
    with pytest.raises(UserError, match=r"given more than once"):
        compare_cli([str(two_runs[0]), str(two_runs[0])])
    with pytest.raises(SystemExit) as exit_info:  # argparse: the run folder is refused as --out
        compare_cli([str(two_runs[0]), "--out", str(two_runs[1])])
    assert exit_info.value.code == 2
    assert not list(two_runs[1].glob("compare.*"))
