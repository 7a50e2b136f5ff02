"""kvsim: how much KV-cache memory an LLM deployment needs and how fast it will serve."""

__version__ = "0.1.0"
