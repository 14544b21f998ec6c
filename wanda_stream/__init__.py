"""wanda-stream: Wanda pruning of large language models, one decoder block at a time."""

__version__ = "0.1.0"
