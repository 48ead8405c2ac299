"""lm: a hand-written decoder-only transformer, its tokenizer, data pipeline, training loop and sampler.

Pure PyTorch: nothing here imports Ray or MLflow (lmplatform builds on this package, never the reverse).
"""

__version__ = "0.1.0"
