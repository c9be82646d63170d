"""The command line's machinery: options generated from the config (either spelling), usage
errors by name, Ctrl-C as exit status 130."""

from click.testing import CliRunner

from mnist_dist.cli import eval_command, main, train_command
from mnist_dist.config import FIELDS, build_config


def _option_names(command):
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_config_key_has_an_override_option():
    for command in (train_command, eval_command):
        names = _option_names(command)
        for key in FIELDS:
            assert "--" + key.replace("_", "-") in names, key
        assert "--config" in names
    assert {"--shuffle", "--no-shuffle", "--cpu", "--max-steps", "--lr", "--seed"} <= _option_names(train_command)


def test_bad_option_value_is_rejected_by_name():
    result = CliRunner().invoke(train_command, ["--batch-mode", "sideways"])
    assert result.exit_code == 2 and "'--batch-mode'" in result.output


def test_options_take_the_config_keys_spelling_too():
    """What a wandb sweep's ${args} writes: --weight_decay=... for the key weight_decay."""
    args = ["--weight_decay=0.0003", "--label_smoothing", "0.1", "--no_shuffle", "--compile", "reduce-overhead"]
    params = train_command.make_context("train", args).params
    cfg = build_config(params.pop("config_path"), params)
    assert (cfg.weight_decay, cfg.label_smoothing, cfg.shuffle, cfg.compile) == (0.0003, 0.1, False, "reduce-overhead")
    result = CliRunner().invoke(train_command, ["--weight_decay", "-1"])
    assert result.exit_code == 2 and "weight_decay" in result.output


def test_ctrl_c_in_any_command_exits_130(monkeypatch, tmp_path):
    from mnist_dist.data import sources

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "ensure_dataset", interrupted)
    result = CliRunner().invoke(main, ["data", "download", "--data-dir", str(tmp_path)])
    assert result.exit_code == 130 and result.stderr.strip() == "Aborted!", result.output
