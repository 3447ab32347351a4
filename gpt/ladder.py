"""The ladder: rungs of more data and bigger models, each rung grown from the one before it.

    python -m gpt ladder                                   # configs/ladder.toml: Botchan, minutes on a CPU
    python -m gpt ladder --config my_ladder.toml --out runs/my-ladder
    python -m gpt ladder --plan                            # each rung's pretrain.py command, nothing run

A ladder file holds the pretrain.py tables every rung shares ([model], [train], [data],
[sample], as in configs/tiny.toml), a [ladder] table (out_dir), and one [[rung]] table
per rung, run in order:

    [[rung]]                          from scratch (the default without grow/from/init)
    name = "small"                    its run folder: OUT/small
    model = { n_layer = 2 }           over the shared [model]
    train_tokens = 15000              the first N tokens of the training split (absent: all)
    max_steps = 60                    (absent: the shared train.max_steps)
    train = { lr = 3e-3 }             other [train] fields for this rung alone

    [[rung]]                          grown from another rung's best weights (gpt.grow)
    name = "deeper"
    grow = "n_layer=4"                the sizes to grow to; init = "grow" without it trains the same model on
    from = "small"                    the rung it grows from (absent: the rung before)

    [[rung]]                          the control: the model of another rung, from scratch
    name = "deeper-scratch"
    control_of = "deeper"             its model is that rung's; train_tokens and max_steps default to that rung's

Each rung is an ordinary pretrain.py run folder, OUT/<name>, trained in this process by
`pretrain.main` with the rung's settings as command-line fields (`--plan` prints them as
commands). Every rung is measured on the same validation set: the shared data file and
val_fraction, one window length, batch size and eval_batches (a ladder that would
change any of them between rungs is refused). The whole file is checked before any
rung runs; a mistake is a ConfigError naming the rung and the key.

Running again continues: a finished rung (its last evaluation at max_steps) is skipped,
an unfinished one continues from its latest checkpoint, the rest run. A rung folder
trained with settings other than the file now gives it is an error naming them. Ctrl-C
stops the rung at the end of its step, saved; the ladder stops with it.

OUT/ladder.json and OUT/ladder.md (rewritten after every rung) hold, per rung: how it
started, model and parameters, train tokens, steps, tokens seen, the validation loss at
step 0, at the end and at best, training and wall seconds, and the curve; ladder.png (with
matplotlib) draws validation loss against tokens seen for every rung. A grown rung's
tokens (and steps and training FLOPs) count those of the rungs it grew from ("chain"):
all that its source trained on, even when the best weights it starts from came earlier,
so its curve starts where its source's ended.

Grown vs scratch, for each control: the first evaluation at which the grown rung's
validation loss is at or below the control's final loss (own steps, and chain steps,
tokens and FLOPs), against the control's own steps to that loss; and whether the
control ever reaches the grown rung's final loss. Both are read at evaluations, so
they are exact to train.eval_interval steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shlex
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cli_args
from .compare import read_config
from .config import ModelConfig, Section, build_config, read_toml
from .curves import evaluations, read_metrics
from .errors import ConfigError, UserError
from .files import atomic_write, write_json, write_text
from .grow import grown_config, parse_grow_spec
from .model import GPT
from .run_folder import refuse_run_folder

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_SCRIPT = REPO / "pretrain.py"
DEFAULT_LADDER = REPO / "configs" / "ladder.toml"
DEFAULT_OUT = "runs/ladder"

INITS = ("scratch", "grow")
RUNG_KEYS = ("name", "init", "from", "grow", "control_of", "model", "train", "train_tokens", "max_steps")
RUNG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Set by the ladder for each rung: never in the shared tables or a rung's own [train].
LADDER_FIELDS = {"train.out_dir": "the rung's folder, [ladder] out_dir / name",
                 "train.resume": "always auto: an unfinished rung continues",
                 "train.max_steps": "the rung's max_steps",
                 "data.train_tokens": "the rung's train_tokens"}
# What decides the validation batches: one value for every rung, so every rung is measured on the same text.
SHARED_ONLY = {"train.batch_size": "the validation batches", "train.eval_batches": "how many validation batches"}
# A grown rung's counts continue from these of its source.
CHAIN_KEYS = ("chain_steps", "chain_tokens_seen", "chain_train_flops")
# config.json fields that do not say how a rung trains (where it is, where its start came from).
NOT_SETTINGS = ("train.out_dir", "train.resume", "init.from")

# ----------------------------------------------------------------------------
# The ladder file
# ----------------------------------------------------------------------------


@dataclass
class Rung:
    """One rung: how it starts, its model, and the pretrain.py tables it runs with."""

    index: int  # from 1, as the file orders the rungs
    name: str
    init: str  # "scratch" | "grow"
    source: str  # the rung it grows from ("" for scratch)
    grow: str  # the grow spec ("" for scratch, or a grown rung that keeps its source's shape)
    control_of: str  # the rung whose model this one trains from scratch ("" for none)
    model: ModelConfig  # the model it trains (grown: the planned grown shape)
    tables: dict[str, dict[str, Any]]  # pretrain.py's sections, as given on its command line
    config: dict[str, Section]  # the tables resolved, the model replaced by `model`

    @property
    def max_steps(self) -> int:
        return self.config["train"].max_steps

    @property
    def train_tokens(self) -> int:
        return self.config["data"].train_tokens

    @property
    def folder(self) -> Path:
        return Path(self.config["train"].out_dir)

    @property
    def started_as(self) -> str:
        if self.init == "scratch":
            return f"scratch, control of {self.control_of}" if self.control_of else "scratch"
        return f"grown from {self.source} by {self.grow}" if self.grow else f"continued from {self.source}"


@dataclass
class Ladder:
    path: Path
    out_dir: Path
    rungs: list[Rung]


def pretrain_argv(rung: Rung) -> list[str]:
    """The rung's pretrain.py arguments: every field of its tables on the command line, no config file."""
    return ["--config", "", *(arg for section, fields in rung.tables.items() for key, value in fields.items()
                              for arg in (f"--{section}.{key}", cli_text(value)))]


def cli_text(value: Any) -> str:
    """A TOML value as `--section.field` text that parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def load_pretrain() -> types.ModuleType:
    """pretrain.py, the script beside this package, as a module (the one already imported, if it is)."""
    module = sys.modules.get("pretrain")
    if module is not None and Path(module.__file__ or "").resolve() == PRETRAIN_SCRIPT:
        return module
    if not PRETRAIN_SCRIPT.is_file():
        raise UserError(f"the ladder trains with pretrain.py, which is not at {PRETRAIN_SCRIPT} (run it from a "
                        f"checkout of the repository)")
    spec = importlib.util.spec_from_file_location("pretrain", PRETRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain"] = module
    spec.loader.exec_module(module)
    return module


def table(value: Any, key: str) -> dict[str, Any]:
    """`value` when it is a table; else a ConfigError naming `key`."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
    return value


def text_field(rung: dict[str, Any], name: str, key: str) -> str:
    """rung[name] as a string ("" when absent); else a ConfigError naming `key`."""
    value = rung.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def count_field(rung: dict[str, Any], name: str, key: str) -> int | None:
    """rung[name] as a positive integer (None when absent); else a ConfigError naming `key`."""
    value = rung.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def refuse_ladder_fields(tables: dict[str, dict[str, Any]], where: str, also: dict[str, str]) -> None:
    """A ConfigError for a field the ladder sets itself (or, with `also`, that must be shared) in `tables`."""
    for section, fields in tables.items():
        for key in fields:
            name = f"{section}.{key}"
            if name in LADDER_FIELDS:
                raise ConfigError(f"{where}{name}: set by the ladder ({LADDER_FIELDS[name]})")
            if name in also:
                raise ConfigError(f"{where}{name}: decides {also[name]}, the same for every rung; set it in the "
                                  f"shared [{section}] table")


def read_ladder(path: str | Path, out_dir: Path | None = None) -> Ladder:
    """The ladder file at `path`, every rung checked and planned (see the module docstring);
    `out_dir` replaces [ladder] out_dir."""
    path = Path(path)
    try:
        return parse_ladder(read_toml(path), path, out_dir)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_ladder(toml: dict[str, Any], path: Path, out_dir: Path | None = None) -> Ladder:
    """The ladder a parsed ladder file describes; ConfigErrors name the key (`[[rung]] 2 (deeper).grow: ...`)."""
    sections = load_pretrain().SECTIONS
    shareable = [name for name in sections if name != "init"]
    for name in toml:
        if name not in ("ladder", "rung", *shareable):
            raise ConfigError(f"{name}: unknown table; a ladder file has [ladder], [[rung]] and the pretrain.py "
                              f"tables every rung shares: {', '.join(f'[{s}]' for s in shareable)}")
    settings = table(toml.get("ladder", {}), "ladder")
    for key in settings:
        if key != "out_dir":
            raise ConfigError(f"ladder.{key}: unknown field; known fields: out_dir")
    out = out_dir or Path(text_field(settings, "out_dir", "ladder.out_dir") or DEFAULT_OUT)
    shared = {name: dict(table(toml[name], name)) for name in shareable if name in toml}
    refuse_ladder_fields(shared, "", {})
    rung_tables = toml.get("rung")
    if not isinstance(rung_tables, list) or not rung_tables:
        raise ConfigError("rung: no rungs; give one [[rung]] table per rung (name, and a model or a grow spec)")
    rungs: list[Rung] = []
    for index, entry in enumerate(rung_tables, start=1):
        where = f"[[rung]] {index}"
        entry = table(entry, where)
        name = text_field(entry, "name", f"{where}.name")
        where = f"{where} ({name})" if name else where
        rungs.append(parse_rung(entry, index, where, shared, rungs, rung_tables, out))
    check_same_validation(rungs)
    return Ladder(path, out, rungs)


def parse_rung(entry: dict[str, Any], index: int, where: str, shared: dict[str, dict[str, Any]],
               before: list[Rung], all_entries: list[Any], out_dir: Path) -> Rung:
    """One [[rung]] table, checked against the rungs `before` it (`all_entries`: every rung table, for names
    that come later); its run folder is out_dir/name."""
    for key in entry:
        if key not in RUNG_KEYS:
            raise ConfigError(f"{where}.{key}: unknown field; known fields: {', '.join(RUNG_KEYS)}")
    name = text_field(entry, "name", f"{where}.name")
    if not RUNG_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: {name!r} is not a folder name (letters, digits, '.', '_', '-'; "
                          f"not starting with '.' or '-')" if name else f"{where}.name: missing; every rung has one")
    if any(r.name == name for r in before):
        raise ConfigError(f"{where}.name: {name!r} is the name of an earlier rung too")
    source, grow, control_of = (text_field(entry, key, f"{where}.{key}") for key in ("from", "grow", "control_of"))
    init = text_field(entry, "init", f"{where}.init") or ("grow" if grow or source else "scratch")
    if init not in INITS:
        raise ConfigError(f"{where}.init: must be one of {', '.join(INITS)}; got {init!r}")
    own_model = dict(table(entry.get("model", {}), f"{where}.model"))
    own_train = dict(table(entry.get("train", {}), f"{where}.train"))
    refuse_ladder_fields({"train": own_train}, f"{where}.", SHARED_ONLY)
    max_steps = count_field(entry, "max_steps", f"{where}.max_steps")
    train_tokens = count_field(entry, "train_tokens", f"{where}.train_tokens")

    if init == "grow":
        if control_of:
            raise ConfigError(f"{where}.control_of: a control trains from scratch; this rung grows (init grow)")
        if own_model:
            raise ConfigError(f"{where}.model: a grown rung's model is its source's, grown by its grow spec")
        source, model = grown_model(where, index, source, grow, before)
    elif source or grow:
        raise ConfigError(f"{where}.{'from' if source else 'grow'}: only a grown rung (init grow) has one; "
                          f"this one starts from scratch")
    elif control_of:
        if own_model:
            raise ConfigError(f"{where}.model: a control trains the model of {control_of}; it has no model of its own")
        target = control_target(where, name, control_of, before, all_entries)
        model = target.model
        max_steps = max_steps or target.max_steps
        train_tokens = train_tokens or target.train_tokens or None
    tables = {section: dict(fields) for section, fields in shared.items()}
    tables["train"] = {**tables.get("train", {}), **own_train}
    if max_steps:
        tables["train"]["max_steps"] = max_steps
    tables["train"].update(out_dir=str(out_dir / name), resume="auto")
    if train_tokens:
        tables["data"] = {**tables.get("data", {}), "train_tokens": train_tokens}
    if init == "grow":
        tables.pop("model", None)
        tables["init"] = {"from": str(out_dir / source), **({"grow": grow} if grow else {})}
    elif control_of:
        tables["model"] = model.to_dict()
    else:
        tables["model"] = {**tables.get("model", {}), **own_model}
    try:
        config = build_config(load_pretrain().SECTIONS, tables)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if init == "scratch" and not control_of:
        model = config["model"]
    config["model"] = model
    if config["train"].patience:
        raise ConfigError(f"{where}: train.patience {config['train'].patience}: the ladder compares rungs at the "
                          f"step budgets they are given; early stopping would cut them short")
    return Rung(index, name, init, source, grow, control_of, model, tables, config)


def grown_model(where: str, index: int, source: str, grow: str, before: list[Rung]) -> tuple[str, ModelConfig]:
    """(the rung a grown rung grows from, its model grown by `grow`), checked against the rungs `before` it."""
    if index == 1 and not source:
        raise ConfigError(f"{where}.init: the first rung has no rung before it to grow from")
    source = source or before[-1].name
    sources = [r for r in before if r.name == source]
    if not sources:
        raise ConfigError(f"{where}.from: {source!r} is not an earlier rung "
                          f"(earlier: {', '.join(r.name for r in before) or 'none'})")
    model = sources[0].model
    if not grow:
        return source, model
    sizes = parse_grow_spec(grow, f"{where}.grow")
    if sizes.get("context_length", model.context_length) != model.context_length:
        raise ConfigError(f"{where}.grow: context_length cannot grow in a ladder: the validation windows would "
                          f"change with it")
    try:
        return source, grown_config(model, sizes)
    except UserError as err:
        raise ConfigError(f"{where}.{err}") from None


def control_target(where: str, name: str, control_of: str, before: list[Rung], all_entries: list[Any]) -> Rung:
    """The grown rung a control named `name` trains the model of: an earlier rung of the ladder."""
    if control_of == name or control_of not in [e.get("name") for e in all_entries if isinstance(e, dict)]:
        raise ConfigError(f"{where}.control_of: {control_of!r} is not another rung of this ladder")
    target = next((r for r in before if r.name == control_of), None)
    if target is None:
        raise ConfigError(f"{where}.control_of: {control_of!r} comes after this rung; put the control after it")
    if target.init != "grow":
        raise ConfigError(f"{where}.control_of: {control_of!r} starts from scratch itself; a control is the "
                          f"from-scratch twin of a grown rung")
    return target


def window(rung: Rung) -> int:
    """The length of the rung's training and validation windows."""
    try:
        return rung.config["data"].window_for(rung.model.context_length)
    except ConfigError as err:
        raise ConfigError(f"[[rung]] {rung.index} ({rung.name}): {err}") from None


def check_same_validation(rungs: list[Rung]) -> None:
    """Every rung scores the same validation windows: one text, split, window length and set of batches."""
    first = rungs[0]
    reference = {"data.path": first.config["data"].path, "data.val_fraction": first.config["data"].val_fraction,
                 "window": window(first), "train.batch_size": first.config["train"].batch_size,
                 "train.eval_batches": first.config["train"].eval_batches}
    for rung in rungs[1:]:
        values = {"data.path": rung.config["data"].path, "data.val_fraction": rung.config["data"].val_fraction,
                  "window": window(rung), "train.batch_size": rung.config["train"].batch_size,
                  "train.eval_batches": rung.config["train"].eval_batches}
        for key, value in values.items():
            if value != reference[key]:
                what = "the window length (data.window, else the model's context_length)" if key == "window" else key
                raise ConfigError(f"[[rung]] {rung.index} ({rung.name}): {what} is {value}, but {reference[key]} for "
                                  f"{first.name}: every rung is measured on the same validation windows")


# ----------------------------------------------------------------------------
# Running the rungs
# ----------------------------------------------------------------------------


def last_step(folder: Path) -> int | None:
    """The step of the rung folder's last evaluation (None: no evaluation yet)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [record["step"] for record in evaluations(read_metrics(path))]
    return steps[-1] if steps else None


def is_finished(rung: Rung, folder: Path) -> bool:
    """Whether the rung's run reached its max_steps (a training run's last step always has an evaluation)."""
    step = last_step(folder)
    return step is not None and step >= rung.max_steps


def check_settings(rung: Rung, folder: Path) -> None:
    """A UserError when the rung's folder holds a run trained with other settings than the ladder now gives it."""
    path = folder / "config.json"
    if not path.is_file():
        return
    saved = read_config(path)
    differences = [f"{section}.{key} {saved[section][key]!r} there, {value!r} now"
                   for section, values in rung.config.items() for key, value in values.to_dict().items()
                   if f"{section}.{key}" not in NOT_SETTINGS and key in saved.get(section, {})
                   and saved[section][key] != value]
    if differences:
        raise UserError(f"{folder}: this rung was trained with other settings than {rung.name} has now "
                        f"({'; '.join(differences[:3])}); remove the folder to train the rung again (and the rungs "
                        f"grown from it), or restore the settings")


def earlier_wall_seconds(out_dir: Path) -> dict[str, float]:
    """Per rung, the wall seconds earlier runs of the ladder spent on it, as OUT/ladder.json has them ({} when
    there is none to read)."""
    try:
        rungs = json.loads((out_dir / "ladder.json").read_text(encoding="utf-8"))["rungs"]
        return {rung["name"]: float(rung["wall_seconds"]) for rung in rungs if rung.get("wall_seconds")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_ladder(ladder: Ladder) -> int:
    """Train every rung not finished yet, in order, writing the summary after each; returns an exit code
    (non-zero when a signal stopped a rung: it is saved, and running the ladder again continues it).

    A rung's wall seconds add up over the runs of the ladder that trained it (a resumed rung's both parts)."""
    pretrain = load_pretrain()
    started = time.perf_counter()
    wall_seconds = earlier_wall_seconds(ladder.out_dir)
    for rung in ladder.rungs:
        folder = rung.folder
        check_settings(rung, folder)
        if is_finished(rung, folder):
            print(f"[ladder] {rung.index}/{len(ladder.rungs)} {rung.name}: finished before ({folder}); skipped")
            continue
        step = last_step(folder)
        earlier = wall_seconds.get(rung.name, 0.0) if step is not None else 0.0  # a fresh start counts from 0
        print(f"[ladder] {rung.index}/{len(ladder.rungs)} {rung.name}: {rung.started_as}, {rung.max_steps} steps"
              f"{f', continuing its run (last evaluated at step {step})' if step else ''}\n"
              f"         python pretrain.py {shlex.join(pretrain_argv(rung))}", flush=True)
        rung_started = time.perf_counter()
        try:
            exit_code = pretrain.main(pretrain_argv(rung))
        except UserError as err:
            raise UserError(f"rung {rung.name}: {err}") from None
        wall_seconds[rung.name] = earlier + time.perf_counter() - rung_started
        write_summary(ladder, wall_seconds, time.perf_counter() - started)
        if exit_code:
            print(f"[ladder] stopped during {rung.name} (saved): run the same command again to continue",
                  file=sys.stderr)
            return exit_code
    summary = write_summary(ladder, wall_seconds, time.perf_counter() - started)
    print(markdown(summary))
    print(f"[ladder] wrote {ladder.out_dir / 'ladder.md'}, ladder.json and ladder.png")
    return 0


# ----------------------------------------------------------------------------
# The summary: ladder.json, ladder.md, ladder.png
# ----------------------------------------------------------------------------


def flops_per_token(model: ModelConfig, window_length: int) -> float:
    """Training FLOPs per token of `model` on windows of `window_length` (GPT.flops_per_token)."""
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        return GPT(model).flops_per_token(window_length)


def parameters(model: ModelConfig) -> int:
    with torch.device("meta"):
        return GPT(model).num_parameters()


def rung_summary(ladder: Ladder, rung: Rung, chain: dict[str, dict[str, Any]],
                 wall_seconds: float | None) -> dict[str, Any]:
    """What ladder.json says of one rung, from its folder's metrics.jsonl; `chain` holds the earlier rungs'
    summaries (a grown rung's counts start where its source's ended)."""
    folder = rung.folder
    metrics = folder / "metrics.jsonl"
    evals = [e for e in evaluations(read_metrics(metrics)) if "tokens_seen" in e] if metrics.is_file() else []
    offset = chain[rung.source] if rung.init == "grow" else dict.fromkeys(CHAIN_KEYS, 0)
    per_token = flops_per_token(rung.model, window(rung))
    curve = [{"step": e["step"], "tokens_seen": e["tokens_seen"], "loss": e["loss"],
              "chain_steps": offset["chain_steps"] + e["step"],
              "chain_tokens_seen": offset["chain_tokens_seen"] + e["tokens_seen"],
              "chain_train_flops": offset["chain_train_flops"] + per_token * e["tokens_seen"]} for e in evals]
    last = curve[-1] if curve else {"step": 0, "tokens_seen": 0, **{key: offset[key] for key in CHAIN_KEYS}}
    trained = [point["loss"] for point in curve if point["step"] > 0 and math.isfinite(point["loss"])]
    final_eval = evals[-1] if evals else {}
    shape = rung.model
    return {
        "name": rung.name, "init": rung.init, "started_as": rung.started_as, "source": rung.source or None,
        "grow": rung.grow or None, "control_of": rung.control_of or None, "run_folder": str(folder),
        "status": "finished" if is_finished(rung, folder) else ("unfinished" if curve else "not started"),
        "model": {key: getattr(shape, key) for key in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff",
                                                        "context_length")},
        "parameters": parameters(shape), "train_tokens": rung.train_tokens or None, "max_steps": rung.max_steps,
        "steps": last["step"], "tokens_seen": last["tokens_seen"], "chain_steps": last["chain_steps"],
        "chain_tokens_seen": last["chain_tokens_seen"], "flops_per_token": per_token,
        "chain_train_flops": last["chain_train_flops"],
        "val_loss_step0": curve[0]["loss"] if curve and curve[0]["step"] == 0 else None,
        "val_loss_final": curve[-1]["loss"] if curve else None,
        "val_loss_best": min(trained) if trained else None,
        "train_seconds": final_eval["tokens_seen"] / final_eval["tokens_per_s"]
        if final_eval.get("tokens_per_s") else None,
        "wall_seconds": wall_seconds if curve else None, "curve": curve,
    }


def first_reaching(curve: list[dict[str, Any]], loss: float) -> dict[str, Any] | None:
    """The first evaluation of `curve` at or below `loss` (None: none is)."""
    return next((point for point in curve if point["loss"] <= loss), None)


def comparison(grown: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """Grown vs scratch: the steps, tokens and FLOPs each took to the other's final validation loss."""
    target, grown_final = control["val_loss_final"], grown["val_loss_final"]
    grown_point = first_reaching(grown["curve"], target)
    control_point = first_reaching(control["curve"], target)
    reverse = first_reaching(control["curve"], grown_final)
    same_steps = next((point for point in control["curve"] if point["step"] == grown["steps"]), None)
    keys = ("step", "tokens_seen", "chain_steps", "chain_tokens_seen", "chain_train_flops")
    return {
        "grown": grown["name"], "control": control["name"], "control_final_loss": target,
        "grown_final_loss": grown_final,
        "grown_reaches_control_final": {key: grown_point[key] for key in keys} if grown_point else None,
        "control_reaches_own_final": {key: control_point[key] for key in keys} if control_point else None,
        "control_reaches_grown_final": {key: reverse[key] for key in keys} if reverse else None,
        "control_loss_at_grown_steps": same_steps["loss"] if same_steps else None,
        "sentence": comparison_sentence(grown, control, grown_point, control_point, reverse, same_steps),
    }


def comparison_sentence(grown: dict[str, Any], control: dict[str, Any], grown_point: dict[str, Any] | None,
                        control_point: dict[str, Any] | None, reverse: dict[str, Any] | None,
                        same_steps: dict[str, Any] | None) -> str:
    """The comparison in words, as ladder.md gives it: each side's cost (chain steps, tokens, FLOPs) to the
    other's final loss, or that it never got there; and the control's loss after as many steps as the grown
    rung's own (`same_steps`: its evaluation then, if it had one)."""
    target, grown_final = control["val_loss_final"], grown["val_loss_final"]

    def cost(point: dict[str, Any]) -> str:
        return (f"{point['chain_steps']:,} steps, {point['chain_tokens_seen']:,} tokens, "
                f"{point['chain_train_flops']:.3g} training FLOPs")

    grown_name = f"{grown['name']} ({grown['started_as']})"
    if grown_point is None:
        forward = (f"{grown_name} did not reach the from-scratch {control['name']}'s final validation loss "
                   f"{target:.4f} (its best: {grown['val_loss_best']:.4f})")
    else:
        forward = (f"{grown_name} reached the from-scratch {control['name']}'s final validation loss {target:.4f} at "
                   f"its step {grown_point['step']:,}, {cost(grown_point)} counting the rungs it grew from")
    if control_point is not None:
        forward += f"; {control['name']} took {cost(control_point)}"
    end = grown["curve"][-1]
    if reverse is None:
        backward = (f"{control['name']} never reached {grown['name']}'s final loss {grown_final:.4f} in its "
                    f"{control['steps']:,} steps")
    else:
        backward = (f"{control['name']} reached {grown['name']}'s final loss {grown_final:.4f} at its step "
                    f"{reverse['step']:,} ({cost(reverse)}), where {grown['name']} took {cost(end)}")
    sentence = f"{forward}. {backward}."
    if same_steps is not None:
        sentence += (f" After {grown['steps']:,} steps, as many as {grown['name']}'s own, {control['name']} was at "
                     f"{same_steps['loss']:.4f}.")
    return sentence


def summary_of(ladder: Ladder, wall_seconds: dict[str, float], this_run_seconds: float) -> dict[str, Any]:
    """ladder.json's content, read from the rung folders."""
    rungs: dict[str, dict[str, Any]] = {}
    for rung in ladder.rungs:
        rungs[rung.name] = rung_summary(ladder, rung, rungs, wall_seconds.get(rung.name))
    comparisons = [comparison(rungs[rung.control_of], rungs[rung.name]) for rung in ladder.rungs
                   if rung.control_of and rungs[rung.name]["curve"] and rungs[rung.control_of]["curve"]]
    first = ladder.rungs[0].config
    return {
        "ladder": str(ladder.path), "out_dir": str(ladder.out_dir),
        "validation": {"data": first["data"].path, "val_fraction": first["data"].val_fraction,
                       "window": window(ladder.rungs[0]), "batch_size": first["train"].batch_size,
                       "eval_batches": first["train"].eval_batches},
        "wall_seconds": sum(rung["wall_seconds"] or 0.0 for rung in rungs.values()),
        "this_run_seconds": this_run_seconds, "rungs": list(rungs.values()), "comparisons": comparisons,
    }


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    """ladder.md: the rungs' table and the grown-vs-scratch lines."""
    validation = summary["validation"]
    lines = [f"# Ladder: {summary['ladder']}", "",
             f"Validation loss on the same windows for every rung: the first {validation['eval_batches']} batches of "
             f"{validation['batch_size']} windows of {validation['window']} tokens of the validation split of "
             f"{validation['data']} (val_fraction {validation['val_fraction']}). A grown rung starts from the best "
             f"weights of its source; its chain counts (steps, tokens) include the rungs it grew from.", "",
             "| rung | start | layers x d_model | parameters | train tokens | steps | tokens seen | chain tokens "
             "| val loss step 0 | final | best | train s | wall s | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rung in summary["rungs"]:
        seconds = " | ".join("-" if rung[key] is None else f"{rung[key]:.0f}" for key in ("train_seconds",
                                                                                          "wall_seconds"))
        lines.append(
            f"| {rung['name']} | {rung['started_as']} | {rung['model']['n_layer']} x {rung['model']['d_model']} "
            f"| {rung['parameters']:,} | {'all' if rung['train_tokens'] is None else format(rung['train_tokens'], ',')} "
            f"| {rung['steps']:,} | {rung['tokens_seen']:,} | {rung['chain_tokens_seen']:,} "
            f"| {_number(rung['val_loss_step0'])} | {_number(rung['val_loss_final'])} "
            f"| {_number(rung['val_loss_best'])} | {seconds} | {rung['status']} |")
    if summary["comparisons"]:
        lines += ["", "## Grown vs scratch", "", "Read at evaluations (every train.eval_interval steps).", ""]
        lines += [f"- {entry['sentence']}" for entry in summary["comparisons"]]
    lines += ["", f"Wall time of the rungs: {summary['wall_seconds']:.0f} s (this run of the ladder: "
                  f"{summary['this_run_seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def write_plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Validation loss against chain tokens seen, a line per rung, as a PNG at `path`; None (with a note)
    without matplotlib or before any evaluation."""
    curves = [rung for rung in summary["rungs"] if rung["curve"]]
    if not curves:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        print(f"[no matplotlib: {path.name} not drawn; pip install 'gpt[plot]' for the plot]", file=sys.stderr)
        return None
    figure = Figure(figsize=(9, 5.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for rung in curves:
        points = [p for p in rung["curve"] if math.isfinite(p["loss"])]
        axes.plot([p["chain_tokens_seen"] for p in points], [p["loss"] for p in points], marker="o", markersize=3,
                  linestyle="--" if rung["init"] == "scratch" and rung["control_of"] else "-",
                  label=f"{rung['name']}: {rung['started_as']}, {rung['parameters'] / 1e6:.2f}M parameters")
    axes.xaxis.set_major_formatter(EngFormatter())
    axes.set_xlabel("tokens seen (a grown rung's include those of the rungs it grew from)")
    axes.set_ylabel("validation loss")
    axes.set_title(f"ladder {Path(summary['ladder']).name}: validation loss, the same windows for every rung")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    return path


def write_summary(ladder: Ladder, wall_seconds: dict[str, float], this_run_seconds: float) -> dict[str, Any]:
    """OUT/ladder.json, ladder.md and ladder.png from the rung folders as they are now; returns the summary."""
    summary = summary_of(ladder, wall_seconds, this_run_seconds)
    write_json(ladder.out_dir / "ladder.json", summary)
    write_text(ladder.out_dir / "ladder.md", markdown(summary))
    write_plot(summary, ladder.out_dir / "ladder.png")
    return summary


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpt ladder", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train rungs of growing data and model, each grown from the one before (or from scratch), "
                    "all measured on one validation set; write ladder.md, ladder.json and ladder.png.",
        epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--config", default=str(DEFAULT_LADDER),
                        help=f"the ladder file (default: {DEFAULT_LADDER.relative_to(REPO)})")
    parser.add_argument("--out", type=cli_args.output_folder, default=None,
                        help="the ladder's folder, rung folders inside (default: [ladder] out_dir of the file)")
    parser.add_argument("--plan", action="store_true", help="print each rung's pretrain.py command; train nothing")
    return parser


def ladder_cli(argv: list[str]) -> int:
    """`python -m gpt ladder`: see `--help` and the module docstring."""
    args = build_parser().parse_args(argv)
    ladder = read_ladder(args.config, args.out)
    refuse_run_folder(ladder.out_dir, "ladder.out_dir")
    if args.plan:
        for rung in ladder.rungs:
            print(f"# {rung.index} {rung.name}: {rung.started_as}, {rung.model.n_layer} x {rung.model.d_model}, "
                  f"{parameters(rung.model):,} parameters\npython pretrain.py {shlex.join(pretrain_argv(rung))}")
        return 0
    return run_ladder(ladder)
