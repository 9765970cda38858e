"""bfloat16 on CPU: hand oneDNN its weights once, in its own layout, instead of at every call.

A plain `nn.Linear` in bfloat16 makes oneDNN reorder the weight for AMX on every call; decoding
one token touches every weight of the language model, so that reorder is paid billions of bytes
at a time. Measured here (bench/RESULTS.md): 5-6 ms per 2560x10240 layer as `nn.Linear`,
2.7-3.6 ms prepacked. Applied only on CPU, only to bfloat16 layers, only where oneDNN runs bf16.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _prepacked_linear_class() -> Any:
    import torch
    from torch import nn

    class PrepackedLinear(nn.Module):  # type: ignore[misc]
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            self.register_buffer("packed_weight", linear.weight.detach().to_mkldnn(), persistent=False)
            bias = linear.bias.detach().to_mkldnn() if linear.bias is not None else None
            self.register_buffer("packed_bias", bias, persistent=False)
            # Some model code reads `layer.weight.dtype` (T5's feed-forward casts its input to it):
            # a weightless stand-in of the right shape and dtype answers that without a second copy.
            self.weight = torch.empty(linear.weight.shape, dtype=linear.weight.dtype, device="meta")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dense_in = x.contiguous().to_mkldnn()
            return torch._C._nn.mkldnn_linear(dense_in, self.packed_weight, self.packed_bias).to_dense()

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, prepacked bf16"

    PrepackedLinear.prepacked = True
    return PrepackedLinear


def has_prepacked_layers(model: Any) -> bool:
    """True when some layer holds oneDNN-packed weights: opaque tensors torch.compile cannot trace."""
    return any(getattr(module, "prepacked", False) for module in model.modules())


def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 linears on this CPU at all: without AVX-512 (an AVX2-only EPYC,
    say) `mkldnn_linear` raises on the first call instead of falling back."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def prepack_bf16_linears(model: Any) -> int:
    """Swap every bfloat16 `nn.Linear` of `model` (on CPU) for a prepacked one; returns how many."""
    import torch
    from torch import nn

    if not mkldnn_bf16_supported():
        return 0
    cls = _prepacked_linear_class()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(module))
    if targets:
        log.info("prepacked %d bfloat16 linear layers for oneDNN", len(targets))
    return len(targets)
