"""Inference precision: a trained fp32 model as bf16 weights or int8 dynamically quantized linear layers.

- ``fp32``: the model as trained.
- ``bf16``: every weight, buffer and the KV cache in bfloat16 (the cache follows the token embedding's dtype).
  Half the bytes per decoded token; fast only where the CPU computes bf16 natively (AVX512-BF16 or AMX) or on a GPU.
- ``int8``: PyTorch's dynamic quantization of every ``nn.Linear`` (int8 weights per output channel, activations
  quantized per call), CPU only. The output projection shares its weight with the token embedding: it gets an
  int8 copy, and the embedding (and the KV cache) stay fp32.

For inference only: the copy is in eval mode, and int8 layers cannot be trained.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lm.config import ConfigError
from lm.model import TransformerLM

PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: str, key: str = "precision") -> None:
    """Raise ConfigError naming ``key``, the value and the allowed ones unless ``precision`` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not allowed: one of {', '.join(PRECISIONS)}")


def inference_model(model: TransformerLM, precision: str = "fp32") -> TransformerLM:
    """An eval-mode copy of ``model`` (fp32, on its device) at ``precision``; ``fp32`` returns ``model`` itself."""
    check_precision(precision)
    model.eval()
    if precision == "fp32":
        return model
    if precision == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    device = model.tok_emb.weight.device
    if device.type != "cpu":
        raise ConfigError(f"precision='int8' runs on the CPU only (the model is on {device}); use bf16 there")
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of the separate torchao package (not a
        # dependency here); quantize_dynamic still works and is tested (tests/unit/test_precision.py).
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, inplace=False)


def precision_of(model: nn.Module) -> str:
    """Which of PRECISIONS ``model`` runs at: int8 if any linear layer is quantized, else its embedding's dtype."""
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules()):
        return "int8"
    return "bf16" if model.tok_emb.weight.dtype == torch.bfloat16 else "fp32"
