"""The evaluation job (``mnist-dist eval``, ``python -m mnist_dist.evaluate``): exact on any number of
processes, and its --output never overwrites a run's files or the weights it evaluates."""

import pytest

from conftest import RUN_TARGETS, assert_one_error_line, digests, read_metrics, run_cli


@pytest.mark.multiprocess
def test_exact_global_accuracy_on_any_world_size(trained_weights, data_dir, tmp_path):
    """1, 3 and 7 processes count each of the 10,000 images once and agree exactly."""
    results = {}
    for world in (1, 3, 7):
        out = tmp_path / f"eval{world}.json"
        proc = run_cli(
            [
                "mnist_dist.evaluate",
                "--weights",
                str(trained_weights),
                "--data-dir",
                str(data_dir),
                "--cpu",
                "--eval-batch-size",
                "512",
                "--output",
                str(out),
            ],
            processes=world,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = read_metrics(out)
    for world, m in results.items():
        assert m["world_size"] == world
        assert m["test_total"] == 10000
        assert m["test_correct"] == results[1]["test_correct"]
        assert m["confusion_matrix"] == results[1]["confusion_matrix"]
        assert sum(map(sum, m["confusion_matrix"])) == 10000
        assert m["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-6)
    assert results[1]["test_accuracy"] > 0.9


# --- eval --output never overwrites the run's files or the weights it evaluates ---------------


@pytest.mark.parametrize("target", [*RUN_TARGETS, "loose weights"])
def test_eval_output_refuses_a_runs_files_and_its_input(run_copy, tmp_path, data_dir, target):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((run_copy / "model.safetensors").read_bytes())
    weights, output = (loose, loose) if target == "loose weights" else (run_copy, run_copy / target)
    before = digests(tmp_path)
    args = ["eval", "--weights", str(weights), "--output", str(output), "--cpu", "--data-dir", str(data_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    line = assert_one_error_line(result.output)
    assert f"--output {output} is " in line and "write it elsewhere, e.g. --output " in line
    assert line.endswith("eval.json")
    assert digests(tmp_path) == before


def test_python_m_evaluate_refuses_a_runs_metrics_end_to_end(run_copy, data_dir):
    """The real entry point, in its own process: one line, exit status 1, the run untouched, nothing evaluated."""
    before = digests(run_copy)
    output = run_copy / "metrics.json"
    args = ["mnist_dist.evaluate", "--weights", str(run_copy), "--output", str(output), "--cpu"]
    proc = run_cli([*args, "--data-dir", str(data_dir)], timeout=120)
    assert proc.returncode == 1 and "test accuracy" not in proc.stdout
    assert assert_one_error_line(proc.stderr) == (
        f"Error: --output {output} is the run's metrics and weights checksum ({run_copy} is a run directory); "
        f"write it elsewhere, e.g. --output {run_copy}/eval.json"
    )
    assert digests(run_copy) == before
