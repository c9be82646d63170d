"""mnist-dist: an MNIST digit recogniser trained on 1..N processes with Hugging Face Accelerate."""

__version__ = "0.1.0"
