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
KV cache it is handed; marked whole, every call became a functional copy of its own (no reuse), so
OPT's layer is split around that write (`compile_opt_layers_once`). BLIP's and T5's decoders and
T5's encoder (its blocks hand their position bias on) stay inline.
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

    mark = _region_marker()
    if mark is None:
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
            marked += _route(stack, regions[kind])
    return marked


def compile_opt_layers_once(language_model: Any) -> int:
    """BLIP-2 OPT's decoder layers as two compiled regions each, with the cache write between them.

    A decoder layer writes its new keys and values into the cache, which a region may not do
    (see above); so each layer runs as: region one (layer norm, the query, key and value
    projections), the cache write in the enclosing graph, region two (attention over the cache,
    output projection, residual, layer norm, MLP, residual): OPT's own layer, step for step, on its
    own modules and attention function. Its 32 layers then compile as two regions. Returns how many
    layers were split: 0 for another model, an OPT that norms after attention (350m), or a torch
    without regions.
    """
    decoder = getattr(getattr(language_model, "model", None), "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not layers or type(layers[0]).__name__ != "OPTDecoderLayer":
        return 0
    if not all(layer.do_layer_norm_before for layer in layers):
        return 0
    mark = _region_marker()
    if mark is None:
        return 0
    return _route(
        layers,
        functools.partial(_opt_layer, projections=mark(_opt_projections), attention=mark(_opt_attention_and_mlp)),
    )


def _region_marker() -> Any:
    """torch's `nested_compile_region`, or None (with a line in the log) where this torch has none."""
    import torch

    mark = getattr(torch.compiler, "nested_compile_region", None)
    if mark is None:
        log.info("this torch has no nested_compile_region: every layer is compiled on its own")
    return mark


def _route(layers: Any, forward: Any) -> int:
    """Make each layer's forward `forward(layer, ...)`; layers already routed are left. Returns how many were."""
    routed = 0
    for layer in layers:
        if "forward" not in vars(layer):  # once, however often asked
            layer.forward = functools.partial(forward, layer)
            routed += 1
    return routed


def _opt_layer(
    layer: Any,
    hidden_states: Any,
    attention_mask: Any = None,
    cache: Any = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_ids: Any = None,
    *,
    projections: Any,
    attention: Any,
    **kwargs: Any,
) -> Any:
    """`OPTDecoderLayer.forward` (pre-norm, no training) with the cache write outside the regions."""
    cache = cache if cache is not None else past_key_values
    query, key, value = projections(layer, hidden_states)
    if cache is not None:
        key, value = cache.update(key, value, layer.self_attn.layer_idx, kwargs=kwargs)
    return attention(layer, hidden_states, query, key, value, attention_mask, position_ids)


def _opt_projections(layer: Any, hidden_states: Any) -> tuple[Any, Any, Any]:
    attn = layer.self_attn
    batch = hidden_states.shape[0]
    normed = layer.self_attn_layer_norm(hidden_states)

    def heads(states: Any) -> Any:
        return states.view(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)

    return heads(attn.q_proj(normed) * attn.scaling), heads(attn.k_proj(normed)), heads(attn.v_proj(normed))


def _opt_attention_and_mlp(
    layer: Any, hidden_states: Any, query: Any, key: Any, value: Any, attention_mask: Any, position_ids: Any
) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.opt.modeling_opt import eager_attention_forward

    attn = layer.self_attn
    batch, length = hidden_states.shape[:2]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    attended, _ = interface(
        attn, query, key, value, attention_mask, dropout=0.0, scaling=1.0, position_ids=position_ids
    )
    hidden_states = hidden_states + attn.out_proj(attended.reshape(batch, length, -1).contiguous())
    shape = hidden_states.shape
    residual = hidden_states.reshape(-1, hidden_states.size(-1))
    mlp = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(residual))))
    return (residual + mlp).view(shape)
