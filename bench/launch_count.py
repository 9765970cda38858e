"""How many kernels each stage of a caption launches, counted on the CPU.

On a GPU the eager stages of a caption are bound by launching kernels from Python, not by the
GPU: the issue measured 14-19 ms per eager decode step of BLIP-2 OPT-2.7b on an H200 whatever the
batch, where reading the weights takes about 1 ms. A kernel launch is one non-view aten op, and
that count depends on the layer structure, not on widths: so this builds each model's real layer
counts at small widths and counts the ops per stage with a dispatch mode. Multiplied by the
measured cost of one eager op (step time / ops per step), it says what each eager stage costs on
that host, and what is left once the forward passes are captured as CUDA graphs (one launch per
replay, plus the token selection, which stays eager).

  .venv/bin/python bench/launch_count.py            (BLIP-2 OPT-2.7b's and BLIP large's structure)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts non-view aten ops while `active` (views launch nothing on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.active = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.active and not func.is_view and func.namespace == "aten" and "detach" not in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], Any]) -> int:
    counter = OpCounter()
    with torch.inference_mode(), counter:
        fn()
    return counter.count


def blip2_opt() -> Any:
    """BLIP-2 OPT-2.7b's layer structure (EVA ViT-g 39, Q-Former 12, OPT 32), widths of 64."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    config = Blip2Config(
        vision_config={**small, "num_hidden_layers": 39, "image_size": 224, "patch_size": 14, "qkv_bias": True},
        qformer_config={**small, "num_hidden_layers": 12, "encoder_hidden_size": 64, "vocab_size": 100},
        text_config={
            "model_type": "opt",
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 32,
            "num_attention_heads": 4,
            "vocab_size": 1000,
            "word_embed_proj_dim": 64,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        num_query_tokens=32,
        image_token_index=999,
    )
    return Blip2ForConditionalGeneration(config).eval()


def blip_large() -> Any:
    """BLIP large captioning's layer structure (ViT-L 24 at 384 px, BERT decoder 12), widths of 64."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 24,
            "image_size": 384,
            "patch_size": 16,
        },
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 12,
            "encoder_hidden_size": 64,
            "vocab_size": 30524,  # BLIP's [DEC] (bos) is 30522
        },
    )
    return BlipForConditionalGeneration(config).eval()


def selection_ops(decoder: Any, inputs: Any, beams: int, tokens: int) -> float:
    """Eager ops per step outside the captured forward (greedy or beam token selection): the
    difference between decoding `tokens` and half as many, so set-up and prefill cancel out."""
    from blip2_service.captioner.static_decode import TokenRules

    counter = OpCounter()
    forward = type(decoder)._forward

    def uncounted(*args: Any, **kwargs: Any) -> Any:
        counter.active = False
        try:
            return forward(decoder, *args, **kwargs)
        finally:
            counter.active = True

    decoder._forward = decoder._step_fn = uncounted
    rules = TokenRules(eos=(10**6,), pad=0, suppress=(), begin_suppress=(), length_penalty=1.0, early_stopping=False)
    totals = []
    for n in (tokens // 2, tokens // 2, tokens):  # the first allocates the caches: not counted
        counter.count = 0
        with torch.inference_mode(), counter:
            decoder.generate(inputs, rules=rules, num_beams=beams, max_new_tokens=n, min_new_tokens=0)
        totals.append(counter.count)
    return (totals[2] - totals[1]) / (tokens - tokens // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    from blip2_service.captioner.static_decode import DecodeInputs, StaticDecoder

    torch.manual_seed(0)
    model = blip2_opt()
    pixels = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
    queries = model.query_tokens.expand(1, -1, -1)
    lm = model.language_model
    embeds = torch.randn(1, 33, 64)
    mask = torch.ones(1, 33, dtype=torch.long)
    with torch.inference_mode():
        out = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    step_mask = torch.ones(1, 34, dtype=torch.long)
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    opt = {
        "vision tower": count(lambda: model.vision_model(pixel_values=pixels)),
        "Q-Former + projection": count(
            lambda: model.language_projection(
                model.qformer(
                    query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask
                ).last_hidden_state
            )
        ),
        "prefill (33 positions)": count(
            lambda: lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        ),
        "one decode step (generate, dynamic cache)": count(
            lambda: lm(input_ids=torch.tensor([[5]]), attention_mask=step_mask, cache=cache, use_cache=True)
        ),
    }
    decoder = StaticDecoder(lm, buckets=(1,), max_cache_len=33 + args.tokens, compiled=False)
    start = DecodeInputs(mask=mask, embeds=embeds)
    print("BLIP-2 OPT-2.7b structure, batch 1, non-view aten ops (= CUDA kernel launches when eager):")
    for stage, ops in opt.items():
        print(f"  {stage:44s} {ops:5d}")
    for beams in (1, 5):
        ops = selection_ops(decoder, start, beams, args.tokens)
        print(f"  {f'outside the captured step, per step, beam {beams}':44s} {ops:7.1f}")

    blip = blip_large()
    pixels = torch.randn(1, 3, 384, 384)
    with torch.inference_mode():
        image = blip.vision_model(pixel_values=pixels)[0]
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    ids = torch.tensor([[blip.config.text_config.bos_token_id]])
    print("BLIP large structure, batch 1:")
    print(f"  {'vision tower':44s} {count(lambda: blip.vision_model(pixel_values=pixels)):5d}")
    with torch.inference_mode():
        out = blip.text_decoder(
            input_ids=ids, encoder_hidden_states=image, encoder_attention_mask=image_mask, use_cache=True
        )
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    step = count(
        lambda: blip.text_decoder(
            input_ids=torch.tensor([[5]]),
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            cache=cache,
            use_cache=True,
        )
    )
    print(f"  {'one decode step (generate, dynamic cache)':44s} {step:5d}")


if __name__ == "__main__":
    main()
