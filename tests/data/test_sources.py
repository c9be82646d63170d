import gzip
import shutil
from pathlib import Path

import pytest
import torch

from mnist_dist.data import sources as data
from mnist_dist.data.idx import load_split
from mnist_dist.data.sources import DATASETS, ensure_dataset, raw_dir, verify_file
from mnist_dist.errors import DataError

from conftest import REPO, skip_or_fail

MNIST = DATASETS["mnist"]


@pytest.fixture
def copy_of_mnist(data_dir, tmp_path) -> Path:
    """A private copy of the real MNIST files that a test may damage."""
    dest = raw_dir(tmp_path, MNIST)
    shutil.copytree(raw_dir(data_dir, MNIST), dest, ignore=shutil.ignore_patterns(".*", "*.corrupt"))
    return tmp_path


def test_real_mnist_has_the_official_label_counts(data_dir):
    raw = raw_dir(data_dir, MNIST)
    train_x, train_y = load_split(raw, "mnist", "train")
    test_x, test_y = load_split(raw, "mnist", "test")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 28, 28)
    assert torch.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_truncated_file_is_refused_with_the_fix(copy_of_mnist):
    path = raw_dir(copy_of_mnist, MNIST) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as err:
        ensure_dataset(copy_of_mnist, "mnist")
    msg = str(err.value)
    assert "train-images-idx3-ubyte has 1000 bytes, expected 47040016" in msg
    assert "mnist-dist data download --dataset mnist" in msg and "--replace-corrupt" in msg


def test_flipped_byte_is_caught_by_md5(copy_of_mnist):
    path = raw_dir(copy_of_mnist, MNIST) / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[500] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte has md5 .* expected 27ae3e4e"):
        ensure_dataset(copy_of_mnist, "mnist")


def test_gz_copies_are_accepted(copy_of_mnist):
    raw = raw_dir(copy_of_mnist, MNIST)
    for f in MNIST.files:
        plain = raw / f.name
        (raw / f"{f.name}.gz").write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
        plain.unlink()
    ensure_dataset(copy_of_mnist, "mnist")
    images, labels = load_split(raw, "mnist", "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)


def test_replace_corrupt_keeps_the_bad_file_and_installs_a_verified_one(copy_of_mnist, data_dir, monkeypatch):
    raw = raw_dir(copy_of_mnist, MNIST)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    good = raw_dir(data_dir, MNIST)
    # The network sources cannot be reached in tests; serve the files from a local copy instead.
    monkeypatch.setattr(data, "_sources", lambda spec: [("local copy", data._from_dir(good))])
    ensure_dataset(copy_of_mnist, "mnist", replace_corrupt=True)
    assert verify_file(raw / "t10k-labels-idx1-ubyte", MNIST.test[1]) is None
    assert (raw / "t10k-labels-idx1-ubyte.corrupt").read_bytes() == b"garbage"


def test_when_every_source_fails_the_error_lists_what_to_put_where(tmp_path, monkeypatch):
    def broken(tmp, todo):
        raise OSError("no route to host")

    monkeypatch.setattr(data, "_sources", lambda spec: [("mirror", broken)])
    with pytest.raises(DataError) as err:
        ensure_dataset(tmp_path, "mnist")
    msg = str(err.value)
    assert "mirror: no route to host" in msg
    for f in MNIST.files:
        assert str(raw_dir(tmp_path, MNIST) / f.name) in msg and f.md5 in msg
    assert not list(raw_dir(tmp_path, MNIST).glob(".fetch*")), "temporary downloads or the lock left behind"


def test_a_source_that_delivers_a_bad_file_never_replaces_anything(copy_of_mnist, tmp_path, monkeypatch):
    raw = raw_dir(copy_of_mnist, MNIST)
    target = raw / "train-labels-idx1-ubyte"
    target.unlink()
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "train-labels-idx1-ubyte").write_bytes(b"\0" * 60008)  # right size, wrong bytes
    monkeypatch.setattr(data, "_sources", lambda spec: [("bad mirror", data._from_dir(bad_dir))])
    with pytest.raises(DataError, match="md5"):
        ensure_dataset(copy_of_mnist, "mnist")
    assert not target.exists()


def test_fashion_mnist_from_the_system_copy(tmp_path, monkeypatch):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        skip_or_fail("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(data, "_sources", lambda s: [(d, data._from_dir(Path(d))) for d in s.local_dirs])
    raw = ensure_dataset(tmp_path, "fashion-mnist")
    assert raw == tmp_path / "FashionMNIST" / "raw"
    _, labels = load_split(raw, "fashion-mnist", "train")
    assert torch.bincount(labels).tolist() == [6000] * 10


# Two "nodes" sharing one data_dir: each fetches from a slow source (a copy of the real files).
FETCH_ON_A_NODE = """
import sys, time
from pathlib import Path
from mnist_dist.data import sources as data

def slow_copy(tmp, todo):
    time.sleep(1.5)  # long enough for the other node to find the files missing too
    return data._from_dir(Path(sys.argv[1]))(tmp, todo)

data._sources = lambda spec: [("a slow mirror", slow_copy)]
data.ensure_dataset(sys.argv[2], "mnist")
"""


def test_nodes_sharing_a_data_dir_fetch_once_and_never_rename_a_good_file(data_dir, tmp_path):
    import os
    import subprocess
    import sys

    shared = tmp_path / "shared"
    cmd = [sys.executable, "-c", FETCH_ON_A_NODE, str(raw_dir(data_dir, MNIST)), str(shared)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [n.communicate(timeout=120)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errors
    raw = raw_dir(shared, MNIST)
    assert all(verify_file(raw / f.name, f) is None for f in MNIST.files)
    assert not list(raw.glob("*.corrupt")) and not list(raw.glob("*.tmp")) and not list(raw.glob(".fetch*"))


def test_installing_beside_a_good_copy_leaves_it_alone(copy_of_mnist, tmp_path):
    f = MNIST.train[1]
    raw = raw_dir(copy_of_mnist, MNIST)
    other = tmp_path / "other.gz"
    other.write_bytes(gzip.compress((raw / f.name).read_bytes()))
    before = (raw / f.name).stat().st_ino
    data._install(other, raw, f)
    assert (raw / f.name).stat().st_ino == before and not list(raw.glob("*.corrupt"))


# -- a data directory that cannot take the dataset: one DataError line, nothing fetched or written --


def test_an_unusable_data_dir_is_one_line_naming_it_and_the_fix(unusable_data_dir, monkeypatch):
    def never(tmp, todo):
        raise AssertionError("nothing is fetched into a directory that cannot hold it")

    monkeypatch.setattr(data, "_sources", lambda spec: [("mirror", never)])
    before = unusable_data_dir.read_bytes() if unusable_data_dir.is_file() else None
    with pytest.raises(DataError) as err:
        ensure_dataset(unusable_data_dir, "mnist")
    message = str(err.value)
    assert message.startswith(f"data directory {unusable_data_dir} cannot be used: cannot create or write ")
    assert "\n" not in message and "--data-dir" in message and "MNIST_DATA_DIR" in message
    reason = {
        "a file": f"({unusable_data_dir} is a file, not a directory); pass a directory with --data-dir",
        "read-only": "(Read-only file system); pass a writable directory with --data-dir",
        "under /proc": "(No such file or directory); pass a writable directory with --data-dir",
    }
    assert any(r in message for r in reason.values()), message
    if before is not None:
        assert unusable_data_dir.read_bytes() == before


def test_a_read_only_data_dir_that_holds_the_dataset_is_used_as_it_is(data_dir, tmp_path):
    """Verified files need no write: a shared read-only copy (a cluster's datasets mount) just works."""
    import subprocess

    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(data_dir), str(view)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount a read-only view here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        with pytest.raises(OSError):
            (view / "probe").write_text("")  # really read-only
        assert ensure_dataset(view, "mnist") == raw_dir(view, MNIST)
    finally:
        subprocess.run(["umount", str(view)], check=True)
