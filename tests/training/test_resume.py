"""Resuming training, end to end: after a stop, a hard crash or a damaged checkpoint, on the same or
another number of processes. Each stopped or crashed run is compared with one never interrupted.

Random stop points come from a seed that each test prints, so a failure can be reproduced."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mnist_dist.config import Config
from mnist_dist.errors import CheckpointError
from mnist_dist.runs import checkpoints_dir
from mnist_dist.training.checkpoint import mean_rank_state
from mnist_dist.training.integrity import read_state
from mnist_dist.training.resume import check_compatible, complete_checkpoints, resolve

from conftest import (
    REPO,
    assert_continues,
    assert_same_weights,
    history,
    process_tree,
    read_metrics,
    read_until,
    run_cli,
    start,
)

# Long enough to be stopped mid-epoch (938 steps per epoch on one process) and to cross an epoch end.
STEPS = 2500
# The best recipe (shuffling, Nesterov momentum, weight decay, warm-up + cosine, augmentation,
# standardised inputs), cut to 400 steps: 235 steps an epoch, so it crosses an epoch end too.
BEST = ["--config", "configs/train/best.yaml", "--max-steps", "400"]
REFERENCE = ["--config", "configs/train/reference.yaml", "--max-steps", str(STEPS)]


def train_args(data_dir, out: Path, *extra: str, recipe=REFERENCE) -> list[str]:
    return [
        "mnist_dist.train",
        *recipe,
        "--log-every",
        "7",
        "--tracker",
        "none",
        "--cpu",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        *extra,
    ]


def untimed(metrics: dict) -> dict:
    timed = ("train_seconds", "eval_seconds", "warmup_steps", "warmup_seconds", "steady_step_seconds")
    return {k: v for k, v in metrics.items() if k not in timed}  # each start warms up again


@pytest.mark.multiprocess
@pytest.mark.parametrize("recipe,processes", [("reference", 1), ("best", 2)])
def test_sigterm_at_a_random_step_then_resume_is_bit_identical(recipe, processes, data_dir, tmp_path):
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.0 if recipe == "reference" else 0.5)
    args = dict(recipe=REFERENCE if recipe == "reference" else BEST)
    stopped = tmp_path / "stopped"
    # Stop it: SIGTERM to the command the user ran (python, or accelerate launch, which passes it on).
    proc = start(train_args(data_dir, stopped, **args), processes)
    lines = read_until(proc, "samples/s")
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-3000:]
    assert "stopped by SIGTERM at step" in output, f"seed {seed}: " + output[-3000:]
    [saved] = [
        c
        for c in complete_checkpoints(stopped)
        if f"stopped by SIGTERM at step {read_state(c)['progress']['step']};" in output
    ]
    at = read_state(saved)["progress"]
    assert 0 < at["step"] and at["step"] % 7 == 0, at  # stopped at an agreed log interval
    assert not (stopped / "metrics.json").exists()

    resumed = run_cli(train_args(data_dir, stopped, **args), processes)  # resume: auto
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved}" in resumed.stderr
    straight = run_cli(train_args(data_dir, tmp_path / "straight", **args), processes)
    assert straight.returncode == 0, straight.stderr[-3000:]

    assert_same_weights(stopped / "model.safetensors", tmp_path / "straight/model.safetensors")
    a, b = read_metrics(stopped / "metrics.json"), read_metrics(tmp_path / "straight/metrics.json")
    assert untimed(a) == untimed(b)
    records = history(stopped)
    assert {"kind": "resume", "step": at["step"]}.items() <= records[
        [h["kind"] for h in records].index("resume")
    ].items()
    print(
        f"{recipe}, {processes} process(es): stopped at step {at['step']} (epoch {at['epoch'] + 1}, batch "
        f"{at['batch']}), delay {delay:.2f} s (seed {seed}); resumed run bit-identical"
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize("written,resumed_on", [(2, 1), (1, 2), (4, 2)])
def test_resume_on_another_number_of_processes(written, resumed_on, data_dir, tmp_path):
    """The best recipe's global batches, augmentation and lr do not depend on the number of processes."""
    seed = random.randrange(10**6)
    every = random.Random(seed).randrange(40, 200)  # a mid-epoch step (235 steps an epoch)
    straight = tmp_path / f"on-{written}"
    proc = run_cli(
        # every checkpoint kept: at every 40 steps, 400 steps save 10 of them and the epoch's end an 11th
        train_args(data_dir, straight, "--checkpoint-every", str(every), "--keep-checkpoints", "20", recipe=BEST),
        written,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = checkpoints_dir(straight) / f"step-{every:08d}"
    assert read_state(saved)["progress"]["batch"] == every  # mid-epoch

    moved = tmp_path / f"on-{resumed_on}"
    proc = run_cli(train_args(data_dir, moved, "--resume", str(saved), recipe=BEST), resumed_on)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {saved.name} was written by {written} process(es), continuing on {resumed_on}" in proc.stderr
    metrics = read_metrics(moved / "metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (resumed_on, 400)
    gap, accuracy_gap = assert_continues(moved, straight, every)
    print(
        f"{written} -> {resumed_on} processes at step {every} (seed {seed}): after {400 - every} more steps the "
        f"weights differ from the uninterrupted run by at most {gap:.2e}; test correct differs by {accuracy_gap}"
    )


@pytest.mark.multiprocess
def test_every_rank_killed_then_the_same_command_reads_as_one_run(data_dir, tmp_path):
    """A node lost (every process SIGKILLed, no checkpoint of its own) between two checkpoints."""
    from mnist_dist.tracking.report import load_history

    from wandb_files import offline_runs, read_wandb_records, wandb_history

    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 2.0)
    run = tmp_path / "crashed"
    args = train_args(data_dir, run, "--checkpoint-every", "150", "--max-steps", "2000")
    args[args.index("--tracker") + 1] = "wandb"  # offline (conftest): the run files are read back below
    proc = start(args, 2)
    read_until(proc, "samples/s")
    time.sleep(delay)
    tree = process_tree(proc.pid)
    assert len(tree) >= 3, tree  # the launcher and its two ranks
    for pid in tree:  # all at once, as when a node is lost
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    logged = [r["step"] for r in history(run) if r["kind"] == "step"]
    saved = complete_checkpoints(run)
    at = read_state(saved[-1])["progress"]["step"] if saved else 0

    again = run_cli(args, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    records = history(run)
    steps = [r["step"] for r in records if r["kind"] == "step"]
    epochs = [r["step"] for r in records if r["kind"] == "epoch"]
    assert steps == list(range(7, 2001, 7)), f"seed {seed}: {steps}"  # each logged step once, in order
    assert epochs == [938, 1876, 2000] and len([r for r in records if r["kind"] == "summary"]) == 1
    drawn = load_history(run)  # what `mnist-dist report` draws: one line per metric
    assert [r["step"] for r in drawn["step"]] == steps

    runs = offline_runs(run)
    ids = {path.name.rsplit("-", 1)[1] for path in runs}
    assert len(runs) == 2 and len(ids) == 1, runs  # the crashed attempt and its continuation: one wandb run
    transaction_log = next(runs[1].glob("*.wandb"), None)
    if transaction_log is None:  # say what each offline run holds and what the continuation printed, in full
        held = {str(path): sorted(str(p.relative_to(path)) for p in path.rglob("*")) for path in runs}
        pytest.fail(f"no wandb transaction log in {runs[1]}: {held}\n{again.stderr[-4000:]}", pytrace=False)
    continued = read_wandb_records(transaction_log)
    rows = [step for step, _ in wandb_history(continued)]
    assert rows and rows[0] > at and rows[-1] == 2000, (at, rows)
    lost = [s for s in logged if s > at]
    [run_record] = [r.run for r in continued if r.WhichOneof("record_type") == "run"]
    if lost:  # the crashed attempt logged past the checkpoint: the continuation rewinds the run to it
        point = run_record.branch_point  # what `wandb sync` sends, as an online run would at its start
        assert (point.run, point.value, point.metric) == (ids.pop(), at, "_step"), point
    straight = run_cli(train_args(data_dir, tmp_path / "straight", "--max-steps", "2000"), 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_weights(run / "model.safetensors", tmp_path / "straight/model.safetensors")
    print(
        f"killed after {delay:.2f} s (seed {seed}) at about step {logged[-1] if logged else 0}; "
        f"resumed from step {at}; {len(lost)} logged steps redone; one history, one wandb run; bit-identical"
    )


def test_the_same_resume_path_command_twice_does_not_redo_the_work(data_dir, tmp_path):
    source = tmp_path / "source"
    first = run_cli(
        train_args(data_dir, source, "--max-steps", "300", "--checkpoint-every", "100", "--keep-checkpoints", "5")
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_state(checkpoints_dir(source) / "step-00000100")["progress"]["train_seconds"] > 0  # time so far
    command = train_args(
        data_dir,
        tmp_path / "continued",
        "--max-steps",
        "300",
        "--resume",
        str(checkpoints_dir(source) / "step-00000100"),
    )
    once = run_cli(command)
    assert once.returncode == 0 and "samples/s" in once.stderr, once.stderr[-3000:]
    weights = (tmp_path / "continued/model.safetensors").read_bytes()
    twice = run_cli(command)  # e.g. a requeued job: its own newer checkpoint wins
    assert twice.returncode == 0, twice.stderr[-3000:]
    assert "holds a newer checkpoint (step 300) than --resume" in twice.stderr
    assert "training ended at this checkpoint (step 300)" in twice.stderr and "samples/s" not in twice.stderr
    assert (tmp_path / "continued/model.safetensors").read_bytes() == weights
    assert_same_weights(tmp_path / "continued/model.safetensors", source / "model.safetensors")


def test_a_stop_signal_at_the_last_step_ends_the_run_normally(data_dir, tmp_path):
    """No log interval before the end: the signal is agreed on at the last step, which saves nothing."""
    args = train_args(data_dir, tmp_path / "signalled", "--max-steps", "900", "--log-every", "1000")
    proc = start(args, 1, env={"SLURM_JOB_ID": "4242"})  # a requeue would be attempted, and say so
    lines = read_until(proc, "training mnist on 1 process")
    proc.send_signal(signal.SIGUSR1)
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "SIGUSR1 at the last step: finishing the run normally" in output, output[-3000:]
    assert "stopped by" not in output and "requeue" not in output
    straight = run_cli(train_args(data_dir, tmp_path / "straight", "--max-steps", "900", "--log-every", "1000"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert untimed(read_metrics(tmp_path / "signalled/metrics.json")) == untimed(
        read_metrics(tmp_path / "straight/metrics.json")
    )


@pytest.mark.multiprocess
def test_sigusr1_sent_to_the_launcher_alone_reaches_every_rank(data_dir, tmp_path):
    """With launch/_common.sh's settings, torch's launcher passes SIGUSR1 on and waits for the checkpoint."""
    exported = subprocess.run(
        ["bash", "-c", "source launch/_common.sh >/dev/null && env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MNIST_DIST_DIR": str(REPO)},
    )
    pet = dict(line.split("=", 1) for line in exported.stdout.splitlines() if line.startswith("PET_"))
    assert "SIGUSR1" in pet["PET_SIGNALS_TO_HANDLE"].split(","), pet
    run = tmp_path / "run"
    proc = start(train_args(data_dir, run), 2, env=pet)
    lines = read_until(proc, "samples/s")
    os.kill(proc.pid, signal.SIGUSR1)  # the launcher only, as some clusters deliver it
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert "stopped by SIGUSR1 at step" in output, output[-3000:]
    step = int(output.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert complete_checkpoints(run)[-1].name == f"step-{step:08d}"
    assert "random_states_1.pkl" in read_state(complete_checkpoints(run)[-1])["files"]
    print(f"SIGUSR1 to the launcher: both ranks stopped at step {step}, checkpoint complete")


def test_a_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(data_dir, tmp_path):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    run = tmp_path / "run"
    args = train_args(data_dir, run, "--max-steps", "300", "--checkpoint-every", "100", "--keep-checkpoints", "3")
    assert run_cli(args).returncode == 0
    straight = (run / "model.safetensors").read_bytes()
    newest = checkpoints_dir(run) / "step-00000300"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x04  # one flipped bit in a weight
    (newest / "model.safetensors").write_bytes(bytes(data))

    result = CliRunner().invoke(main, ["checkpoints", "verify", str(run)])
    assert (
        result.exit_code == 1
        and "checkpoints/step-00000300: damaged: model.safetensors does not match" in result.output
    )

    again = run_cli(args)  # the same command: falls back to step 200 and trains its 100 steps again
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in again.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == 1 and "model.safetensors does not match its checksum" in warnings[0], again.stderr
    assert f"resumed from {checkpoints_dir(run) / 'step-00000200'}" in again.stderr
    assert (run / "model.safetensors").read_bytes() == straight
    [damaged] = checkpoints_dir(run).glob("step-00000300.damaged-*")  # kept for inspection

    refused = run_cli([*args, "--resume", str(damaged)])
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"Error: --resume {damaged}: this checkpoint cannot be used: model.safetensors does not match its checksum"
        )
    )
    # The run's final weights are protected the same way.
    final = bytearray((run / "model.safetensors").read_bytes())
    final[len(final) // 2] ^= 0x01
    (run / "model.safetensors").write_bytes(bytes(final))
    for weights in (run, run / "model.safetensors"):
        proc = run_cli(["mnist_dist.evaluate", "--weights", str(weights), "--cpu", "--data-dir", str(data_dir)])
        assert proc.returncode == 1 and "does not match the SHA-256 its run recorded" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path):
    args = [
        "mnist_dist.train",
        "--max-steps",
        "40",
        "--tracker",
        "none",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(tmp_path),
    ]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "model.safetensors").read_bytes(), read_metrics(tmp_path / "metrics.json")
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and "samples/s" not in again.stderr  # no step trained
    assert (tmp_path / "model.safetensors").read_bytes() == before[0]
    after = read_metrics(tmp_path / "metrics.json")
    assert untimed(after) == untimed(before[1]) and after["train_seconds"] == before[1]["train_seconds"]


def test_refusals_are_one_line_and_keep_the_checkpoints(data_dir, tmp_path):
    args = [
        "mnist_dist.train",
        "--max-steps",
        "20",
        "--tracker",
        "none",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(tmp_path),
    ]
    assert run_cli(args).returncode == 0
    kept = complete_checkpoints(tmp_path)
    for extra, expected in [
        (["--resume", "none"], "already holds checkpoints of a run"),
        (["--lr", "0.1"], "lr 0.5 -> 0.1"),
        (["--lr-schedule", "cosine"], "lr_schedule 'constant' -> 'cosine'"),
        (["--resume", str(tmp_path / "nowhere")], "no such checkpoint directory"),
    ]:
        proc = run_cli([*args, *extra])
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: ") and expected in proc.stderr, proc.stderr
    assert complete_checkpoints(tmp_path) == kept


def test_loader_skips_the_batches_already_seen_once():
    from mnist_dist.data.loaders import TensorImages, make_loader

    data = TensorImages(torch.zeros(10, 1, dtype=torch.uint8), torch.arange(10))
    loader = make_loader(data, 3, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader.batch_sampler.sampler.set_epoch(1)
    full = [labels.tolist() for _, labels, _ in loader]
    loader.batch_sampler.skip_next(2)
    assert [labels.tolist() for _, labels, _ in loader] == full[2:]
    assert [labels.tolist() for _, labels, _ in loader] == full  # the pass after starts at 0


# -- which checkpoint, and whether it may continue ------------------------------------------


def test_resume_path_never_goes_behind_the_run_directory(saver, tmp_path, caplog):
    source, own = tmp_path / "source", tmp_path / "own"
    requested = saver(source, 100)
    assert resolve(Config(resume=str(requested)), own) == requested  # nothing of its own yet
    newer = saver(own, 250)
    with caplog.at_level(logging.INFO, logger="mnist_dist"):
        assert resolve(Config(resume=str(requested)), own) == newer
        assert resolve(Config(resume=str(source)), own) == newer  # a run directory as PATH
    assert "holds a newer checkpoint (step 250) than --resume" in caplog.text
    assert resolve(Config(resume=str(saver(source, 300))), own).name == "step-00000300"


def test_compatibility_rules(tmp_path):
    saved = {"world_size": 2, "config": Config().to_dict(), "progress": {"epoch": 3, "step": 2814}}
    assert check_compatible(saved, Config(output_dir="elsewhere", log_every=5, epochs=20), 2, tmp_path) is None
    # Another number of processes: the same global batches in batch_mode global.
    note = check_compatible(saved, Config(), 1, tmp_path / "step-00002814")
    assert note == "checkpoint step-00002814 was written by 2 process(es), continuing on 1"
    with pytest.raises(CheckpointError, match=r"cannot continue on 3 processes: .*'batch_size' \(64\)"):
        check_compatible(saved, Config(), 3, tmp_path)
    per_device = {**saved, "config": Config(batch_mode="per_device").to_dict()}
    with pytest.raises(CheckpointError, match=r"per_device.*global batch would change \(128 -> 256\)"):
        check_compatible(per_device, Config(batch_mode="per_device"), 4, tmp_path)
    with pytest.raises(CheckpointError, match="momentum 0.0 -> 0.9"):
        check_compatible(saved, Config(momentum=0.9), 2, tmp_path)
    with pytest.raises(CheckpointError, match="beyond this run"):
        check_compatible(saved, Config(epochs=2), 2, tmp_path)
    cosine = {**saved, "config": Config(lr_schedule="cosine").to_dict()}
    with pytest.raises(CheckpointError, match="epochs 10 -> 20"):  # the schedule depends on the length
        check_compatible(cosine, Config(lr_schedule="cosine", epochs=20), 2, tmp_path)


def test_rank_state_of_another_world_size_keeps_the_mean(tmp_path):
    for rank, loss in enumerate((1.0, 2.0, 6.0)):
        (tmp_path / f"rank-{rank}.json").write_text(
            json.dumps({"interval_loss": loss, "interval_steps": 4, "epoch_loss": 10 * loss, "epoch_steps": 9})
        )
    mean = mean_rank_state(tmp_path, 3)
    assert mean == {"interval_loss": 3.0, "interval_steps": 4, "epoch_loss": 30.0, "epoch_steps": 9}


# -- a run continued with a larger step limit ---------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("recipe,processes", [("reference", 1), ("shuffled", 2)])
def test_a_raised_step_limit_continues_exactly(recipe, processes, data_dir, tmp_path):
    """300 (mid-epoch) -> 938 (an epoch's end) -> 1000 steps ends bit-identical to 1000 steps straight,
    and the history logs every step once (938 steps an epoch with batch 64)."""
    extra = ["--shuffle"] if recipe == "shuffled" else []
    run, straight = tmp_path / "raised", tmp_path / "straight"
    for limit in (300, 938, 1000):
        proc = run_cli(train_args(data_dir, run, "--max-steps", str(limit), "--log-every", "50", *extra), processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert read_metrics(run / "metrics.json")["steps"] == limit
    at = read_state(complete_checkpoints(run)[-1])["progress"]
    assert (at["step"], at["epoch"], at["batch"]) == (1000, 1, 62)
    proc = run_cli(train_args(data_dir, straight, "--max-steps", "1000", "--log-every", "50", *extra), processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(run / "model.safetensors", straight / "model.safetensors")
    steps = [r["step"] for r in history(run) if r["kind"] == "step"]
    assert steps == [r["step"] for r in history(straight) if r["kind"] == "step"] == list(range(50, 1001, 50))
    assert read_metrics(run / "metrics.json")["test_correct"] == read_metrics(straight / "metrics.json")["test_correct"]


# -- what a command never does to a run directory ------------------------------------------


def refused(proc, expected: str) -> str:
    """The one ``Error:`` line of a refused command (no traceback), which must hold ``expected``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines and lines[-1].startswith("Error: "), proc.stderr[-3000:]
    assert expected in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in lines if "WARNING" in line], proc.stderr[-3000:]
    return lines[-1]


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_not_restarted(data_dir, tmp_path):
    from conftest import file_digests
    from saving import flip_byte

    args = train_args(data_dir, tmp_path, "--max-steps", "30", "--checkpoint-every", "10", "--keep-checkpoints", "2")
    assert run_cli(args).returncode == 0
    for saved in complete_checkpoints(tmp_path):
        flip_byte(saved / "optimizer.bin")
    finished = file_digests(tmp_path)
    line = refused(run_cli(args), f"every checkpoint of {tmp_path} is damaged (step-00000020: optimizer.bin")
    assert "step-00000030: optimizer.bin" in line and f"mnist-dist checkpoints verify {tmp_path}" in line
    assert file_digests(tmp_path) == finished  # the finished run's weights and metrics are as they were
    for name in ("model.safetensors", "metrics.json"):  # the same, killed after its checkpoints
        (tmp_path / name).unlink()
    unfinished = file_digests(tmp_path)
    refused(run_cli([*args, "--max-steps", "60"]), "is damaged")
    assert file_digests(tmp_path) == unfinished


def test_a_finished_run_without_checkpoints_is_never_overwritten(data_dir, tmp_path):
    from conftest import file_digests

    args = train_args(data_dir, tmp_path, "--max-steps", "10")
    assert run_cli(args).returncode == 0
    shutil.rmtree(checkpoints_dir(tmp_path))
    before = file_digests(tmp_path)
    for extra in ([], ["--resume", "none"]):
        refused(run_cli([*args, *extra]), "holds a finished run (model.safetensors, metrics.json)")
    assert file_digests(tmp_path) == before


def test_a_changed_config_never_takes_over_a_run_killed_before_its_first_checkpoint(data_dir, tmp_path):
    """Its history and wandb run belong to the old config: refused, naming the key; --resume none replaces it."""
    from conftest import file_digests
    from wandb_files import offline_runs

    args = train_args(data_dir, tmp_path, "--max-steps", "900")
    args[args.index("--tracker") + 1] = "wandb"  # offline (conftest)
    proc = start(args, 1)
    read_until(proc, "samples/s")
    for pid in process_tree(proc.pid):  # the run and wandb's service with it, as when its node is lost
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not complete_checkpoints(tmp_path) and (tmp_path / "history.jsonl").is_file()
    dead = {path.name.rsplit("-", 1)[1] for path in offline_runs(tmp_path)}
    before = file_digests(tmp_path)
    assert ".lock/owner.json" in before  # the killed run's, left behind
    refused(run_cli([*args, "--lr", "0.1"]), "holds a run with a different config (lr 0.5 -> 0.1)")
    assert file_digests(tmp_path) == {k: v for k, v in before.items() if not k.startswith(".lock")}  # lock: stale
    replaced = run_cli([*args, "--lr", "0.1", "--max-steps", "20", "--resume", "none"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    ids = {path.name.rsplit("-", 1)[1] for path in offline_runs(tmp_path)}
    assert len(dead) == 1 and len(ids) == 2 and dead < ids  # a wandb run of its own
    assert [r["config"]["lr"] for r in history(tmp_path) if r["kind"] == "config"] == [0.1]
