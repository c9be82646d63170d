import codecs
import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_dist.config import (
    FIELDS,
    Config,
    build_config,
    effective_lr,
    field_type,
    global_batch_size,
    per_process_batch_size,
    save_config,
)
from mnist_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_reference_recipe():
    cfg = build_config()
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.shuffle, cfg.hidden_sizes) == (64, 0.5, 10, False, (256,))
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.0, False, 0.0)


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nepochs: 3\nhidden_sizes: [128, 64]\n")
    cfg = build_config(path, {"epochs": 5, "seed": None})
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.hidden_sizes) == (0.1, 5, 0, (128, 64))


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_sise'.*did you mean 'batch_size'"):
        build_config(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", 0, "'lr' must be > 0"),
        ("lr", -1.0, "'lr' must be > 0"),
        ("lr", "fast", "'lr' must be a number"),
        ("lr", float("nan"), "'lr' must be a finite number"),
        ("epochs", 0, "'epochs' must be >= 1"),
        ("epochs", 2.5, "'epochs' must be an integer"),
        ("batch_size", True, "'batch_size' must be an integer"),
        ("hidden_sizes", [256, 0], "'hidden_sizes' must be >= 1"),
        ("hidden_sizes", "a,b", "'hidden_sizes' must be integers"),
        ("shuffle", "yes", "'shuffle' must be true or false"),
        ("batch_mode", "local", "'batch_mode' must be one of global, per_device"),
        ("epochs", None, "'epochs' must not be empty"),
        ("label_smoothing", 1.5, "'label_smoothing' must be < 1.0"),
        ("augment_scale", 1.0, "'augment_scale' must be < 1.0"),
        ("augment_rotate", -5, "'augment_rotate' must be >= 0"),
        ("lr_schedule", "step", "'lr_schedule' must be one of constant, cosine, linear"),
        ("val_size", -1, "'val_size' must be >= 0"),
        # Values that would otherwise fail later, inside the job, after the processes have met:
        ("seed", 2**32, "'seed' must be <= 4294967295"),
        ("val_size", 60000, "'val_size' must be < 60000"),
        ("collective_timeout", 10**12, "'collective_timeout' must be <= 604800"),
        ("rendezvous_timeout", 10**12, "'rendezvous_timeout' must be <= 604800"),
        ("hidden_sizes", [256, 10**9], "'hidden_sizes' must be <= 65536"),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError, match=message):
        build_config(path)


def test_yaml_float_without_dot_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\n")  # PyYAML reads this as a string
    assert build_config(path).lr == 1e-3


def test_cli_style_values_are_parsed():
    cfg = build_config(None, {"hidden_sizes": "512,256", "max_steps": 7})
    assert cfg.hidden_sizes == (512, 256) and cfg.max_steps == 7


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        build_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(listy)


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="'nesterov' needs 'momentum' > 0"):
        build_config(None, {"nesterov": True})
    assert build_config(None, {"nesterov": True, "momentum": 0.9}).nesterov


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        build_config(None, {"learning_rate": 0.1})


def test_saved_config_loads_back_identically(tmp_path):
    cfg = build_config(None, {"hidden_sizes": "64,32", "shuffle": True, "max_steps": 3})
    save_config(cfg, tmp_path / "config.yaml")
    assert build_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "mode, batch, world, per_process, global_batch",
    [("global", 64, 1, 64, 64), ("global", 64, 2, 32, 64), ("global", 63, 3, 21, 63), ("per_device", 64, 4, 64, 256)],
)
def test_batch_arithmetic(mode, batch, world, per_process, global_batch):
    cfg = Config(batch_size=batch, batch_mode=mode)
    assert per_process_batch_size(cfg, world) == per_process
    assert global_batch_size(cfg, world) == global_batch


def test_global_batch_must_divide_world_size():
    with pytest.raises(ConfigError, match=r"'batch_size' \(64\) must be divisible by the number of processes \(3\)"):
        per_process_batch_size(Config(batch_size=64), 3)


def test_linear_lr_scaling():
    assert effective_lr(Config(lr=0.1, batch_mode="per_device", lr_scaling="linear"), 4) == pytest.approx(0.4)
    assert effective_lr(Config(lr=0.1, batch_mode="global", lr_scaling="linear"), 4) == pytest.approx(0.1)
    assert effective_lr(Config(lr=0.1, batch_mode="per_device"), 4) == pytest.approx(0.1)


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in FIELDS.values())


@pytest.mark.parametrize("path", sorted((REPO / "configs/train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_load(path):
    written = yaml.safe_load(path.read_text())
    loaded = build_config(path).to_dict()
    assert written and {key: loaded[key] for key in written} == written  # every key taken as written


@pytest.mark.parametrize("path", sorted((REPO / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(path)
    assert cfg.num_processes >= 1 and cfg.mixed_precision == "no"
    assert str(cfg.distributed_type) in {"NO", "MULTI_GPU", "DistributedType.NO", "DistributedType.MULTI_GPU"}


def test_reference_recipe_values(monkeypatch):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    cfg = build_config(REPO / "configs/train/reference.yaml")
    assert cfg == Config()


def test_docs_config_reference_is_current():
    from mnist_dist.config import markdown_reference

    page = REPO / "docs/configuration.md"
    text = page.read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert start in text and end in text, f"{page} lost its config-reference markers"
    table = text.split(start)[1].split(end)[0]
    assert table == markdown_reference(), (
        f"the configuration table in {page.relative_to(REPO)} is stale: replace the lines between its "
        "config-reference markers with the output of mnist_dist.config.markdown_reference()"
    )


def test_the_largest_values_allowed_work_where_they_are_used():
    """The bounds are where the values break: the largest seed seeds every generator, the largest
    timeout makes a process-group timeout."""
    from datetime import timedelta

    from accelerate.utils import set_seed

    cfg = build_config(None, {"seed": 2**32 - 1, "collective_timeout": 604800, "rendezvous_timeout": 604800})
    set_seed(cfg.seed)
    assert timedelta(seconds=cfg.collective_timeout).total_seconds() == 604800
    with pytest.raises(ValueError):
        set_seed(cfg.seed + 1)  # what the bound prevents


@pytest.mark.parametrize("key", ["output_dir", "data_dir"])
def test_an_empty_directory_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"config key '{key}' must not be empty; give a directory, e.g. --"):
        build_config(None, {key: " "})


def test_a_runs_config_file_repeats_the_recipe_not_the_run(tmp_path):
    """config.yaml in a run directory leaves out where the run was and how it resumed."""
    cfg = build_config(None, {"output_dir": "runs/exp", "resume": "runs/old", "lr": 0.1, "shuffle": True})
    save_config(cfg, tmp_path / "config.yaml", of_run=True)
    again = build_config(tmp_path / "config.yaml")
    assert (again.output_dir, again.resume) == (Config().output_dir, "auto")
    assert again == dataclasses.replace(cfg, output_dir=Config().output_dir, resume="auto")


# -- values that used to be accepted, and wrong all the same: refused here, naming the key ----


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 100000}, "config key 'batch_size' must be <= 60000 (the training set's size), got 100000"),
        (
            {"batch_size": 59000, "val_size": 5000},
            "config key 'batch_size' (59000) must be at most the training part: 60000 images less val_size 5000 "
            "= 55000; lower batch_size or val_size",
        ),
        ({"momentum": 1.5}, "config key 'momentum' must be < 1.0 (at 1 or more SGD diverges), got 1.5"),
        ({"momentum": 1}, "config key 'momentum' must be < 1.0 (at 1 or more SGD diverges), got 1.0"),
        (
            {"label_smoothing": 1},
            "config key 'label_smoothing' must be < 1.0 (at 1 the targets are uniform: nothing is learnt), got 1.0",
        ),
        ({"augment_rotate": 1000}, "config key 'augment_rotate' must be <= 180.0 (+-180 is every angle), got 1000.0"),
        (
            {"hidden_sizes": "1,,2"},
            "config key 'hidden_sizes' has an empty item in '1,,2'; separate the values by single commas, e.g. 512,256",
        ),
        (
            {"hidden_sizes": "512,"},
            "config key 'hidden_sizes' has an empty item in '512,'; separate the values by single commas, e.g. 512,256",
        ),
        (
            {"wandb_tags": "a,,b"},
            "config key 'wandb_tags' has an empty item in 'a,,b'; separate the values by single commas, "
            "e.g. baseline,sgd",
        ),
    ],
)
def test_values_accepted_before_but_wrong_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_config(None, overrides)
    assert str(info.value) == message


def test_the_largest_sane_values_are_still_accepted():
    cfg = build_config(None, {"batch_size": 60000, "momentum": 0.99, "label_smoothing": 0.99, "augment_rotate": 180})
    assert (cfg.batch_size, cfg.momentum, cfg.label_smoothing, cfg.augment_rotate) == (60000, 0.99, 0.99, 180.0)
    assert build_config(None, {"batch_size": 55000, "val_size": 5000}).batch_size == 55000
    assert build_config(None, {"wandb_tags": ""}).wandb_tags == ()  # no tags, as before
    assert build_config(None, {"hidden_sizes": " 512 , 256 "}).hidden_sizes == (512, 256)


def test_a_key_given_twice_in_a_yaml_file_names_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nepochs: 2\nlr: 0.2\n")  # PyYAML alone keeps 0.2, silently
    with pytest.raises(ConfigError) as info:
        build_config(path)
    assert str(info.value) == f"config file {path} sets 'lr' twice (lines 1 and 3); keep one of them"
    path.write_text("{lr: 0.1, lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"sets 'lr' twice \(line 1\); keep one of them"):
        build_config(path)


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-8-sig"),  # Notepad's "UTF-8 with BOM"
        lambda text: text.encode("utf-16"),  # Notepad's "Unicode" (UTF-16 LE with a byte-order mark)
        lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),  # "Unicode big endian"
    ],
    ids=["utf-8-bom", "utf-16-le", "utf-16-be"],
)
def test_a_config_saved_by_windows_notepad_is_read(tmp_path, encode):
    path = tmp_path / "c.yaml"
    path.write_bytes(encode("# café\r\nlr: 0.1\r\nhidden_sizes: [128, 64]\r\n"))
    cfg = build_config(path)
    assert (cfg.lr, cfg.hidden_sizes) == (0.1, (128, 64))


def test_a_config_in_another_encoding_is_one_line_naming_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("# café\nlr: 0.1\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        build_config(path)
    assert str(info.value) == (
        f"config file {path} is not UTF-8 text (byte 0xe9 at offset 5); "
        "save it as UTF-8 (in Notepad: File > Save as, Encoding: UTF-8)"
    )
    path.write_bytes("lr: 0.1\n".encode("utf-16-le"))  # UTF-16 without its byte-order mark
    with pytest.raises(ConfigError, match=r"holds NUL characters \(UTF-16 without a byte-order mark\?\); save it as"):
        build_config(path)


def test_mnist_data_dir_is_the_default_of_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", "/shared/mnist")
    assert build_config().data_dir == "/shared/mnist"
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: from-file\n")
    assert build_config(path).data_dir == "from-file"  # defaults < environment < file < options
    assert build_config(path, {"data_dir": "from-option"}).data_dir == "from-option"
    monkeypatch.setenv("MNIST_DATA_DIR", " ")
    assert build_config().data_dir == "data"
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert build_config().data_dir == "data"


# -- fuzzing: whatever a file or an option holds, a Config or one ConfigError line naming the key --

# In CI each fuzz test tries the same 300 cases every run (derandomize); HYPOTHESIS_PROFILE=long
# tries 20,000 new ones (add --hypothesis-seed=N to repeat a run). See docs/testing.md.
settings.register_profile(
    "ci", max_examples=300, derandomize=True, deadline=timedelta(seconds=2), database=None, print_blob=True
)
settings.register_profile("long", max_examples=20_000, deadline=None, database=None, print_blob=True)
FUZZ = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")))

KEYS = st.sampled_from(sorted(FIELDS))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


def config_or_error_naming(keys, build) -> None:
    """``build()`` gives a ``Config``, or raises a one-line ``ConfigError`` naming one of ``keys``;
    any other exception fails the test."""
    try:
        cfg = build()
    except ConfigError as exc:
        message = str(exc)
        named = [f"'{key}'" if str(key).isprintable() else repr(str(key)) for key in keys]  # controls escaped
        assert "\n" not in message and any(name in message for name in named), message
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(key=KEYS, value=VALUES)
def test_fuzz_any_yaml_value_of_any_key(fuzz_file, key, value):
    fuzz_file.write_text(yaml.safe_dump({key: value}))
    config_or_error_naming([key], lambda: build_config(fuzz_file))


@FUZZ
@given(doc=st.dictionaries(KEYS | st.text(max_size=12), VALUES, max_size=6))
def test_fuzz_any_mapping_of_known_and_unknown_keys(fuzz_file, doc):
    fuzz_file.write_text(yaml.safe_dump(doc))
    config_or_error_naming(doc, lambda: build_config(fuzz_file))


@FUZZ
@given(
    data=st.binary(max_size=60)
    | st.text(max_size=60).map(str.encode)
    | st.builds(lambda key, text: f"{key}: {text}\n".encode(), KEYS, st.text(max_size=30))
)
def test_fuzz_any_bytes_as_a_config_file(fuzz_file, data):
    fuzz_file.write_bytes(data)
    try:
        build_config(fuzz_file)
    except ConfigError as exc:  # one line, naming the file or the key
        message = str(exc)
        assert "\n" not in message and (str(fuzz_file) in message or "config key '" in message), message


OPTION_KEYS = st.sampled_from(sorted(k for k in FIELDS if field_type(k) is not bool))  # booleans take no value
NUMBERS = st.from_regex(r"-?[0-9]{0,30}(\.[0-9]{0,5})?(e-?[0-9]{1,3})?", fullmatch=True)


@FUZZ
@given(key=OPTION_KEYS, text=st.text(max_size=20) | NUMBERS | st.from_regex(r"[0-9, ]{0,12}", fullmatch=True))
def test_fuzz_any_command_line_value(key, text):
    import click

    from mnist_dist.cli import train_command

    flag = "--" + key.replace("_", "-")
    try:
        ctx = train_command.make_context("train", [f"{flag}={text}"])
    except click.UsageError as exc:  # refused by the option's type: a usage error naming the option (exit 2)
        assert flag in exc.format_message(), exc.format_message()
        return
    overrides = {k: v for k, v in ctx.params.items() if k != "config_path"}
    config_or_error_naming([key], lambda: build_config(None, overrides))


def test_the_keys_a_resume_may_change_come_from_the_fields():
    """Where files go, what is logged, how often to checkpoint, how evaluation is batched; the length
    only with a constant learning rate. Nothing of the training mathematics."""
    from mnist_dist.config import free_on_resume

    free = free_on_resume(Config())
    assert {"output_dir", "data_dir", "log_every", "checkpoint_every", "eval_batch_size", "wandb_tags"} <= free
    assert {"epochs", "max_steps"} <= free
    assert not free & {"lr", "batch_size", "seed", "shuffle", "momentum", "hidden_sizes", "batch_mode", "dataset"}
    assert free_on_resume(Config(lr_schedule="cosine")) == free - {"epochs", "max_steps"}
    assert free_on_resume(Config(warmup_fraction=0.1)) == free - {"epochs", "max_steps"}
