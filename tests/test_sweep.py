"""python -m gpt sweep: trials are ordinary runs, the objective is their metrics', best.toml rebuilds the best
config, a killed sweep continues (finished trials kept, the interrupted run resumed), pruning stops a run, and bad
sweep files are refused with the key named. Optuna's own storage (optuna.load_study) is the reference."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import optuna
import pytest

import gpt.sweep
import pretrain
from gpt.errors import ConfigError
from gpt.scripts import parse_script_args
from gpt.sweep import read_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 6

BASE = """
[model]
preset = "tiny"
n_layer = 1
d_model = 32
n_head = 2
context_length = 32

[train]
max_steps = 20
batch_size = 4
lr = 1e-3
min_lr = 1e-5
warmup_steps = 2
eval_interval = 2
eval_batches = 2
log_interval = 2
dtype = "float32"

[data]
path = "{corpus}"

[sample]
max_new_tokens = 3
"""

SWEEP = """
[sweep]
script = "pretrain.py"
config = "{base}"
out_dir = "{out}"
study_name = "test"
trials = {trials}
random_trials = 2
seed = 3

[pruner]
{pruner}

[overrides]
train.max_steps = {max_steps}

[params."train.lr"]
type = "float"
low = 1e-4
high = 1e-2
log = true

[params.train.warmup_steps]
type = "int"
low = 0
high = 3

[params."model.dropout"]
type = "categorical"
choices = [0.0, 0.1]
"""


def write_sweep(folder: Path, corpus: Path, trials: int, pruner: str = 'kind = "none"', **extra: str) -> Path:
    base = folder / "base.toml"
    base.write_text(BASE.format(corpus=corpus))
    text = SWEEP.format(base=base, out=folder / "out", trials=trials, pruner=pruner, max_steps=MAX_STEPS)
    for old, new in extra.items():
        text = text.replace(old, new)
    path = folder / "sweep.toml"
    path.write_text(text)
    return path


def read_records(folder: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl (a line being written is not one yet)."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().split("\n")[:-1]]


def val_losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(folder) if r["split"] == "val"}


def stored(path: Path, name: str = "test") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path / 'study.db'}").get_trials()


class SweepKilled(BaseException):
    """Stands for the sweep process dying mid-trial (its run gets SIGTERM from the kernel: see _stop_with_parent)."""


@pytest.fixture(scope="module")
def killed_and_continued(tmp_path_factory, corpus):
    """A 2-trial sweep that dies during trial 1 (once it has a validation record), then runs again to the end.
    Returns (sweep file, out folder, the stored trials right after the kill, trial 1's val losses then)."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder, corpus, trials=2)
    out = folder / "out"
    real = gpt.sweep.validation_values

    def dies_in_trial_1(metrics: Path, metric: str):
        values = real(metrics, metric)
        if metrics.parent.name == "trial-001" and values:
            raise SweepKilled
        return values

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpt.sweep, "validation_values", dies_in_trial_1)
        with pytest.raises(SweepKilled):
            run_sweep(read_sweep(path))
    after_kill, losses_then = stored(out), val_losses(out / "trial-001")
    assert run_sweep(read_sweep(path)) == 0
    return path, out, after_kill, losses_then


@pytest.mark.slow  # they share a killed and continued sweep (~45 s); CI runs the slow set
def test_a_killed_sweep_keeps_its_trials_and_continues_the_interrupted_run(killed_and_continued):
    _, out, after_kill, losses_then = killed_and_continued
    states = optuna.trial.TrialState
    assert [t.state for t in after_kill] == [states.COMPLETE, states.RUNNING]
    trials = stored(out)
    assert [t.state for t in trials] == [states.COMPLETE, states.FAIL, states.COMPLETE]
    first = trials[0]
    assert (first.number, first.value, first.params) == (0, after_kill[0].value, after_kill[0].params)
    continuation = trials[2]
    assert continuation.params == after_kill[1].params
    assert continuation.user_attrs["run_folder"] == str(out / "trial-001") and not (out / "trial-002").exists()
    log = (out / "trial-001" / "sweep.log").read_text()
    assert log.count("$ ") == 2 and "--train.resume auto" in log.split("$ ")[2]
    assert "[resumed from" in log  # from the checkpoint: the steps before it were not trained again
    losses = val_losses(out / "trial-001")
    assert sorted(losses) == list(range(0, MAX_STEPS + 1, 2))  # one uninterrupted run's records
    assert {step: losses[step] for step in losses_then} == losses_then


@pytest.mark.slow  # they share a killed and continued sweep (~45 s); CI runs the slow set
def test_every_trial_is_an_ordinary_run_with_its_values(killed_and_continued):
    _, out, _, _ = killed_and_continued
    for trial in stored(out):
        folder = Path(trial.user_attrs["run_folder"])
        config = json.loads((folder / "config.json").read_text())
        assert config["train"]["lr"] == trial.params["train.lr"]
        assert config["train"]["warmup_steps"] == trial.params["train.warmup_steps"]
        assert config["model"]["dropout"] == trial.params["model.dropout"]
        assert config["train"]["max_steps"] == MAX_STEPS and config["train"]["out_dir"] == str(folder)
        assert (folder / "checkpoints" / "latest.pt").is_file()


@pytest.mark.slow  # they share a killed and continued sweep (~45 s); CI runs the slow set
def test_results_hold_each_runs_best_validation_loss_best_first(killed_and_continued):
    _, out, _, _ = killed_and_continued
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "INTERRUPTED"]
    for row in rows[:2]:
        losses = val_losses(Path(row["run_folder"]))
        assert row["objective"] == min(loss for step, loss in losses.items() if step > 0)
        assert row["steps"] == MAX_STEPS
    assert rows[0]["objective"] <= rows[1]["objective"]
    best = min((t for t in stored(out) if t.value is not None), key=lambda t: t.value)
    assert results["best"]["number"] == best.number and results["best"]["objective"] == best.value
    assert "| trial | state | loss | train.lr |" in (out / "results.md").read_text()
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    assert set(results["importance"]) == {"train.lr", "train.warmup_steps", "model.dropout"}


@pytest.mark.slow  # they share a killed and continued sweep (~45 s); CI runs the slow set
def test_best_toml_gives_the_best_trials_config(killed_and_continued):
    _, out, _, _ = killed_and_continued
    best = json.loads((out / "results.json").read_text())["best"]
    tomllib.loads((out / "best.toml").read_text())  # plain TOML
    _, config = parse_script_args(["--config", str(out / "best.toml")], description="", sections=pretrain.SECTIONS,
                                  default_config=pretrain.DEFAULT_CONFIG)
    rebuilt = {name: section.to_dict() for name, section in config.items()}
    trained = json.loads((Path(best["run_folder"]) / "config.json").read_text())
    trained["train"].update(out_dir="", resume="")  # the trial's own run folder (continued: trial 1 was killed)
    assert rebuilt == trained


def test_a_pruned_trial_is_stopped_early(tmp_path, corpus):
    """A threshold no loss is under: the pruner stops the run at its first report past the warmup steps."""
    path = write_sweep(tmp_path, corpus, trials=1, pruner='kind = "threshold"\nupper = 0.0\nn_warmup_steps = 2',
                       **{"train.max_steps = 6": "train.max_steps = 40"})
    assert run_sweep(read_sweep(path)) == 0
    (trial,) = stored(tmp_path / "out")
    assert trial.state == optuna.trial.TrialState.PRUNED
    folder = Path(trial.user_attrs["run_folder"])
    steps = [r["step"] for r in read_records(folder)]
    assert 2 <= max(steps) < 10 and (folder / "checkpoints" / "latest.pt").is_file()
    assert "SIGTERM: saving a checkpoint" in (folder / "sweep.log").read_text()
    assert trial.intermediate_values == {2: val_losses(folder)[2]}  # nothing is reported after the pruning


@pytest.mark.slow  # one more run of the script: the fast set keeps under a minute
def test_a_failed_run_is_recorded_with_the_end_of_its_log(tmp_path, corpus, capsys):
    path = write_sweep(tmp_path, corpus, trials=1)
    base = tmp_path / "base.toml"
    base.write_text(base.read_text().replace(str(corpus), str(tmp_path / "missing.txt")))  # found by the run only
    assert run_sweep(read_sweep(path)) == 0  # the sweep goes on: here, to its end
    (trial,) = stored(tmp_path / "out")
    assert trial.state == optuna.trial.TrialState.FAIL
    log_end = (tmp_path / "out" / "trial-000" / "sweep.log").read_text().strip().splitlines()[-1]
    assert "missing.txt" in log_end and "exit code 2" in trial.user_attrs["note"]
    assert log_end in trial.user_attrs["note"] and log_end in capsys.readouterr().out
    assert "| 0 | FAIL |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("change, message", [
    (('script = "pretrain.py"', 'script = "train.py"'), "unknown script 'train.py'"),
    (('[params."train.lr"]', '[params."trian.lr"]'), 'params."trian.lr": pretrain.py has no [trian] section'),
    (('[params."train.lr"]', '[params."train.lrr"]'), "train.lrr: unknown field"),
    (('[params."train.lr"]', '[params."train.out_dir"]'), "set by the sweep for each trial"),
    (("low = 1e-4", "low = 1e-1"), 'params."train.lr": low (0.1) must be below high (0.01)'),
    (("low = 1e-4", "low = 0.0"), 'params."train.lr".low: a log scale needs low > 0'),
    (("low = 1e-4", "low = 1e-6"), 'params."train.lr" = 1e-06: train.min_lr'),
    (("high = 3", "high = 3.5"), 'params."train.warmup_steps".high: expected int, got float 3.5'),
    (('type = "categorical"', 'type = "choice"'), "type: must be one of float, int, categorical"),
    (("choices = [0.0, 0.1]", "choices = [0.0, 1.5]"), 'params."model.dropout" = 1.5: model.dropout: must be in'),
    (("train.max_steps = 6", 'train.lr = 0.01'), "also fixed in [overrides]"),
    (("\ntrials = 2", "\ntrials = 0"), "sweep.trials: must be at least 1"),
    (("\ntrials = 2", "\ntrials = 2\nworkers = 2"), "sweep.workers: unknown key"),
    (("\ntrials = 2", "\n"), "sweep.trials: missing"),
    (('kind = "none"', 'kind = "hyperband"'), "pruner.kind: must be one of median, threshold, none"),
    (('kind = "none"', 'kind = "threshold"'), "a threshold pruner needs lower or upper"),
    (('study_name = "test"', 'study_name = "test"\nmodel = "tiny"'), "pretrain.py takes no --model"),
])
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path, corpus, change, message):
    path = write_sweep(tmp_path, corpus, trials=2, **{change[0]: change[1]})
    with pytest.raises(ConfigError) as err:
        read_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_command_killed_outright_then_stopped_with_sigterm_continues_both_times(tmp_path, corpus):
    """`python -m gpt sweep` SIGKILLed with its run mid-trial, run again, stopped with SIGTERM mid-trial (it
    exits 143 once the run has saved), run again: every finished trial is kept and the study completes."""
    path = write_sweep(tmp_path, corpus, trials=3, **{"train.max_steps = 6": "train.max_steps = 12"})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gpt", "sweep", "--config", str(path)]

    def start_and_wait_for(folder: str) -> subprocess.Popen:
        sweep = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not ((out / folder / "metrics.jsonl").is_file() and len(val_losses(out / folder)) >= 2):
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
            time.sleep(0.1)
        return sweep

    sweep = start_and_wait_for("trial-001")
    run_pid = int((out / "trial-001" / "run.lock").read_text().split()[1])
    sweep.kill()
    with contextlib.suppress(ProcessLookupError):  # the kernel may have stopped it already (its parent died)
        os.kill(run_pid, signal.SIGKILL)
    sweep.wait()
    kept = stored(out)[0]
    assert kept.state == optuna.trial.TrialState.COMPLETE

    sweep = start_and_wait_for("trial-003")  # trial 2 continues trial-001; trial 3 is new
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=240)[0]
    assert sweep.returncode == 143, output
    assert "Continue it with the same command" in output
    assert (out / "trial-003" / "checkpoints" / "latest.pt").is_file()

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = stored(out)
    states = optuna.trial.TrialState
    assert [t.state for t in trials] == [states.COMPLETE, states.FAIL, states.COMPLETE, states.FAIL, states.COMPLETE]
    assert (trials[0].value, trials[0].params) == (kept.value, kept.params)
    assert [t.user_attrs.get("continues") for t in trials] == [None, None, 1, None, 3]
    for number, folder in ((2, "trial-001"), (4, "trial-003")):
        assert trials[number].user_attrs["run_folder"] == str(out / folder)
        assert sorted(val_losses(out / folder)) == list(range(0, 13, 2))
