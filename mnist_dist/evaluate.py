"""``python -m mnist_dist.evaluate``: the ``mnist-dist eval`` command as a module, for launchers
(``accelerate launch -m mnist_dist.evaluate``, torchrun). The evaluation itself is in ``evaluation.py``."""

from .cli import eval_command, run_as_process

if __name__ == "__main__":
    run_as_process(eval_command, prog_name="python -m mnist_dist.evaluate")
