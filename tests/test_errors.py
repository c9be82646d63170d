"""User-facing errors: one base class, each kind also the built-in error it refines."""

import inspect
import signal

from mnist_dist import errors


def test_every_user_error_is_one_base_class_and_a_builtin_one():
    kinds = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    user = [c for c in kinds if issubclass(c, errors.UserError) and c is not errors.UserError]
    for kind in user:
        builtin = [
            b for b in kind.__mro__[1:] if b.__module__ == "builtins" and b not in (Exception, BaseException, object)
        ]
        assert builtin, kind  # e.g. ConfigError is a ValueError too
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.MissingFileError, FileNotFoundError)
    assert not issubclass(errors.Stopped, errors.UserError)  # a stop is not an error


def test_a_stop_says_how_to_resume_and_exits_with_128_plus_the_signal():
    stop = errors.Stopped(signal.SIGTERM, 1323, "runs/r1/checkpoints/step-00001323")
    assert stop.exit_code == 143
    assert str(stop) == (
        "stopped by SIGTERM at step 1323; checkpoint runs/r1/checkpoints/step-00001323 saved. "
        "Run the same command again to resume (resume: auto)"
    )


def test_the_command_line_prints_a_user_error_as_one_line(tmp_path):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    result = CliRunner().invoke(main, ["checkpoints", "verify", str(tmp_path)])  # nothing to check is an error
    assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path} holds no run (")
    assert result.output.count("\n") == 1
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and result.output == (
        f"Error: {tmp_path / 'history.jsonl'} does not exist: pass the --output-dir of a training run\n"
    )


def test_a_config_error_is_a_usage_error_and_every_other_user_error_exits_1():
    """Exit status 2 for what the command line or the config file got wrong (as for a bad option), 1 otherwise."""
    assert errors.ConfigError("x").exit_code == 2
    assert errors.UserError("x").exit_code == errors.DataError("x").exit_code == errors.RunDirError("x").exit_code == 1


def test_the_first_line_of_an_error_or_its_type():
    assert errors.first_line(RuntimeError("connection refused\n  frame 1\n  frame 2")) == "connection refused"
    assert errors.first_line(TimeoutError()) == "TimeoutError"
