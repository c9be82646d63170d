"""``python -m mnist_dist.cli``: the ``mnist-dist`` command."""

from . import entry_point

if __name__ == "__main__":
    entry_point()
