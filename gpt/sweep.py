"""`python -m gpt sweep --config sweep.toml`: hyperparameter search over a training script's config fields.

A sweep file names a training script, its base config, values fixed for every trial,
and the config fields to search, each a range or a list of choices:

    [sweep]
    script = "pretrain.py"          # or finetune_classifier.py, finetune_instruct.py
    config = "configs/tiny.toml"    # the script's base config
    out_dir = "runs/sweep-tiny"
    trials = 12
    metric = "loss"                 # a number of the "val" records in metrics.jsonl
    direction = "minimize"

    [overrides]                     # --section.field values every trial gets
    train.max_steps = 40

    [params."train.lr"]             # float | int (low, high, optional step and log) | categorical (choices)
    type = "float"
    low = 1e-4
    high = 1e-2
    log = true

Each trial is an ordinary run of the script in its own run folder, OUT/trial-NNN (the
script's output goes to sweep.log there). While it runs, its metrics.jsonl is read as it
grows and each validation value is reported to Optuna; when the pruner (median, by
default) finds the trial worse than the earlier ones were at the same step, the run gets
SIGTERM, saves a checkpoint and stops, and the trial is PRUNED. A trial's objective is
the best validation value of its run. A run that fails is recorded FAIL with the end of
its log, and the sweep goes on. Optuna's TPE sampler picks each trial's values.

The study lives in OUT/study.db (SQLite), so a stopped sweep continues where it was when
the same command runs again. A trial that was running when the sweep stopped (Ctrl-C,
SIGTERM, or the sweep killed) is recorded FAIL and continued as a new trial with the same
values in the same run folder (`--train.resume auto`): no step that reached a checkpoint
is trained again. The sweep ends when `trials` trials have ended (complete, pruned or
failed; an interrupted trial does not count, its continuation does).

OUT also holds results.md and results.json (a row per trial, best first), best.toml (the
base config with the fixed overrides and the best trial's values, for `--config`) and,
with matplotlib installed, importance.png (how much each field mattered, by Optuna's
importance evaluator) and history.png (the objective per trial and the best so far).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .cli_args import existing_file, positive_int
from .config import ModelConfig, Section, read_toml
from .errors import ConfigError, UserError
from .files import atomic_target, parse_json_line, write_json, write_text
from .run_folder import is_run_folder, refuse_run_folder
from .scripts import parse_script_args

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("pretrain.py", "finetune_classifier.py", "finetune_instruct.py")
SET_PER_TRIAL = ("train.out_dir", "train.resume")  # the sweep gives each trial its own
PARAM_TYPES = ("float", "int", "categorical")
PRUNERS = ("median", "threshold", "none")
LOG_NAME = "sweep.log"
POLL_SECONDS = 0.5  # how often a running trial's metrics.jsonl is read
LOCK_WAIT_SECONDS = 120  # how long a continued trial waits for its interrupted run to save and let go of the folder
FAILURES_BEFORE_GIVING_UP = 3  # failed trials in a row, with none complete in the study, stop the sweep
LOG_TAIL_LINES = 8  # lines of a failed trial's log shown

# ----------------------------------------------------------------------------
# The sweep file
# ----------------------------------------------------------------------------


@dataclass
class Script:
    """A training script the sweep runs, imported to read its config sections."""

    path: Path
    module: ModuleType

    @property
    def sections(self) -> dict[str, type[Section]]:
        return self.module.SECTIONS

    @property
    def takes_model(self) -> bool:
        return hasattr(self.module, "MODEL_HELP")

    def config(self, argv: list[str]) -> dict[str, Section]:
        """The config the script builds from `argv`: its own parser, with every check it makes."""
        m = self.module
        _, config = parse_script_args(argv, description=m.__doc__ or "", sections=m.SECTIONS,
                                      default_config=m.DEFAULT_CONFIG, model_default=getattr(m, "DEFAULT_MODEL", None),
                                      model_help=getattr(m, "MODEL_HELP", None))
        return config


@dataclass
class Param:
    """One config field the sweep searches: a float or int range, or a list of choices."""

    key: str  # "train.lr"
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: list[Any] = field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        """This field's value for an Optuna trial (a value fixed for the trial, when it continues another)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_categorical(self.key, self.choices)

    def extremes(self) -> list[Any]:
        """The values to check up front: both ends of a range, every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


@dataclass
class Sweep:
    """A sweep file, read and checked."""

    file: Path
    script: Script
    base_config: Path
    model: str  # --model for the fine-tuning scripts; "" for none
    out_dir: Path
    study_name: str
    trials: int
    metric: str
    direction: str
    seed: int
    random_trials: int
    pruner: dict[str, Any]
    overrides: dict[str, Any]  # "section.field" -> value
    params: list[Param]

    def argv(self, values: dict[str, Any]) -> list[str]:
        """The script's arguments for a trial with these values (without its run folder)."""
        args = ["--config", str(self.base_config)] + (["--model", self.model] if self.model else [])
        for key, value in {**self.overrides, **values}.items():
            args += [f"--{key}", cli_text(value)]
        return args

    @property
    def database(self) -> Path:
        return self.out_dir / "study.db"


def cli_text(value: Any) -> str:
    """A TOML value as the script's command line takes it: true/false, a float's exact repr, text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


class _Table:
    """A table of the sweep file read key by key, with errors naming file and key; `done` refuses leftovers."""

    _REQUIRED = object()

    def __init__(self, values: Any, where: str):
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a table, got {type(values).__name__} {values!r}")
        self.values, self.where, self.known = dict(values), where, []

    def take(self, key: str, kinds: tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self.known.append(key)
        if key not in self.values:
            if default is self._REQUIRED:
                raise ConfigError(f"{self.where}.{key}: missing")
            return default
        value = self.values.pop(key)
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            names = " or ".join(kind.__name__ for kind in kinds)
            raise ConfigError(f"{self.where}.{key}: expected {names}, got {type(value).__name__} {value!r}")
        return float(value) if kinds == (int, float) else value

    def done(self) -> None:
        if self.values:
            raise ConfigError(f"{self.where}.{next(iter(self.values))}: unknown key; known keys: "
                              f"{', '.join(self.known)}")


def by_field(table: dict[str, Any], where: str, spec_tables: bool) -> dict[str, Any]:
    """{"train.lr": value} from a table written either way TOML allows: `"train.lr" = ...` (a quoted key) or
    `train.lr = ...` (nested: {"train": {"lr": ...}}). With `spec_tables`, the values are tables themselves."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        nested = (isinstance(value, dict) and "." not in key and bool(value)
                  and all(isinstance(inner, dict) == spec_tables for inner in value.values()))
        if nested:
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        elif "." in key:
            flat[key] = value
        else:
            raise ConfigError(f"{where}.{key}: expected a config field as section.field (like train.lr), got {key!r}")
    return flat


def check_field(script: Script, key: str, where: str) -> None:
    """A ConfigError naming `where` unless `key` ("train.lr") is a field of the script's config."""
    section, dot, name = key.partition(".")
    if not dot or "." in name:
        raise ConfigError(f"{where}: expected section.field (like train.lr), got {key!r}")
    if key in SET_PER_TRIAL:
        raise ConfigError(f"{where}: {key} is set by the sweep for each trial (its run folder)")
    if section not in script.sections:
        raise ConfigError(f"{where}: {script.path.name} has no [{section}] section; its sections: "
                          f"{', '.join(script.sections)}")
    if name == "preset" and script.sections[section] is ModelConfig:
        return
    try:
        script.sections[section].check_field_name(name)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_param(key: str, spec: Any, where: str) -> Param:
    """One [params."section.field"] table, checked."""
    table = _Table(spec, where)
    kind = table.take("type", (str,))
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}.type: must be one of {', '.join(PARAM_TYPES)}; got {kind!r}")
    if kind == "categorical":
        choices = table.take("choices", (list,))
        if not choices or not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{where}.choices: expected a non-empty list of strings, numbers or booleans, "
                              f"got {choices!r}")
        if len({(type(c), c) for c in choices}) < len(choices):
            raise ConfigError(f"{where}.choices: {choices!r} repeats a value")
        table.done()
        return Param(key, kind, choices=choices)
    number = (int,) if kind == "int" else (int, float)
    low, high = table.take("low", number), table.take("high", number)
    step, log = table.take("step", number, None), table.take("log", (bool,), False)
    table.done()
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}.low: a log scale needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}.step: " + ("not with log = true (Optuna samples one or the other)" if log
                                                else f"must be positive, got {step}"))
    return Param(key, kind, low, high, step, log)


def read_pruner(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """The [pruner] table: kind median (n_startup_trials, n_warmup_steps), threshold (lower/upper) or none."""
    table = _Table(doc.get("pruner", {}), where)
    kind = table.take("kind", (str,), "median")
    if kind not in PRUNERS:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(PRUNERS)}; got {kind!r}")
    pruner: dict[str, Any] = {"kind": kind}
    if kind != "none":
        pruner["n_warmup_steps"] = table.take("n_warmup_steps", (int,), 0)
        if pruner["n_warmup_steps"] < 0:
            raise ConfigError(f"{where}.n_warmup_steps: must not be negative, got {pruner['n_warmup_steps']}")
    if kind == "median":
        pruner["n_startup_trials"] = table.take("n_startup_trials", (int,), 3)
        if pruner["n_startup_trials"] < 0:
            raise ConfigError(f"{where}.n_startup_trials: must not be negative, got {pruner['n_startup_trials']}")
    if kind == "threshold":
        pruner["lower"] = table.take("lower", (int, float), None)
        pruner["upper"] = table.take("upper", (int, float), None)
        if pruner["lower"] is None and pruner["upper"] is None:
            raise ConfigError(f"{where}: a threshold pruner needs lower or upper (or both)")
    table.done()
    return pruner


def load_script(name: str, where: str) -> Script:
    """One of SCRIPTS, found as given or beside the gpt package, imported to read its config sections."""
    if Path(name).name not in SCRIPTS:
        raise ConfigError(f"{where}: unknown script {name!r}; the sweep runs {', '.join(SCRIPTS)}")
    path = Path(name) if Path(name).is_file() else REPO_ROOT / name
    if not path.is_file():
        raise ConfigError(f"{where}: {name} not found (here or in {REPO_ROOT})")
    spec = importlib.util.spec_from_file_location(f"gpt_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return Script(path, module)


def read_sweep(path: Path) -> Sweep:
    """The sweep file at `path`, every key and value checked, and the base config built with the overrides and
    with each end of each range (so a value the script would refuse stops the sweep before any trial)."""
    doc = read_toml(path)
    for name in doc:
        if name not in ("sweep", "pruner", "overrides", "params"):
            raise ConfigError(f"{path}: unknown table [{name}]; a sweep file has [sweep], [pruner], [overrides], "
                              f"[params.\"section.field\"]")
    if "sweep" not in doc:
        raise ConfigError(f"{path}: no [sweep] table (script, config, out_dir, trials, ...)")
    table = _Table(doc["sweep"], f"{path}: sweep")
    script = load_script(table.take("script", (str,)), f"{path}: sweep.script")
    base_config = Path(table.take("config", (str,), str(script.module.DEFAULT_CONFIG)))
    model = table.take("model", (str,), "")
    if model and not script.takes_model:
        raise ConfigError(f"{path}: sweep.model: {script.path.name} takes no --model (it trains from scratch)")
    out_dir = Path(table.take("out_dir", (str,)))
    study_name = table.take("study_name", (str,), "sweep")
    trials = table.take("trials", (int,))
    metric = table.take("metric", (str,), "loss")
    direction = table.take("direction", (str,), "minimize")
    seed = table.take("seed", (int,), 0)
    random_trials = table.take("random_trials", (int,), 5)
    table.done()
    if trials < 1:
        raise ConfigError(f"{path}: sweep.trials: must be at least 1, got {trials}")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: sweep.direction: must be minimize or maximize, got {direction!r}")
    if random_trials < 1:
        raise ConfigError(f"{path}: sweep.random_trials: must be at least 1, got {random_trials}")
    if not 0 <= seed < 2**31:
        raise ConfigError(f"{path}: sweep.seed: must be in [0, 2**31), got {seed}")
    if not study_name:
        raise ConfigError(f"{path}: sweep.study_name: must not be empty")
    try:
        refuse_run_folder(out_dir, "sweep.out_dir")
    except UserError as err:
        raise ConfigError(f"{path}: {err}") from None
    pruner = read_pruner(doc, f"{path}: pruner")
    overrides = by_field(_Table(doc.get("overrides", {}), f"{path}: overrides").values, f"{path}: overrides",
                         spec_tables=False)
    for key, value in overrides.items():
        check_field(script, key, f"{path}: overrides.{key}")
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{path}: overrides.{key}: expected a string, number or boolean, got {value!r}")
    specs = by_field(_Table(doc.get("params", {}), f"{path}: params").values, f"{path}: params", spec_tables=True)
    if not specs:
        raise ConfigError(f"{path}: no [params.\"section.field\"] table: the sweep has nothing to search")
    params = []
    for key, spec in specs.items():
        where = f'{path}: params."{key}"'
        check_field(script, key, where)
        if key in overrides:
            raise ConfigError(f"{where}: also fixed in [overrides]; a field is either searched or fixed")
        params.append(read_param(key, spec, where))
    sweep = Sweep(path, script, base_config, model, out_dir, study_name, trials, metric, direction, seed,
                  random_trials, pruner, overrides, params)
    check_values(sweep)
    return sweep


def check_values(sweep: Sweep) -> None:
    """Build the script's config from the base, the overrides and each end of each range (the other fields at
    their base values): a ConfigError names the sweep file and the value the script refuses."""
    try:
        sweep.script.config(sweep.argv({}))
    except UserError as err:
        raise ConfigError(f"{sweep.file}: the base config {sweep.base_config} with the [overrides]: {err}") from None
    for param in sweep.params:
        for value in param.extremes():
            try:
                sweep.script.config(sweep.argv({param.key: value}))
            except UserError as err:
                raise ConfigError(f'{sweep.file}: params."{param.key}" = {value!r}: {err}') from None


# ----------------------------------------------------------------------------
# One trial: a run of the script, watched
# ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """How a trial's run ended."""

    state: str  # COMPLETE | PRUNED | FAIL | INTERRUPTED (the sweep was stopped; the run continues next time)
    best: float | None  # the best validation value of the metric in its metrics.jsonl
    steps: int
    seconds: float
    note: str = ""


def validation_values(metrics: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of each "val" record after step 0 (the untrained model) in `metrics`, as far as written;
    a line still being written is left for the next read. A missing metric is a ConfigError naming it."""
    try:
        text = metrics.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    values = []
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        record = parse_json_line(line, f"{metrics}, line {number}") if line.strip() else {}
        if record.get("split") != "val" or record.get("step", 0) == 0:
            continue
        if metric not in record:
            known = ", ".join(k for k, v in record.items() if isinstance(v, (int, float)) and k != "step")
            raise ConfigError(f"sweep.metric: the validation records of {metrics.parent.name} have no {metric!r}; "
                              f"they have {known}")
        if isinstance(record[metric], (int, float)) and math.isfinite(record[metric]):
            values.append((record["step"], float(record[metric])))
    return values


def last_step(metrics: Path) -> int:
    """The step of the last complete record in `metrics` (0 when there is none)."""
    lines = metrics.read_text(encoding="utf-8").split("\n")[:-1] if metrics.is_file() else []
    steps = [parse_json_line(line, str(metrics)).get("step", 0) for line in lines if line.strip()]
    return steps[-1] if steps else 0


def best_value(values: list[tuple[int, float]], direction: str) -> float | None:
    numbers = [value for _, value in values]
    return (min(numbers) if direction == "minimize" else max(numbers)) if numbers else None


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a trial's log (progress-bar redraws dropped)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    kept = [line.split("\r")[-1] for line in text.splitlines() if line.split("\r")[-1].strip()]
    return "\n".join(kept[-lines:])


class _StopRequest:
    """SIGINT/SIGTERM to the sweep: the running trial gets SIGTERM (it saves a checkpoint and stops) and no
    trial starts after it. A second Ctrl-C stops the sweep at once (the trial's run still gets SIGTERM: see
    `_stop_with_parent`)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        print(f"\n[{signal.Signals(signum).name}: the running trial saves a checkpoint and stops; "
              f"no further trial starts]", file=sys.stderr)
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signal.SIGTERM)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_with_parent() -> Callable[[], None] | None:
    """For Popen's preexec_fn on Linux: the trial's run gets SIGTERM (saves a checkpoint, stops) when the sweep
    process dies, however it dies, so a killed sweep leaves no run training on its own."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the sweep died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def wait_for_folder(folder: Path) -> None:
    """Wait (up to LOCK_WAIT_SECONDS) until no process holds the run folder's lock: the interrupted run of a
    continued trial may still be saving its checkpoint."""
    lock_path = folder / "run.lock"
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while lock_path.is_file():
        with lock_path.open("a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # closing the file lets go at once
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{folder} is still in use ({lock_path.read_text().strip()}): stop that run, "
                                    f"then run the sweep again") from None
        time.sleep(POLL_SECONDS)


def run_trial(sweep: Sweep, trial: Any, values: dict[str, Any], folder: Path, resume: bool,
              stop: _StopRequest) -> Outcome:
    """Run the script for one trial in `folder` (continuing its run when `resume`), report each validation value
    to the trial while it trains, and stop the run with SIGTERM when the pruner says so."""
    command = [sys.executable, str(sweep.script.path), *sweep.argv(values), "--train.out_dir", str(folder),
               *(["--train.resume", "auto"] if resume else [])]
    folder.mkdir(parents=True, exist_ok=True)
    if resume:
        wait_for_folder(folder)
    metrics, log_path = folder / "metrics.jsonl", folder / LOG_NAME
    started = time.monotonic()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        stop.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True,  # the terminal's Ctrl-C reaches the sweep alone
                                      preexec_fn=_stop_with_parent())
    process, reported, pruned = stop.child, set(), False
    if stop.requested:  # the signal came while the run was being started
        process.send_signal(signal.SIGTERM)
    try:
        while True:
            running = process.poll() is None  # asked first, so the last read sees every record
            for step, value in validation_values(metrics, sweep.metric):
                if step not in reported and not pruned:
                    reported.add(step)
                    trial.report(value, step)
                    if not stop.requested and trial.should_prune():
                        pruned = True
                        process.send_signal(signal.SIGTERM)
            if not running:
                break
            time.sleep(POLL_SECONDS)
    except BaseException:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait()
        raise
    finally:
        stop.child = None
    seconds = time.monotonic() - started
    best = best_value(validation_values(metrics, sweep.metric), sweep.direction)
    steps = last_step(metrics)
    if pruned:
        return Outcome("PRUNED", best, steps, seconds, f"pruned at step {max(reported)}")
    if process.returncode == 0 and best is not None:
        return Outcome("COMPLETE", best, steps, seconds)
    if stop.requested:
        return Outcome("INTERRUPTED", best, steps, seconds, f"stopped at step {steps} with the sweep")
    why = "no validation value" if process.returncode == 0 else f"exit code {process.returncode}"
    return Outcome("FAIL", best, steps, seconds, f"{why}; the end of {log_path}:\n{log_tail(log_path)}")


# ----------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------


def import_optuna() -> ModuleType:
    try:
        import optuna
    except ImportError:
        raise UserError("the sweep needs optuna: pip install 'gpt[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    return optuna


@contextlib.contextmanager
def sweep_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT/sweep.lock for the life of the sweep: a second sweep on the same folder is refused, and a trial
    found RUNNING in the study is known to be left over from a sweep that was stopped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "sweep.lock").open("a+", encoding="utf-8") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            raise UserError(f"sweep.out_dir: {out_dir} is in use by a running sweep "
                            f"({lock_file.read().strip() or 'another process'})") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock_file.flush()
        yield


def open_study(optuna: ModuleType, sweep: Sweep) -> Any:
    """The sweep's study in OUT/study.db, created or loaded. The sampler's seed moves on with the trials already
    run, so a continued sweep does not draw the first trials' values again."""
    storage = f"sqlite:///{sweep.database.resolve()}"
    existing = 0
    if sweep.database.is_file() and sweep.study_name in optuna.get_all_study_names(storage):
        existing = len(optuna.load_study(study_name=sweep.study_name, storage=storage).trials)
    sampler = optuna.samplers.TPESampler(seed=sweep.seed + existing, n_startup_trials=sweep.random_trials)
    spec = sweep.pruner
    if spec["kind"] == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=spec["n_startup_trials"],
                                             n_warmup_steps=spec["n_warmup_steps"])
    elif spec["kind"] == "threshold":
        pruner = optuna.pruners.ThresholdPruner(lower=spec["lower"], upper=spec["upper"],
                                                n_warmup_steps=spec["n_warmup_steps"])
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=sweep.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=sweep.direction, load_if_exists=True)
    if study.direction.name.lower() != sweep.direction:
        raise ConfigError(f"{sweep.file}: sweep.direction: the study {sweep.study_name!r} in {sweep.database} "
                          f"{study.direction.name.lower()}s; start a new one (another study_name or out_dir)")
    return study


def trial_folder(sweep: Sweep, number: int) -> Path:
    return sweep.out_dir / f"trial-{number:03d}"


def continue_interrupted(optuna: ModuleType, study: Any, sweep: Sweep) -> None:
    """Trials left RUNNING by a sweep that was killed: recorded FAIL, and continued as new trials with the same
    values in the same run folders (queued first)."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        folder = trial.user_attrs.get("run_folder", str(trial_folder(sweep, trial.number)))
        study.enqueue_trial(trial.params, user_attrs={"continues": trial.number, "run_folder": folder})
        print(f"trial {trial.number} was running when the sweep stopped: it continues in {folder}")


def continued_numbers(trials: list[Any]) -> set[int]:
    """The trials that were interrupted and continued by another trial."""
    return {t.user_attrs["continues"] for t in trials if "continues" in t.user_attrs}


def ended(optuna: ModuleType, trials: list[Any]) -> list[Any]:
    """The trials that count toward `trials`: complete, pruned, or failed (an interrupted trial is not)."""
    states = optuna.trial.TrialState
    continued = continued_numbers(trials)
    return [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)
            or (t.state == states.FAIL and t.number not in continued)]


def run_next_trial(optuna: ModuleType, study: Any, sweep: Sweep, stop: _StopRequest) -> Outcome:
    """Ask the study for a trial (a queued continuation first), run it, tell the study how it ended."""
    states = optuna.trial.TrialState
    trial = study.ask()
    values = {param.key: param.suggest(trial) for param in sweep.params}
    continues = trial.user_attrs.get("continues")
    folder = Path(trial.user_attrs.get("run_folder", trial_folder(sweep, trial.number)))
    trial.set_user_attr("run_folder", str(folder))
    try:
        sweep.script.config(sweep.argv(values))
    except UserError as err:  # a combination of values the script refuses (each value alone was checked)
        outcome = Outcome("FAIL", None, 0, 0.0, f"the script refuses these values: {err}")
    else:
        if continues is None and is_run_folder(folder):
            study.tell(trial, state=states.FAIL)
            raise UserError(f"{folder} holds a run that {sweep.database} does not know of: move it away, "
                            f"or give the sweep another out_dir")
        try:
            outcome = run_trial(sweep, trial, values, folder, resume=continues is not None, stop=stop)
        except UserError:  # a metric the records lack, a folder another process holds: the sweep stops
            study.tell(trial, state=states.FAIL)
            raise
    for name, value in (("best", outcome.best), ("steps", outcome.steps), ("seconds", round(outcome.seconds, 1)),
                        ("note", outcome.note)):
        trial.set_user_attr(name, value)
    if outcome.state == "COMPLETE":
        study.tell(trial, outcome.best)
    else:
        study.tell(trial, state=states.PRUNED if outcome.state == "PRUNED" else states.FAIL)
    if outcome.state == "INTERRUPTED":
        study.enqueue_trial(values, user_attrs={"continues": trial.number, "run_folder": str(folder)})
    print(progress_line(trial.number, outcome, study, sweep, values), flush=True)
    return outcome


def progress_line(number: int, outcome: Outcome, study: Any, sweep: Sweep, values: dict[str, Any]) -> str:
    """"trial   3 COMPLETE loss 5.1234  best 5.0011 (trial 1)  40 steps  52 s  train.lr=0.0031 ..."."""
    value = f"{outcome.best:.4f}" if outcome.best is not None else "-"
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:  # no complete trial yet
        best = "best -"
    line = (f"trial {number:>3} {outcome.state:<11} {sweep.metric} {value}  {best}  {outcome.steps} steps  "
            f"{outcome.seconds:.0f} s  {format_values(values)}")
    return line + ("\n  " + outcome.note.replace("\n", "\n  ") if outcome.state == "FAIL" else "")


def format_values(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in values.items())


def run_sweep(sweep: Sweep) -> int:
    """Run (or continue) the sweep until `trials` trials have ended; write the reports. 0, or 128 + the signal
    that stopped it."""
    optuna = import_optuna()
    with sweep_lock(sweep.out_dir):
        study = open_study(optuna, sweep)
        continue_interrupted(optuna, study, sweep)
        done = len(ended(optuna, study.get_trials(deepcopy=False)))
        if done:
            print(f"{sweep.database}: {done} of {sweep.trials} trials already ended; the study continues")
        failures = 0
        with _StopRequest() as stop:
            while not stop.requested and len(ended(optuna, study.get_trials(deepcopy=False))) < sweep.trials:
                outcome = run_next_trial(optuna, study, sweep, stop)
                failures = failures + 1 if outcome.state == "FAIL" else 0
                complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                write_results(optuna, study, sweep)
                if failures >= FAILURES_BEFORE_GIVING_UP and not complete:
                    raise UserError(f"{failures} trials in a row failed and none completed: see their "
                                    f"{LOG_NAME} in {sweep.out_dir}")
        write_results(optuna, study, sweep, plots=True)
        if stop.requested:
            print(f"sweep stopped; {sweep.database} keeps the study. Continue it with the same command: "
                  f"python -m gpt sweep --config {sweep.file}", file=sys.stderr)
            return 128 + (stop.signum or signal.SIGTERM)
    return 0


# ----------------------------------------------------------------------------
# Results: the table, best.toml, the plots
# ----------------------------------------------------------------------------

STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "INTERRUPTED")


def result_rows(optuna: ModuleType, study: Any, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per ended or interrupted trial: complete ones best first, then pruned, failed, interrupted."""
    trials = study.get_trials(deepcopy=False)
    continued = continued_numbers(trials)
    states = optuna.trial.TrialState
    rows = []
    for t in trials:
        if t.state not in (states.COMPLETE, states.PRUNED, states.FAIL):
            continue
        state = "INTERRUPTED" if t.number in continued else t.state.name
        note = t.user_attrs.get("note", "")
        if state == "INTERRUPTED":
            by = next(c.number for c in trials if c.user_attrs.get("continues") == t.number)
            note = f"continued by trial {by}"
        rows.append({"number": t.number, "state": state, "objective": t.user_attrs.get("best"), "params": t.params,
                     "steps": t.user_attrs.get("steps"), "seconds": t.user_attrs.get("seconds"),
                     "run_folder": t.user_attrs.get("run_folder"), "note": note})
    sign = 1 if sweep.direction == "minimize" else -1
    rows.sort(key=lambda r: (STATE_ORDER.index(r["state"]), r["objective"] is None,
                             sign * (r["objective"] or 0.0), r["number"]))
    return rows


def importances(optuna: ModuleType, study: Any) -> tuple[dict[str, float], str]:
    """Each field's importance for the objective over the complete trials (fANOVA with scikit-learn installed,
    else PED-ANOVA; pruned trials have no objective to explain), and a line saying how it was found, or why
    there is none."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"Importance needs at least 2 complete trials; there are {len(complete)}."
    if importlib.util.find_spec("sklearn") is not None:  # fANOVA fits scikit-learn's random forest
        name, evaluator = "fANOVA", optuna.importance.FanovaImportanceEvaluator(seed=0)
    else:
        name, evaluator = "PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator()
    try:
        found = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError) as err:  # e.g. no field took two values yet
        return {}, f"No importance: {err}"
    return found, f"{name} over the {len(complete)} complete trials (few trials make it a rough guide)."


def best_toml(sweep: Sweep, best: Any) -> str:
    """The base config with the [overrides] and the best trial's values, as TOML the script takes with --config."""
    values = dict(best.params)
    config = sweep.script.config(sweep.argv(values))
    tables = read_toml(sweep.base_config)
    for key, value in {**sweep.overrides, **values}.items():
        section, name = key.split(".")
        table = tables.setdefault(section, {})
        typed = value if name == "preset" else getattr(config[section], name)
        if typed is None:  # TOML has no null: the field's default (None) stands
            table.pop(name, None)
        else:
            table[name] = typed
    model = f" --model {shlex.quote(sweep.model)}" if sweep.model else ""
    header = [f"The best trial of the sweep {sweep.file}: trial {best.number}, {sweep.metric} {best.value:.6g} "
              f"({best.user_attrs.get('run_folder')}).",
              f"The base config {sweep.base_config}, with the sweep's fixed [overrides] "
              f"({', '.join(sweep.overrides) or 'none'}) and the searched values ({', '.join(values)}).",
              f"python {sweep.script.path.name} --config {sweep.out_dir / 'best.toml'}{model}"]
    return toml_text(tables, header)


def toml_text(tables: dict[str, dict[str, Any]], header: list[str]) -> str:
    """Tables of scalars (and lists of scalars) as TOML, after `header` lines as comments."""
    lines = [f"# {line}" for line in header]
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"{name}: a script config holds tables only, got {type(table).__name__}")
        lines += ["", f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # finite: config fields refuse inf and nan
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are TOML's basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise UserError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def results_markdown(sweep: Sweep, rows: list[dict[str, Any]], importance: dict[str, float], note: str,
                     best: Any) -> str:
    keys = [param.key for param in sweep.params]
    counts = {state: sum(r["state"] == state for r in rows) for state in STATE_ORDER}
    lines = [f"# Sweep {sweep.file}", "",
             f"{sweep.script.path.name} on {sweep.base_config}; objective: the best validation {sweep.metric} of each "
             f"run ({sweep.direction}); {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
             f"{counts['FAIL']} failed of {sweep.trials} trials"
             + (f", {counts['INTERRUPTED']} interrupted and continued" if counts["INTERRUPTED"] else "") + ".", ""]
    if sweep.overrides:
        lines += ["Fixed for every trial: " + ", ".join(f"{k} = {cli_text(v)}" for k, v in sweep.overrides.items())
                  + ".", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {sweep.metric} {best.value:.4f} ({format_values(best.params)}); "
                  f"its config: {sweep.out_dir / 'best.toml'}.", ""]
    lines += ["| trial | state | " + sweep.metric + " | " + " | ".join(keys) + " | steps | seconds | run folder |",
              "|---:|---|---:|" + "---:|" * len(keys) + "---:|---:|---|"]
    for r in rows:
        cells = [str(r["number"]), r["state"], "-" if r["objective"] is None else f"{r['objective']:.4f}"]
        cells += [format_values({"": r["params"][k]})[1:] if k in r["params"] else "-" for k in keys]
        cells += [str(r["steps"] if r["steps"] is not None else "-"),
                  "-" if r["seconds"] is None else f"{r['seconds']:.0f}", f"{r['run_folder'] or '-'}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r for r in rows if r["note"] and r["state"] != "COMPLETE"]
    if notes:
        lines += ["", "Notes:"] + [f"- trial {r['number']}: {r['note'].splitlines()[0]}" for r in notes]
    lines += ["", "## Importance", "", note]
    if importance:
        lines += ["", "| field | importance |", "|---|---:|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in importance.items()]
    return "\n".join(lines) + "\n"


def write_results(optuna: ModuleType, study: Any, sweep: Sweep, plots: bool = False) -> None:
    """results.md, results.json and best.toml in OUT; with `plots` (and matplotlib), importance.png and
    history.png too."""
    rows = result_rows(optuna, study, sweep)
    importance, note = importances(optuna, study) if plots else ({}, "Computed when the sweep ends.")
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        best = None
    out = sweep.out_dir
    if best is not None:
        write_text(out / "best.toml", best_toml(sweep, best))
    summary = {"sweep_file": str(sweep.file), "script": sweep.script.path.name, "config": str(sweep.base_config),
               "model": sweep.model, "metric": sweep.metric, "direction": sweep.direction, "trials": sweep.trials,
               "overrides": sweep.overrides, "pruner": sweep.pruner,
               "best": None if best is None else {"number": best.number, "objective": best.value,
                                                  "params": best.params, "run_folder": best.user_attrs["run_folder"]},
               "importance": importance, "rows": rows}
    write_json(out / "results.json", summary)
    write_text(out / "results.md", results_markdown(sweep, rows, importance, note, best))
    if plots and rows:
        draw_plots(sweep, rows, importance)


def draw_plots(sweep: Sweep, rows: list[dict[str, Any]], importance: dict[str, float]) -> None:
    """history.png (each trial's objective, the best so far) and importance.png; a note without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("[no matplotlib: history.png and importance.png not drawn; pip install 'gpt[plot]' for them]",
              file=sys.stderr)
        return
    figure = Figure(figsize=(7, 4), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        shown = [r for r in rows if r["state"] == state and r["objective"] is not None]
        axes.scatter([r["number"] for r in shown], [r["objective"] for r in shown], marker=marker,
                     label="pruned (its best before it stopped)" if state == "PRUNED" else "complete")
    complete = {r["number"]: r["objective"] for r in rows if r["state"] == "COMPLETE"}
    pick = min if sweep.direction == "minimize" else max
    numbers = sorted(n for n in {r["number"] for r in rows} if complete and n >= min(complete))
    so_far = [pick(value for number, value in complete.items() if number <= n) for n in numbers]
    axes.step(numbers, so_far, where="post", color="C2", label="best so far")
    axes.set_xlabel("trial")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"best validation {sweep.metric}")
    axes.set_title(f"{sweep.file.name}: {sweep.script.path.name} on {sweep.base_config.name}")
    axes.legend()
    with atomic_target(sweep.out_dir / "history.png") as target:
        figure.savefig(target, dpi=100, format="png")
    if not importance:
        return
    figure = Figure(figsize=(7, 1 + 0.4 * len(importance)), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = list(importance)[::-1]
    axes.barh(names, [importance[name] for name in names])
    axes.set_xlabel(f"importance for the validation {sweep.metric}")
    with atomic_target(sweep.out_dir / "importance.png") as target:
        figure.savefig(target, dpi=100, format="png")


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def sweep_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=existing_file, required=True, help="the sweep file (TOML)")
    parser.add_argument("--trials", type=positive_int, default=None,
                        help="trials to end in all, instead of the file's sweep.trials (a larger number extends "
                             "a finished sweep)")
    args = parser.parse_args(argv)
    sweep = read_sweep(args.config)
    if args.trials is not None:
        sweep.trials = args.trials
    return run_sweep(sweep)
