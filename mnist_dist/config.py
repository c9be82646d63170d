"""Typed run configuration: defaults < YAML file < command-line overrides.

Every field carries a one-line ``help`` (shown by ``--help`` and in the README), and
optionally ``choices`` or a lower bound ``min``. Unknown keys and bad values raise
``ConfigError`` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import functools
import operator
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, first_line

# Bounds on values that would pass a type check but fail later, after the processes have
# met: numpy's seed is 32-bit; torch's process-group timeouts overflow far beyond a week;
# a hidden layer wider than this is a typo (and an out-of-memory error); both datasets
# have 60,000 training images to hold some out of (and no batch can be larger).
MAX_SEED, MAX_TIMEOUT, MAX_WIDTH, TRAIN_IMAGES = 2**32 - 1, 7 * 24 * 3600, 65536, 60_000
# The environment variable that, when set, is the default of ``data_dir`` (the YAML file and
# --data-dir still win): one copy of the dataset for every command and the tests.
DATA_DIR_ENV = "MNIST_DATA_DIR"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field: its default, its help, and what its metadata says of it (bounds, ``choices``,
    ``on_resume``: "free" if a resumed run may change it, "length" for the run's length)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Config:
    """Everything one run needs. The defaults are the reference recipe."""

    # Data and run directory
    dataset: str = _opt("mnist", "Dataset to train on.", choices=("mnist", "fashion-mnist"))
    data_dir: str = _opt(
        "data",
        f"Directory holding DATASET/raw/ (fetched there if missing); default ${DATA_DIR_ENV} if set, else data.",
        nonempty=True,
        on_resume="free",
    )
    output_dir: str = _opt("runs/default", "Run directory: config, metrics, weights.", nonempty=True, on_resume="free")
    # Model
    hidden_sizes: tuple[int, ...] = _opt((256,), "Hidden layer widths, e.g. 256 or 512,256.", min=1, max=MAX_WIDTH)
    # Schedule and batches
    epochs: int = _opt(10, "Passes over the training set.", min=1, on_resume="length")
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (all epochs).", min=1, on_resume="length")
    batch_size: int = _opt(
        64, "Batch size; global or per device, see batch_mode.", min=1, max=TRAIN_IMAGES, why="the training set's size"
    )
    batch_mode: str = _opt(
        "global",
        "global: batch_size is split over processes (same maths on 1..N); per_device: each process takes batch_size.",
        choices=("global", "per_device"),
    )
    eval_batch_size: int = _opt(1000, "Evaluation batch size per process.", min=1, on_resume="free")
    shuffle: bool = _opt(False, "Reshuffle the training set every epoch (seeded).")
    seed: int = _opt(0, "Seed for weights and shuffling; the same on every process.", min=0, max=MAX_SEED)
    # Optimizer
    lr: float = _opt(0.5, "SGD learning rate (for the global batch).", min_exclusive=0.0)
    lr_scaling: str = _opt(
        "none",
        "linear: multiply lr by global batch / batch_size (per_device mode on N processes).",
        choices=("none", "linear"),
    )
    momentum: float = _opt(0.0, "SGD momentum.", min=0.0, max_exclusive=1.0, why="at 1 or more SGD diverges")
    nesterov: bool = _opt(False, "Nesterov momentum (needs momentum > 0).")
    weight_decay: float = _opt(0.0, "L2 weight decay.", min=0.0)
    grad_clip: float | None = _opt(None, "Clip the global gradient norm to this value.", min_exclusive=0.0)
    check_finite: bool = _opt(
        True,
        "Stop when the loss is not finite on some rank: looked for at log intervals, epoch ends and before "
        "every checkpoint, from a flag kept on the device (no host sync per step).",
        on_resume="free",
    )
    check_finite_each_step: bool = _opt(
        False,
        "With check_finite: check before every optimizer step instead, naming the exact step before it "
        "changes the weights (one host sync per step).",
        on_resume="free",
    )
    # Recipe: schedule, loss, inputs, validation (all off by default: the reference recipe)
    lr_schedule: str = _opt(
        "constant",
        "Learning rate after the warm-up, per optimizer step: constant, or decaying to 0.",
        choices=("constant", "cosine", "linear"),
    )
    warmup_fraction: float = _opt(
        0.0, "Fraction of all optimizer steps over which lr rises linearly to its value.", min=0.0, max=1.0
    )
    label_smoothing: float = _opt(
        0.0,
        "Label smoothing of the cross-entropy targets.",
        min=0.0,
        max_exclusive=1.0,
        why="at 1 the targets are uniform: nothing is learnt",
    )
    normalize: bool = _opt(
        False, "Standardise pixels with the training images' mean and std (folded into the saved weights)."
    )
    augment_translate: float = _opt(0.0, "Shift training images randomly by up to +-N pixels in x and y.", min=0.0)
    augment_rotate: float = _opt(
        0.0, "Rotate training images randomly by up to +-N degrees.", min=0.0, max=180.0, why="+-180 is every angle"
    )
    augment_scale: float = _opt(
        0.0, "Zoom training images randomly by a factor in [1-N, 1+N].", min=0.0, max_exclusive=1.0
    )
    augment_shear: float = _opt(
        0.0, "Shear training images randomly by up to +-N degrees.", min=0.0, max_exclusive=90.0
    )
    augment_elastic: float = _opt(
        0.0, "Elastic distortion of training images: smooth random displacements of std N pixels.", min=0.0
    )
    val_size: int = _opt(
        0,
        "Hold out the last N training images and evaluate on them instead of the test set.",
        min=0,
        max_exclusive=TRAIN_IMAGES,
    )
    # Execution
    cpu: bool = _opt(False, "Train on CPU even if a GPU is present (needed for CPU processes).", on_resume="free")
    mixed_precision: str = _opt(
        "no", "bf16: autocast the forward pass to bfloat16 (GPUs with bf16, recent CPUs).", choices=("no", "bf16")
    )
    compile: str = _opt(
        "none",
        "torch.compile the model: default, or reduce-overhead (on a GPU, also captures the forward and backward "
        "as CUDA graphs). Without a compiler toolchain it trains eagerly, saying so.",
        choices=("none", "default", "reduce-overhead", "max-autotune"),
    )
    log_every: int = _opt(100, "Log training loss every N optimizer steps.", min=1, on_resume="free")
    profile_steps: str | None = _opt(
        None,
        "Trace these optimizer steps with torch.profiler, e.g. 200-220 (a file per rank in RUN_DIR/profiles/).",
        on_resume="free",
    )
    collective_timeout: int = _opt(
        300,
        "Seconds a process waits for the others in a collective before the job fails.",
        min=1,
        max=MAX_TIMEOUT,
        on_resume="free",
    )
    stall_timeout: int = _opt(
        120,
        "Seconds without progress on some rank before every rank ends, naming it (0: no watchdog; several processes).",
        min=0,
        max=MAX_TIMEOUT,
        on_resume="free",
    )
    rendezvous_timeout: int = _opt(
        120,
        "Seconds a process waits at start-up for the main process and the others before the run fails.",
        min=1,
        max=MAX_TIMEOUT,
        on_resume="free",
    )
    # Checkpoints, resume and preemption
    checkpoint_every: int = _opt(
        0,
        "Also save a checkpoint every N optimizer steps (0: only at epoch ends, at the end, and on a stop signal).",
        min=0,
        on_resume="free",
    )
    checkpoint_every_epochs: int = _opt(
        1, "Save a checkpoint every N epochs (0: not at epoch ends).", min=0, on_resume="free"
    )
    keep_checkpoints: int = _opt(
        2,
        "Keep the newest N checkpoints; older ones are deleted only once a newer one is complete.",
        min=1,
        on_resume="free",
    )
    resume: str = _opt(
        "auto",
        "auto: continue from the newest complete checkpoint in output_dir (fresh start if none); "
        "none: start afresh (refused if output_dir has checkpoints); or a checkpoint or run directory.",
        on_resume="free",
    )
    requeue: bool = _opt(
        True,
        "Under SLURM, on SIGUSR1 (sbatch --signal=USR1@SECONDS) save a checkpoint and requeue the job.",
        on_resume="free",
    )
    # Tracking
    tracker: str = _opt(
        "wandb",
        "Experiment tracker; without credentials wandb logs offline.",
        choices=("wandb", "none"),
        on_resume="free",
    )
    wandb_project: str = _opt("mnist-dist", "Weights & Biases project.", on_resume="free")
    wandb_entity: str | None = _opt(
        None, "Weights & Biases entity (user or team); None: your default.", on_resume="free"
    )
    wandb_run_name: str | None = _opt(None, "Weights & Biases run name; None: a generated one.", on_resume="free")
    wandb_tags: tuple[str, ...] = _opt((), "Weights & Biases tags, e.g. baseline,sgd.", on_resume="free")
    wandb_group: str | None = _opt(
        None, "Weights & Biases group; None: slurm-$SLURM_JOB_ID, else the run directory's name.", on_resume="free"
    )
    wandb_dir: str | None = _opt(
        None, "Directory for wandb's files (DIR/wandb/); None: the run directory.", on_resume="free"
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of every key (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def field_type(name: str) -> Any:
    """The base type of a field: int, float, str, bool or tuple (Optional unwrapped)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def is_optional(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


# Names other libraries use for our keys, so the suggestion is right even when spelling is far off.
_SYNONYMS = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "hidden_size": "hidden_sizes",
    "hidden": "hidden_sizes",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "bs": "batch_size",
    "output": "output_dir",
    "out_dir": "output_dir",
    "data_root": "data_dir",
    "steps": "max_steps",
    "lerning_rate": "lr",
    "learningrate": "lr",
}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = [_SYNONYMS[key]] if key in _SYNONYMS else difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(FIELDS)}"
    return ConfigError(f"unknown config key {_quoted(key)}{where}{hint}")


def _quoted(key: Any) -> str:
    """A key in quotes for a message: as written, or escaped when it holds line breaks or other controls."""
    return f"'{key}'" if str(key).isprintable() else repr(str(key))


# An example of a good value of each list key, for the messages.
_LIST_EXAMPLES = {"hidden_sizes": "512,256", "wandb_tags": "baseline,sgd"}


def _items(name: str, text: str) -> list[str]:
    """The comma-separated items of ``text`` ("" has none); an empty item (``1,,2``, ``1,``) is an error,
    not silently dropped."""
    if not text.strip():
        return []
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        example = _LIST_EXAMPLES.get(name, "a,b")
        raise ConfigError(
            f"config key '{name}' has an empty item in {text!r}; separate the values by single commas, e.g. {example}"
        )
    return items


def _words(name: str, value: Any) -> tuple[str, ...]:
    # "a,b" on the command line, a YAML list or one string in a file; may be empty.
    if isinstance(value, str):
        value = _items(name, value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"config key '{name}' must be a list of strings like a,b, got {value!r}")
    return tuple(v.strip() for v in value)


def _integers(name: str, value: Any) -> tuple[int, ...]:
    # "512,256" on the command line, a YAML list, or one integer.
    if isinstance(value, str):
        items = _items(name, value)
        try:
            value = [int(v) for v in items]
        except ValueError:
            raise ConfigError(f"config key '{name}' must be integers like 256 or 512,256, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"config key '{name}' must be a non-empty list of integers, got {value!r}")
    return tuple(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{name}' must be true or false, got {value!r}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key '{name}' must be an integer, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    # PyYAML reads 1e-3 (no dot) as a string: numeric strings are accepted.
    try:
        if isinstance(value, bool):
            raise ValueError
        value = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise ConfigError(f"config key '{name}' must be a number, got {value!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"config key '{name}' must be a finite number, got {value!r}")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config key '{name}' must be a string, got {value!r}")
    if FIELDS[name].metadata.get("nonempty") and not value.strip():
        example = f"--{name.replace('_', '-')} {FIELDS[name].default}"
        raise ConfigError(f"config key '{name}' must not be empty; give a directory, e.g. {example}")
    choices = FIELDS[name].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{name}' must be one of {', '.join(choices)}; got {value!r}")
    return value


# How a value of each kind of field is read and checked.
_READERS = {"words": _words, "integers": _integers, bool: _boolean, int: _integer, float: _number, str: _string}
# Bounds a field may declare in its metadata, how each is tested, and how the message says it.
_BOUNDS = (
    ("min", operator.ge, ">="),
    ("min_exclusive", operator.gt, ">"),
    ("max", operator.le, "<="),
    ("max_exclusive", operator.lt, "<"),
)


def _kind(name: str) -> Any:
    kind = field_type(name)
    if kind is tuple:
        return "words" if typing.get_args(_HINTS[name])[0] is str else "integers"
    return kind


def _coerce(name: str, value: Any) -> Any:
    """Check one value against its field's type and bounds; return the normalised value."""
    if value is None:
        if is_optional(name):
            return None
        raise ConfigError(f"config key '{name}' must not be empty (null)")
    value = _READERS[_kind(name)](name, value)
    meta = FIELDS[name].metadata
    why = f" ({meta['why']})" if "why" in meta else ""
    for v in value if isinstance(value, tuple) else (value,):
        for key, holds, sign in _BOUNDS:
            if key in meta and not holds(v, meta[key]):
                raise ConfigError(f"config key '{name}' must be {sign} {meta[key]}{why}, got {v!r}")
    return value


_STEPS = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """``"200-220"`` -> ``(200, 220)``: the first and last optimizer step to profile (1-based,
    inclusive); ``""``, ``"none"`` or None -> None (no profiling). Anything else is a ``ConfigError``."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    match = _STEPS.fullmatch(str(text))
    first, last = (int(match[1]), int(match[2])) if match else (0, 0)
    if not 1 <= first <= last:
        raise ConfigError(
            f"config key 'profile_steps' must be FIRST-LAST steps like 200-220 (1 <= FIRST <= LAST), got {text!r}"
        )
    return first, last


def _check_consistency(cfg: Config) -> None:
    parse_steps(cfg.profile_steps)
    if cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError("config key 'nesterov' needs 'momentum' > 0 (SGD's rule); set momentum: 0.9")
    if cfg.val_size and cfg.batch_size > TRAIN_IMAGES - cfg.val_size:
        raise ConfigError(
            f"config key 'batch_size' ({cfg.batch_size}) must be at most the training part: "
            f"{TRAIN_IMAGES} images less val_size {cfg.val_size} = {TRAIN_IMAGES - cfg.val_size}; "
            "lower batch_size or val_size"
        )


def build_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Merge defaults < YAML file at ``path`` < ``overrides`` into a validated ``Config``.

    ``overrides`` with value ``None`` mean "not given" and are ignored. ``$MNIST_DATA_DIR``, when
    set, is the default of ``data_dir`` (read now, not at import).
    """
    merged: dict[str, Any] = {"data_dir": default_data_dir()}
    if path is not None:
        merged.update(_read_yaml(Path(path)))
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise _unknown_key_error(key, " (command line)")
        if value is not None:
            merged[key] = value
    values = {k: _coerce(k, v) for k, v in merged.items()}
    cfg = Config(**values)
    _check_consistency(cfg)
    return cfg


def default_data_dir() -> str:
    """The default of ``data_dir``: ``$MNIST_DATA_DIR`` if set (and not blank), else ``data``."""
    value = os.environ.get(DATA_DIR_ENV, "")
    return value if value.strip() else FIELDS["data_dir"].default


# Byte-order marks a config file may start with (Windows Notepad writes one), and their encodings.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SAVE_AS_UTF8 = "save it as UTF-8 (in Notepad: File > Save as, Encoding: UTF-8)"


def _yaml_text(path: Path) -> str:
    """A config file's text: UTF-8, or UTF-8, UTF-16 or UTF-32 with a byte-order mark."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc}); pass a readable file") from None
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not {encoding.upper().removesuffix('-SIG')} text (byte 0x{data[exc.start]:02x} "
            f"at offset {exc.start}); {_SAVE_AS_UTF8}"
        ) from None
    if "\x00" in text:
        raise ConfigError(
            f"config file {path} holds NUL characters (UTF-16 without a byte-order mark?); {_SAVE_AS_UTF8}"
        )
    return text


class _DuplicateKey(Exception):
    """A key given twice in one YAML mapping: ``(key, first line, second line)``."""


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    first = seen.setdefault(self.construct_object(key_node, deep=True), key_node)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node:
                    raise _DuplicateKey(key_node.value, first.start_mark.line + 1, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _parse_yaml(path: Path) -> Any:
    """The YAML document of a config file; every problem is one ``ConfigError`` line naming the file."""
    import yaml

    try:
        return yaml.load(_yaml_text(path), Loader=_yaml_loader())  # a SafeLoader: builds no Python objects
    except _DuplicateKey as exc:
        key, first, second = exc.args
        where = f"line {first}" if first == second else f"lines {first} and {second}"
        raise ConfigError(f"config file {path} sets {_quoted(key)} twice ({where}); keep one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass an existing YAML file to --config)")
    data = _parse_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            raise _unknown_key_error(str(key), f" in {path}")
    return data


# Where a run is and how it continues, not what it trains: left out of a run's config.yaml, so
# that the file passed back with --config trains the recipe again instead of pointing at that run.
PLACE_KEYS = ("output_dir", "resume")
RUN_CONFIG_HEADER = (
    "# The merged config of this run, without output_dir and resume: passed back with --config,\n"
    "# it trains the same recipe from the start into the --output-dir given with it.\n"
)


def save_config(cfg: Config, path: str | os.PathLike, of_run: bool = False) -> None:
    """Write the merged config as YAML (loadable again with ``--config``), atomically.

    ``of_run``: the copy kept in a run directory, without ``PLACE_KEYS``.
    """
    import yaml

    from .runs import atomic_write_bytes

    data = {k: v for k, v in cfg.to_dict().items() if not (of_run and k in PLACE_KEYS)}
    text = (RUN_CONFIG_HEADER if of_run else "") + yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())


def per_process_batch_size(cfg: Config, world_size: int) -> int:
    """Batch size each process takes: ``batch_size / world_size`` in global mode.

    Raises ``ConfigError`` when a global batch does not split evenly, since unequal
    shards would weight samples differently than on one process.
    """
    if cfg.batch_mode == "per_device":
        return cfg.batch_size
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the number of "
            f"processes ({world_size}) in batch_mode 'global'; use a multiple of {world_size} "
            "or batch_mode: per_device"
        )
    return cfg.batch_size // world_size


def global_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over all processes."""
    return cfg.batch_size * world_size if cfg.batch_mode == "per_device" else cfg.batch_size


def _on_resume(*kinds: str) -> frozenset[str]:
    return frozenset(name for name, f in FIELDS.items() if f.metadata.get("on_resume") in kinds)


def run_keys() -> frozenset[str]:
    """Keys that say where and how a run runs, not what it trains: where files go, what is
    logged and tracked, how often to checkpoint, how evaluation is batched, timeouts
    (``on_resume: free``). Every other key is part of the training recipe."""
    return _on_resume("free")


def free_on_resume(cfg: Config) -> frozenset[str]:
    """Keys a run resumed with ``cfg`` may change: ``run_keys()``; and, with a constant learning
    rate, its length (``on_resume: length``), which then changes no step already taken. Every
    other key changes the training mathematics."""
    constant = cfg.lr_schedule == "constant" and cfg.warmup_fraction == 0
    return _on_resume("free", "length") if constant else run_keys()


def effective_lr(cfg: Config, world_size: int) -> float:
    """Learning rate after the linear scaling rule (lr x global batch / batch_size) if chosen."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch_size(cfg, world_size) / cfg.batch_size
    return cfg.lr


def markdown_reference() -> str:
    """The README's table of config keys, generated from the fields (a test keeps them in sync)."""
    rows = ["| key | option | default | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if field_type(name) is bool:
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        default = (",".join(map(str, f.default)) or "[]") if isinstance(f.default, tuple) else f.default
        meaning = f.metadata["help"]
        if "choices" in f.metadata:
            meaning += f" One of: {', '.join(f.metadata['choices'])}."
        rows.append(f"| `{name}` | `{flag}` | `{default}` | {meaning} |")
    return "\n".join(rows)
