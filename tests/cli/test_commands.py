import pytest
from click.testing import CliRunner

from mnist_dist.cli import eval_command, main, train_command

from conftest import file_digests


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "eval", "data"):
        assert name in result.output


def test_bad_config_value_from_cli_names_the_key(tmp_path):
    result = CliRunner().invoke(train_command, ["--lr", "-1", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2  # a usage error, like a bad option
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


# -- every bad input: one Error: line, the right exit status, no traceback, nothing written ------


def one_error_line(stderr: str) -> str:
    """The one line a refused command prints (on stderr), with no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory):
    """Weights of an untrained MLP: enough for eval to get as far as the data."""
    from mnist_dist.model import MLP
    from mnist_dist.runs import save_weights

    path = tmp_path_factory.mktemp("weights") / "untrained.safetensors"
    save_weights(MLP().state_dict(), path)
    return path


@pytest.mark.parametrize("command", ["train", "eval", "data download"])
def test_an_unusable_data_dir_is_one_line_for_every_command(command, unusable_data_dir, untrained_weights, tmp_path):
    """A --data-dir that is a file, on a read-only filesystem or under /proc (tracebacks before)."""
    from conftest import file_digests, run_cli

    args = {
        "train": ["train", "--cpu", "--tracker", "none", "--output-dir", str(tmp_path / "run")],
        "eval": ["eval", "--cpu", "--weights", str(untrained_weights)],
        "data download": ["data", "download"],
    }[command]
    before = file_digests(tmp_path)
    proc = run_cli(["mnist_dist.cli", *args, "--data-dir", str(unusable_data_dir)], timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith(f"Error: data directory {unusable_data_dir} cannot be used: ") and "--data-dir" in line
    written = set(file_digests(tmp_path)) - set(before)
    assert not written & {"run/model.safetensors", "run/metrics.json"} and not any("checkpoints" in w for w in written)
    assert all(file_digests(tmp_path).get(name) == digest for name, digest in before.items())


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--batch-size", "100000", "config key 'batch_size' must be <= 60000 (the training set's size), got 100000"),
        ("--momentum", "1.5", "config key 'momentum' must be < 1.0 (at 1 or more SGD diverges), got 1.5"),
        ("--label-smoothing", "1", "config key 'label_smoothing' must be < 1.0"),
        ("--augment-rotate", "1000", "config key 'augment_rotate' must be <= 180.0 (+-180 is every angle)"),
        ("--hidden-sizes", "1,,2", "config key 'hidden_sizes' has an empty item in '1,,2'"),
    ],
)
def test_values_accepted_before_are_usage_errors_of_one_line(option, value, message, tmp_path):
    result = CliRunner().invoke(main, ["train", option, value, "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr).startswith(f"Error: {message}")
    assert not (tmp_path / "run").exists()


def test_config_file_problems_are_usage_errors_and_the_file_is_left_as_it_is(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 0.1\nepochs: 3\nlr: 0.2\n")
    notepad = tmp_path / "notepad.yaml"
    notepad.write_bytes("lr: 0.1\r\nepochs: 0\r\n".encode("utf-16"))  # read: its bad value is named
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# café\nlr: 0.1\n".encode("latin-1"))
    before = file_digests(tmp_path)
    expected = {
        twice: f"Error: config file {twice} sets 'lr' twice (lines 1 and 3); keep one of them",
        notepad: "Error: config key 'epochs' must be >= 1, got 0",
        latin: f"Error: config file {latin} is not UTF-8 text (byte 0xe9 at offset 5); save it as UTF-8",
    }
    for path, line in expected.items():
        result = CliRunner().invoke(main, ["train", "--config", str(path), "--output-dir", str(tmp_path / "run")])
        assert result.exit_code == 2 and one_error_line(result.stderr).startswith(line), result.output
    assert file_digests(tmp_path) == before


def test_a_usage_error_exits_2_through_the_real_entry_point(tmp_path):
    from conftest import run_cli

    proc = run_cli(["mnist_dist.train", "--momentum", "1.5", "--output-dir", str(tmp_path / "run")])
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line == "Error: config key 'momentum' must be < 1.0 (at 1 or more SGD diverges), got 1.5"
    assert not (tmp_path / "run").exists()


def test_rendezvous_refuses_a_node_rank_outside_the_job_at_once():
    import time

    start = time.monotonic()
    args = ["rendezvous", "--nodes", "2", "--node-rank", "5", "--main-addr", "127.0.0.1", "--main-port", "29999"]
    result = CliRunner().invoke(main, [*args, "--timeout", "60"])
    assert result.exit_code == 2 and time.monotonic() - start < 10
    assert one_error_line(result.stderr) == (
        "Error: Invalid value for '--node-rank': 5 is not a node of 2: node ranks are 0 to 1 "
        "(see: main rendezvous --help)"
    )


def test_checkpoints_verify_of_a_directory_without_a_run_fails(tmp_path):
    (tmp_path / "notes.txt").write_text("no run here\n")
    result = CliRunner().invoke(main, ["checkpoints", "verify", str(tmp_path)])
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        f"Error: {tmp_path} holds no run (no checkpoints/, model.safetensors, metrics.json, config.yaml or "
        "history.jsonl); pass the --output-dir of a training run"
    )


def test_ctrl_c_on_a_training_run_saves_a_checkpoint_and_exits_130(data_dir, tmp_path):
    """SIGINT, as a terminal sends it, to a single-process run (it exited 1 before, not 130, and saved nothing)."""
    import signal

    from conftest import read_until, start

    args = ["mnist_dist.cli", "train", "--cpu", "--tracker", "none", "--data-dir", str(data_dir)]
    proc = start([*args, "--output-dir", str(tmp_path / "run"), "--epochs", "50", "--log-every", "50"], processes=1)
    try:
        read_until(proc, "epoch 1/50: step")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "stopped by SIGINT at step" in output.strip().splitlines()[-1], output
    step = int(output.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}").is_dir()  # the usual checkpoint
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_data_download_takes_mnist_data_dir_as_its_default(data_dir):
    from conftest import run_cli

    proc = run_cli(["mnist_dist.cli", "data", "download"], env={"MNIST_DATA_DIR": str(data_dir)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mnist: all files verified in {data_dir / 'MNIST' / 'raw'}"
