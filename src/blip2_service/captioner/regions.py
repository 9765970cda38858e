"""Compile a stack of identical layers once, not once per layer.

torch.compile traces and lowers a model's graph node by node, so its start-up grows with depth:
BLIP-2 OPT-2.7b is 39 ViT layers, 12 Q-Former layers and 32 OPT layers, each traced, lowered and
code-generated again in each compiled stage (bench/RESULTS.md, "Start-up").
`nested_compile_region` tells the compiler a function is a repeated region: it is compiled the
first time it is met and its code called again for every layer whose inputs match (shapes, dtypes,
module attributes: the Q-Former's layers with and without cross-attention are two regions; a
region used only once is inlined). Outside torch.compile the wrapper does nothing.

A region may not write to its inputs nor hand one back. The image encoders' layers do neither and
are marked whole (`compile_layers_once`). A decoder layer writes its new keys and values into the
KV cache it is handed; marked whole, every call became a functional copy of its own (no reuse):
the decoders stay inline, and so does T5's encoder (its blocks hand their position bias on).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


def compile_layers_once(*modules: Any) -> int:
    """Mark every stack of identical layers in `modules` as a repeated compile region.

    A stack is an `nn.ModuleList` of two or more modules of one class. Returns how many layers
    were marked (0 where this torch has no `nested_compile_region`: they compile inline, as before).
    """
    import torch

    mark = getattr(torch.compiler, "nested_compile_region", None)
    if mark is None:
        log.info("this torch has no nested_compile_region: every layer is compiled on its own")
        return 0
    regions: dict[type, Any] = {}
    marked = 0
    for module in modules:
        for stack in module.modules():
            if not isinstance(stack, torch.nn.ModuleList) or len(stack) < 2:
                continue
            kinds = {type(layer) for layer in stack}
            if len(kinds) != 1:
                continue
            kind = kinds.pop()
            if kind not in regions:  # one region per layer class: its compiled code is shared
                regions[kind] = mark(kind.forward)
            for layer in stack:
                if "forward" not in vars(layer):  # marked once, however often asked
                    layer.forward = functools.partial(regions[kind], layer)
                    marked += 1
    return marked
