"""``python -m mnist_dist.train``: the ``mnist-dist train`` command as a module, for launchers
(``accelerate launch -m mnist_dist.train``, torchrun). The training itself is in ``training/``."""

from .cli import run_as_process, train_command

if __name__ == "__main__":
    run_as_process(train_command, prog_name="python -m mnist_dist.train")
