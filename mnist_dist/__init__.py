"""mnist-dist: an MNIST digit recogniser trained on 1..N processes with Hugging Face Accelerate."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Loaded on first use, so that `import mnist_dist` (and the CLI) does not pull in Pillow.
    if name == "Recognizer":
        from .inference.recognize import Recognizer

        return Recognizer
    raise AttributeError(f"module 'mnist_dist' has no attribute {name!r}")
