from click.testing import CliRunner

from mnist_dist.cli import eval_command, main, train_command
from mnist_dist.config import FIELDS


def _option_names(command):
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_config_key_has_an_override_option():
    for command in (train_command, eval_command):
        names = _option_names(command)
        for key in FIELDS:
            assert "--" + key.replace("_", "-") in names, key
        assert "--config" in names
    assert {"--shuffle", "--no-shuffle", "--cpu", "--max-steps", "--lr", "--seed"} <= _option_names(train_command)


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "eval", "data"):
        assert name in result.output


def test_bad_option_value_is_rejected_by_name():
    result = CliRunner().invoke(train_command, ["--batch-mode", "sideways"])
    assert result.exit_code == 2 and "'--batch-mode'" in result.output


def test_bad_config_value_from_cli_names_the_key(tmp_path):
    result = CliRunner().invoke(train_command, ["--lr", "-1", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: config key 'lr' must be > 0.0, got -1.0"


def test_data_download_verifies_existing_files(data_dir):
    result = CliRunner().invoke(main, ["data", "download", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "all files verified" in result.output


def test_eval_with_missing_weights_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(eval_command, ["--weights", str(tmp_path / "none.safetensors"), "--cpu"])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_bad_options_are_one_error_line_through_the_real_entry_points(tmp_path):
    from conftest import run_cli

    proc = run_cli(["mnist_dist.train", "--lr", "abc"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "Error: Invalid value for '--lr': 'abc' is not a valid float. (see: python -m mnist_dist.train --help)"
    ]
    proc = run_cli(["mnist_dist.cli", "train", "--epoch", "3"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "No such option '--epoch'. Did you mean '--epochs'?" in proc.stderr
