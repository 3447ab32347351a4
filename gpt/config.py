"""Configuration: dataclasses are the single source of truth.

`ModelConfig` describes a transformer (GPT-2 family and Llama family from one
vocabulary of field names); `TrainConfig` and `DataConfig` describe a training
run. A run's config is built in three layers, each overriding the one before:

1. the dataclass defaults (and, for the model, an optional named preset),
2. a TOML file (`--config FILE`) with one table per section (`[model]`, `[train]`, ...),
3. command-line overrides `--section.field value` (e.g. `--model.n_layer 4`).

Unknown sections or fields, wrong types and invalid values raise `ConfigError`
with a message naming the key, e.g. `model.n_head: d_model (768) must be divisible by n_head (5)`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import write_json

# The linear layers of gpt.model that can take a LoRA adapter (gpt.lora checks the same names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj")

# Seeds are below this: numpy's global generator takes no larger one.
SEED_LIMIT = 2**32

# ----------------------------------------------------------------------------
# Typed dataclass machinery shared by every config section
# ----------------------------------------------------------------------------


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """The runtime types a field annotation admits: `int | None` -> (int, NoneType)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(arg for arg in typing.get_args(annotation))
    return (annotation,)


def _coerce(section: str, name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type; an int is accepted where a float is expected.

    A float must be finite: no field means anything by nan or inf.
    """
    allowed = _allowed_types(annotation)
    if isinstance(value, bool):  # bool is a subclass of int: only accept it for bool fields
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        if not math.isfinite(value):
            raise ConfigError(f"{section}.{name}: must be a finite number, got {value}")
        return float(value)
    elif value is None and type(None) in allowed:
        return None
    elif isinstance(value, str) and str in allowed:
        return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{section}.{name}: expected {names}, got {type(value).__name__} {value!r}")


def _parse_cli_value(section: str, name: str, text: str, annotation: Any) -> Any:
    """Turn a command-line string into the field's type (`--train.compile true`, `--model.n_kv_head none`)."""
    allowed = _allowed_types(annotation)
    lowered = text.strip().lower()
    if type(None) in allowed and lowered in ("none", "null"):
        return None
    if bool in allowed:
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{section}.{name}: expected true or false, got {text!r}")
    if int in allowed:
        try:
            return int(text)
        except ValueError:
            if float not in allowed:
                raise ConfigError(f"{section}.{name}: expected int, got {text!r}") from None
    if float in allowed:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{section}.{name}: expected float, got {text!r}") from None
    return text


def check_seed(key: str, seed: int) -> None:
    """A ConfigError naming `key` unless `seed` is in [0, 2**32), the seeds every generator takes."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{key}: must be in [0, 2**32), got {seed}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """A ConfigError naming `key` ("data.format") unless `value` is one of `choices`.

    Every set of choices is checked by this one function, next to where the choices are
    defined, both in the config section and in the library function that takes the value.
    """
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")


class Section:
    """Base for config sections: type checking on construction, dict round trip.

    A field is known by its name, or by the `key` of its metadata where the name cannot be
    the key: `from_ = field(metadata={"key": "from"})` is `from` in TOML, JSON and on the
    command line (`--init.from`), `from` being a word Python keeps for itself.
    """

    section_name: typing.ClassVar[str] = ""

    @classmethod
    def fields_by_key(cls) -> dict[str, dataclasses.Field]:
        """Each field under the key config files and the command line use for it."""
        return {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for key, f in self.fields_by_key().items():
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(self.section_name, key, value, hints[f.name]))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Section:
        """Build from a dict (TOML table, JSON object); unknown keys are errors naming the key."""
        return cls(**{cls.check_field_name(key).name: value for key, value in values.items()})

    @classmethod
    def check_field_name(cls, key: str) -> dataclasses.Field:
        """The field `key` names; an unknown key is a ConfigError listing the known ones."""
        fields = cls.fields_by_key()
        if key not in fields:
            raise ConfigError(f"{cls.section_name}.{key}: unknown field; known fields: {', '.join(fields)}")
        return fields[key]

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, f.name) for key, f in self.fields_by_key().items()}

    @classmethod
    def field_help(cls) -> list[str]:
        """One line per field for `--help`: key, type, default and the field's description."""
        hints = typing.get_type_hints(cls)
        own = cls.__dict__.get("__annotations__", {})
        lines = []
        for key, f in sorted(cls.fields_by_key().items(), key=lambda item: item[1].name not in own):
            default = f.default if f.default is not dataclasses.MISSING else None
            type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"  --{cls.section_name}.{key} {type_name} (default {default!r})  {f.metadata.get('help', '')}")
        return lines


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


# ModelConfig fields that choose how the model computes or trains, not what it is: the same weights fit any value.
IMPLEMENTATION_FIELDS = ("dropout", "attn_impl", "loss_impl")


@dataclass
class ModelConfig(Section):
    """The shape of a transformer; the GPT-2 and Llama families differ only in these values."""

    section_name: typing.ClassVar[str] = "model"

    vocab_size: int = field(default=50257, metadata={"help": "rows of the token embedding / LM head"})
    context_length: int = field(default=1024, metadata={"help": "longest sequence the model sees"})
    d_model: int = field(default=768, metadata={"help": "width of the residual stream"})
    n_layer: int = field(default=12, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=12, metadata={"help": "query heads per attention layer"})
    n_kv_head: int | None = field(default=None, metadata={"help": "key/value heads (grouped-query); None = n_head"})
    d_ff: int | None = field(default=None, metadata={"help": "hidden width of the MLP; None = 4 * d_model"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon inside the norms"})
    pos_emb: str = field(default="learned", metadata={"help": "learned | rope"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    mlp: str = field(default="gelu", metadata={"help": "gelu (GPT-2, tanh approximation) | swiglu (Llama)"})
    bias: bool = field(default=True, metadata={"help": "biases in linear layers and LayerNorm"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, attention and residuals"})
    tie_embeddings: bool = field(default=True, metadata={"help": "LM head shares the token embedding matrix"})
    attn_impl: str = field(default="sdpa", metadata={"help": "manual (plain tensor code) | sdpa (fused kernel)"})
    loss_impl: str = field(default="fused", metadata={
        "help": "plain (cross-entropy of the full logits) | fused (chunked head + loss, no logits tensor)"})

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "context_length", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ConfigError(f"model.n_head: d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ConfigError(
                f"model.n_kv_head: n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        if self.pos_emb == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(f"model.pos_emb: rope needs an even head_dim, got {self.head_dim}")
        check_choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice("model.pos_emb", self.pos_emb, ("learned", "rope"))
        check_choice("model.mlp", self.mlp, ("gelu", "swiglu"))
        check_choice("model.attn_impl", self.attn_impl, ("manual", "sdpa"))
        check_choice("model.loss_impl", self.loss_impl, ("plain", "fused"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """"n_layer 4 vs 2" for each field of the architecture where `other` differs from this config;
        how the model computes or trains (IMPLEMENTATION_FIELDS) does not count."""
        return [f"{key} {value} vs {getattr(other, key)}" for key, value in self.to_dict().items()
                if key not in IMPLEMENTATION_FIELDS and value != getattr(other, key)]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named architecture, optionally with some fields changed: `ModelConfig.preset("tiny", n_layer=2)`."""
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        # Merge before resolving, so derived fields (d_ff, n_kv_head) follow overridden ones (d_model, n_head).
        return cls.from_dict({**PRESETS[name], **overrides})  # type: ignore[return-value]


def _gpt2(n_layer: int, n_head: int, d_model: int) -> dict[str, Any]:
    return dict(vocab_size=50257, context_length=1024, d_model=d_model, n_layer=n_layer, n_head=n_head)


PRESETS: dict[str, dict[str, Any]] = {
    # A model small enough to train on a laptop CPU in minutes (GPT-2 tokenizer and architecture).
    "tiny": dict(vocab_size=50257, context_length=256, d_model=256, n_layer=4, n_head=4),
    "gpt2-124m": _gpt2(12, 12, 768),
    "gpt2-355m": _gpt2(24, 16, 1024),
    "gpt2-774m": _gpt2(36, 20, 1280),
    "gpt2-1558m": _gpt2(48, 25, 1600),
    # SmolLM2-135M: Llama architecture with grouped-query attention and a tied head.
    "smollm2-135m": dict(
        vocab_size=49152, context_length=8192, d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536,
        norm="rmsnorm", norm_eps=1e-5, pos_emb="rope", rope_theta=100000.0, mlp="swiglu", bias=False,
        tie_embeddings=True,
    ),
}


# ----------------------------------------------------------------------------
# Training and data
# ----------------------------------------------------------------------------


@dataclass
class TrainConfig(Section):
    """How a run trains: optimizer, schedule, batch, evaluation, checkpoints, logging."""

    section_name: typing.ClassVar[str] = "train"

    out_dir: str = field(default="", metadata={"help": "run folder; empty = runs/<script>-<timestamp>"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch (per process)"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=6e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=6e-5, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | constant (after warmup)"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on 2-D weights"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off"})
    eval_interval: int = field(default=100, metadata={"help": "steps between evaluations (and checkpoints)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without improvement; 0 = off"})
    log_interval: int = field(default=10, metadata={"help": "steps between training-loss lines in metrics.jsonl"})
    seed: int = field(default=1337, metadata={"help": "seeds torch, numpy, python and the data order"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (autocast precision)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model and loss"})
    fused_optimizer: bool = field(default=False, metadata={
        "help": "AdamW's update as one compiled kernel per tensor (torch.compile, CPU or CUDA; a few seconds "
                "of compiling at the first step; equal to the default multi-tensor path to float rounding; "
                "where compiling fails, a warning and the multi-tensor path)"})
    parallel: str = field(default="auto", metadata={
        "help": "how the processes of a torchrun launch share the work: ddp (each holds the whole model) | fsdp "
                "(FSDP2: parameters, gradients and optimizer state sharded; sharded checkpoints) | auto (ddp)"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each block's input in the forward pass and recompute the block in the backward "
                "(less activation memory, about one more forward of compute)"})
    keep_freed_memory: bool = field(default=True, metadata={
        "help": "CPU on Linux: glibc malloc keeps freed memory for reuse instead of unmapping it "
                "(far fewer page faults, faster steps: BENCHMARKS.md; the process keeps its peak size, "
                "which can be larger: turn off when memory is tight)"})
    resume: str = field(default="", metadata={
        "help": "'auto' (out_dir's latest checkpoint, file or sharded folder), or a checkpoint file, sharded "
                "checkpoint folder or run folder"})
    wandb_project: str = field(default="", metadata={"help": "log to this Weights & Biases project (if installed)"})
    tensorboard: bool = field(default=False, metadata={"help": "also log to TensorBoard in out_dir (if installed)"})
    curves: bool = field(default=True, metadata={"help": "draw curves.png in out_dir when the run ends (if "
                                                          "matplotlib is installed)"})

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "patience", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr: {self.min_lr} must not exceed train.lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError(f"train.eps: must be positive, got {self.eps}")
        check_seed("train.seed", self.seed)
        check_choice("train.schedule", self.schedule, ("cosine", "constant"))
        check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("train.parallel", self.parallel, ("auto", "ddp", "fsdp"))


# Actions the blocklist filter can take on a document that contains a listed word or phrase.
BLOCKLIST_ACTIONS = ("drop", "mask")


@dataclass
class FilterConfig(Section):
    """What cleaning keeps of a corpus: the document filters and normalizations (`gpt.data.filters`).

    The fields sit in the `[data]` section of pretrain.py (DataConfig adds the rest) and of
    `python -m gpt prepare --config`. Thresholds default to the published web-text filters:
    Gopher (Rae et al., 2021, MassiveText quality and repetition rules) and FineWeb (Penedo et
    al., 2024, the share of lines ending in punctuation).
    """

    section_name: typing.ClassVar[str] = "data"

    dedup: bool = field(default=True, metadata={"help": "drop exact duplicate documents (after cleaning)"})
    near_dedup: bool = field(default=False, metadata={
        "help": "drop near-duplicate documents: MinHash over word shingles with LSH (needs datasketch: "
                "pip install 'gpt[data]'); the first of each cluster stays"})
    near_dedup_threshold: float = field(default=0.8, metadata={
        "help": "estimated Jaccard similarity of shingle sets at which documents count as near-duplicates"})
    near_dedup_ngram: int = field(default=5, metadata={"help": "words per shingle"})
    near_dedup_num_perm: int = field(default=128, metadata={"help": "MinHash permutations (more: better estimates)"})
    quality: bool = field(default=False, metadata={"help": "drop documents that fail the heuristic quality rules "
                                                           "(the quality_* thresholds)"})
    quality_min_words: int = field(default=50, metadata={"help": "fewest words (Gopher: 50)"})
    quality_max_words: int = field(default=100_000, metadata={"help": "most words (Gopher: 100,000)"})
    quality_min_mean_word_length: float = field(default=3.0, metadata={"help": "shortest mean word length in "
                                                                               "characters (Gopher: 3)"})
    quality_max_mean_word_length: float = field(default=10.0, metadata={"help": "longest mean word length "
                                                                                "(Gopher: 10)"})
    quality_max_symbol_ratio: float = field(default=0.1, metadata={"help": "most '#' and '...' per word "
                                                                           "(Gopher: 0.1)"})
    quality_min_alpha_words: float = field(default=0.8, metadata={"help": "least share of words holding an "
                                                                          "alphabetic character (Gopher: 0.8)"})
    quality_min_punctuated_lines: float = field(default=0.12, metadata={
        "help": "least share of non-empty lines ending in . ! ? or a closing quote (FineWeb: 0.12)"})
    quality_max_duplicate_lines: float = field(default=0.3, metadata={"help": "most share of lines that repeat "
                                                                              "an earlier line (Gopher: 0.3)"})
    quality_max_top_ngrams: str = field(default="2:0.20,3:0.18,4:0.16", metadata={
        "help": "n:fraction,...: most share of characters in the most frequent word n-gram (Gopher)"})
    quality_max_duplicate_ngrams: str = field(default="5:0.15,6:0.14,7:0.13,8:0.12,9:0.11,10:0.10", metadata={
        "help": "n:fraction,...: most share of characters in word n-grams that occur more than once (Gopher)"})
    blocklist: str = field(default="", metadata={"help": "a file of words or phrases, one per line (# comments), "
                                                         "matched whole and case-insensitively; empty = off"})
    blocklist_action: str = field(default="drop", metadata={"help": "drop | mask: drop a matching document, or "
                                                                   "replace each match with asterisks"})
    pii: bool = field(default=False, metadata={"help": "replace e-mail addresses, phone numbers and IP addresses "
                                                       "with <EMAIL>, <PHONE>, <IP>"})
    lowercase: bool = field(default=False, metadata={"help": "lower-case every document"})
    nfkc: bool = field(default=False, metadata={"help": "Unicode NFKC normalization"})
    allowed_chars: str = field(default="", metadata={
        "help": "remove every character outside this regular-expression character class, written without "
                "its brackets (e.g. a-z0-9 \\n.,!? keeps line breaks); empty = keep all"})

    def __post_init__(self) -> None:
        self._check_types()
        self._check_filters()

    def _check_filters(self) -> None:
        """Validate the filter fields (DataConfig calls this from its own __post_init__)."""
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ConfigError(f"data.near_dedup_threshold: must be in (0, 1], got {self.near_dedup_threshold}")
        for name in ("near_dedup_ngram", "near_dedup_num_perm", "quality_max_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.quality_min_words <= self.quality_max_words:
            raise ConfigError(f"data.quality_min_words: must be in [0, quality_max_words = {self.quality_max_words}], "
                              f"got {self.quality_min_words}")
        if not 0 <= self.quality_min_mean_word_length <= self.quality_max_mean_word_length:
            raise ConfigError("data.quality_min_mean_word_length: must be in [0, quality_max_mean_word_length = "
                              f"{self.quality_max_mean_word_length}], got {self.quality_min_mean_word_length}")
        for name in ("quality_max_symbol_ratio", "quality_min_alpha_words", "quality_min_punctuated_lines",
                     "quality_max_duplicate_lines"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}: must not be negative, got {getattr(self, name)}")
        for name in ("quality_max_top_ngrams", "quality_max_duplicate_ngrams"):
            parse_ngram_limits(f"data.{name}", getattr(self, name))
        check_choice("data.blocklist_action", self.blocklist_action, BLOCKLIST_ACTIONS)

    def ngram_limits(self) -> tuple[dict[int, float], dict[int, float]]:
        """quality_max_top_ngrams and quality_max_duplicate_ngrams as {n: fraction}."""
        return (parse_ngram_limits("data.quality_max_top_ngrams", self.quality_max_top_ngrams),
                parse_ngram_limits("data.quality_max_duplicate_ngrams", self.quality_max_duplicate_ngrams))

    def filter_settings(self) -> FilterConfig:
        """Only the filter fields, as a FilterConfig (what `gpt.data.filters` and `prepare` take)."""
        names = {f.name for f in dataclasses.fields(FilterConfig)}
        return FilterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names})


def parse_ngram_limits(key: str, text: str) -> dict[int, float]:
    """`"2:0.20,3:0.18"` -> {2: 0.2, 3: 0.18}; empty = no limits. A bad entry is a ConfigError naming `key`."""
    limits: dict[int, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        n_text, sep, fraction_text = entry.partition(":")
        try:
            n, fraction = int(n_text), float(fraction_text)
        except ValueError:
            n, fraction = 0, -1.0
        if not sep or n < 1 or not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"{key}: expected entries n:fraction (n >= 1, fraction in [0, 1]) separated by "
                              f"commas, got {entry!r}")
        limits[n] = fraction
    return limits


@dataclass
class DataConfig(FilterConfig):
    """Where pretraining text comes from, how it is filtered (FilterConfig) and cut into windows."""

    section_name: typing.ClassVar[str] = "data"

    path: str = field(default="data/botchan.txt", metadata={"help": ".txt file, folder, .jsonl, or a prepared token folder"})
    tokenizer: str = field(default="", metadata={
        "help": "gpt2 | bytes (256 byte tokens + end of text) | a folder from `python -m gpt train-tokenizer` | "
                "a .gguf file; empty = gpt2, or init.from's own tokenizer"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of documents (or tail of a single one) for validation"})
    stride: int = field(default=0, metadata={"help": "step between training windows; 0 = the window"})
    window: int = field(default=0, metadata={"help": "tokens per training and validation window; 0 = the model's "
                                                     "context length, at most 1024"})
    train_tokens: int = field(default=0, metadata={"help": "train on the first N tokens of the training split only "
                                                           "(validation unchanged); 0 = all"})

    def __post_init__(self) -> None:
        self._check_types()
        self._check_filters()
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        for name in ("stride", "window", "train_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}: must not be negative, got {getattr(self, name)}")

    def window_for(self, context_length: int) -> int:
        """The window length for a model of `context_length`: data.window, or that length capped at 1024."""
        if self.window > context_length:
            raise ConfigError(f"data.window: {self.window} exceeds the model's context length ({context_length})")
        return self.window or min(context_length, 1024)


@dataclass
class InitConfig(Section):
    """Where a pretraining run's model comes from: from scratch ([model]), or a trained model it continues."""

    section_name: typing.ClassVar[str] = "init"

    from_: str = field(default="", metadata={
        "key": "from", "help": "continue training this model (known name, .gguf, Hugging Face folder, checkpoint or "
                               "run folder), with its own architecture and tokenizer; empty = from scratch"})
    grow: str = field(default="", metadata={"help": "grow that model first, function-preserving: e.g. "
                                                    "n_layer=8,d_model=256 (needs init.from)"})

    def __post_init__(self) -> None:
        self._check_types()
        if self.grow and not self.from_:
            raise ConfigError(f"init.grow: {self.grow!r} grows a trained model; give it with init.from")


@dataclass
class LoRAConfig(Section):
    """Low-rank adapters for fine-tuning (see gpt/lora.py), used when a script trains `lora`."""

    section_name: typing.ClassVar[str] = "lora"

    rank: int = field(default=8, metadata={"help": "rank r of each update B A"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: str = field(default="q_proj,v_proj", metadata={"help": f"comma-separated: {','.join(LORA_TARGETS)}"})

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("rank", "alpha"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"lora.{name}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        unknown = [name for name in self.target_names if name not in LORA_TARGETS]
        if unknown or not self.target_names:
            raise ConfigError(f"lora.targets: {self.targets!r} holds unknown names {unknown}; valid: "
                              f"{', '.join(LORA_TARGETS)}")

    @property
    def target_names(self) -> list[str]:
        return [name.strip() for name in self.targets.split(",") if name.strip()]

    def settings(self) -> dict[str, Any]:
        """Keyword arguments for `gpt.lora.apply_lora`."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": self.target_names}


# ----------------------------------------------------------------------------
# TOML files and --section.field overrides
# ----------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """`["--train.lr", "1e-3", "--model.n_layer=4"]` -> `{"train": {"lr": "1e-3"}, "model": {"n_layer": "4"}}`."""
    overrides: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument {arg!r}; overrides look like --section.field value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"{key}: missing a value after --{key}")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = value
        i += 1
    return overrides


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing file, a folder, unreadable bytes or a syntax error name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a TOML config file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.object[err.start]:#04x}); "
                          "a config is a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None


def build_config(
    sections: dict[str, type[Section]],
    toml: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, str]] | None = None,
) -> dict[str, Section]:
    """Resolve each section from its defaults, a TOML dict and command-line overrides.

    The `[model]` table may name `preset = "tiny"` to start from a preset instead of the defaults.
    """
    toml = dict(toml or {})
    overrides = overrides or {}
    for name in list(toml) + list(overrides):
        if name not in sections:
            raise ConfigError(f"{name}: unknown config section; known sections: {', '.join(sections)}")
    resolved: dict[str, Section] = {}
    for name, cls in sections.items():
        if not isinstance(toml.get(name, {}), dict):
            raise ConfigError(f"{name}: expected a table [{name}], got {type(toml[name]).__name__} {toml[name]!r}")
        table = dict(toml.get(name, {}))
        hints = typing.get_type_hints(cls)
        section_overrides = dict(overrides.get(name, {}))
        preset = section_overrides.pop("preset", table.pop("preset", None)) if cls is ModelConfig else None
        for key, text in section_overrides.items():
            table[key] = _parse_cli_value(name, key, text, hints[cls.check_field_name(key).name])
        resolved[name] = ModelConfig.preset(preset, **table) if preset is not None else cls.from_dict(table)
    return resolved


def save_config_json(config: dict[str, Section], path: str | Path) -> None:
    """Write the resolved config as JSON (the run folder's `config.json`)."""
    write_json(path, {name: s.to_dict() for name, s in config.items()})
