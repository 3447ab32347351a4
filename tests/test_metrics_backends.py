"""TensorBoard and Weights & Biases receive what metrics.jsonl holds: a real run's files read back.

TensorBoard's event file is read with TensorBoard's own EventAccumulator. W&B runs in
offline mode (nothing leaves the machine, no login) and its run file (run-<id>.wandb) is
read here: a sequence of `wandb.proto` Record messages in W&B's LevelDB-style log
format (a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header:
checksum, length, type), the format `wandb sync` uploads from.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import pretrain

SMALL_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "2",
    "--train.warmup_steps", "2", "--train.dtype", "float32", "--sample.max_new_tokens", "3",
    "--train.max_steps", "6", "--train.eval_interval", "3",
]


def run(out_dir: Path, corpus: Path, *extra: str) -> None:
    assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(out_dir), *extra]) == 0


def logged_scalars(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the backends should have it: "split/name" -> [(step, value)] in order."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for record in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key not in ("step", "split"):
                scalars.setdefault(f"{record['split']}/{key}", []).append((record["step"], value))
    return scalars


def test_tensorboard_scalars_are_the_metrics(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, corpus, "--train.tensorboard", "true")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = logged_scalars(tmp_path)
    assert {"train/loss", "train/lr", "train/tokens", "val/loss", "val/ppl", "val/tokens_seen"} <= set(expected)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():  # TensorBoard keeps 32-bit floats
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(step, float(np.float32(v))) for step, v in points]
    assert [step for step, _ in expected["train/loss"]] == [2, 4, 6]


def wandb_records(path: Path) -> list:
    """The Record messages of a .wandb run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    block, header = 32768, 7
    records, pending, position = [], b"", header
    while position + header <= len(data):
        if block - position % block < header:  # too little room left in the block for a chunk header: padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        position += header
        if kind == 0 and length == 0:  # zero padding to the end of the block
            position += block - position % block
            continue
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, silent, with its settings and caches in the test's folder; its service stopped after."""
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    wandb.teardown()


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, corpus, offline_wandb):
    out_dir = tmp_path / "run"
    run(out_dir, corpus, "--train.wandb_project", "test")
    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)

    history: dict[int, dict] = {}  # step -> {key: value}; a step's train and val records share one row
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    expected = logged_scalars(out_dir)
    got = {key: [(step, row[key]) for step, row in sorted(history.items()) if key in row] for key in expected}
    assert got == expected  # the same float64 numbers, at the same steps
    assert {key for row in history.values() for key in row if not key.startswith("_")} == set(expected)

    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.project == "test"
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert {k: v for k, v in config.items() if not k.startswith("_")} == json.loads((out_dir / "config.json").read_text())
