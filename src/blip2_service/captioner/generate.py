"""Turn a batch of preprocessed images into captions with as few `generate` calls as possible.

Pixel preprocessing (`preprocess`) is separate from `caption_batch` so the
pipeline can run it on worker threads, overlapped with the model, and the
inference thread only stacks tensors and generates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from PIL import Image

from ..domain import BadInput, GenerationSettings
from .loading import LoadedModel
from .pixels import PixelPrep
from .regions import compile_layers_once
from .static_decode import (
    DecodeInputs,
    StaticDecoder,
    TokenRules,
    dynamic_rows,
    pad_rows,
    prepare_compiling_thread,
    unsupported_reason,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class Captioner:
    def __init__(self, loaded: LoadedModel, *, decoder: StaticDecoder | None = None) -> None:
        """`decoder`: the static-cache decode loop (COMPILE); without it every batch goes to `generate`."""
        self.loaded = loaded
        self.decoder = decoder
        self._model = loaded.model
        self._processor = loaded.processor
        self._tokenizer = loaded.processor.tokenizer
        self._image_processor = loaded.processor.image_processor
        self.pixels = PixelPrep(self._image_processor, loaded.device, loaded.dtype)
        self._is_encoder_decoder = loaded.kind == "blip2" and bool(loaded.model.config.text_config.is_encoder_decoder)
        self._is_decoder_only = loaded.kind == "blip2" and not self._is_encoder_decoder
        # With the compiled decoder, the image side (vision tower, Q-Former) is recorded per bucket too:
        # eager, it launches ~600 kernels for BLIP-2 (bench/launch_count.py), about as many as a decode step.
        self._encode_fn: Any = self._encode_images
        self._text_encode_fn: Any = self._encode_text
        # torch.compile's CUDA graphs belong to the thread that recorded them (its graph trees are
        # thread-local): warmed on the loader thread, they would be recorded again, in a second
        # memory pool, by the first requests on the inference thread. Dynamo's settings are per
        # thread too. One thread compiles and runs them all.
        self._owner: ThreadPoolExecutor | None = None
        if decoder is not None and decoder.compiled:
            import torch

            mode = "reduce-overhead" if loaded.device.type == "cuda" else "default"
            compile_layers_once(*self._encoders())
            self._encode_fn = torch.compile(self._encode_images, mode=mode, fullgraph=True)
            self._text_encode_fn = torch.compile(self._encode_text, mode=mode, fullgraph=True)
            self._owner = ThreadPoolExecutor(1, thread_name_prefix="decode", initializer=prepare_compiling_thread)
        self._generation_config = loaded.model.generation_config
        self._image_token_ids: list[int] = []
        if loaded.kind == "blip2":
            self._image_token_ids = [loaded.model.config.image_token_index] * int(loaded.model.config.num_query_tokens)
        # An encoder-decoder's encoder reads the image queries and the tokenised prompt ("" -> </s>).
        self._unprompted_source_len = len(self._image_token_ids) + len(self._tokenizer("")["input_ids"])
        text_config = loaded.model.config.text_config
        # Learned absolute positions bound the sequence; T5's relative ones do not.
        self._position_limit: int | None = (
            None if text_config.is_encoder_decoder else getattr(text_config, "max_position_embeddings", None)
        )

    @property
    def name(self) -> str:
        return self.loaded.name

    def preprocess(self, image: Image.Image) -> Any:
        """Resize one image for the model (thread-safe, no model state); normalised later, on the device."""
        return self.pixels.prepare(image)

    def check_prompt(self, settings: GenerationSettings) -> None:
        """Refuse a prompt the model has no room for (BadInput, 400), before it is accepted.

        The room is the language model's position embeddings less what else fills them: the
        image's query tokens (BLIP-2) and MAX_NEW_TOKENS. Counted in the model's own tokens: a
        character limit alone let a 500-character prompt overflow tiny-random's 256 positions.
        """
        if not settings.prompt:
            return
        room = self.prompt_room(settings.max_new_tokens)
        if room is None:
            return
        used = len(self._tokenizer(settings.prompt)["input_ids"])
        if used > room:
            raise BadInput(
                f"prompt is {used} tokens; this model has room for {room} "
                f"({self._position_limit} positions less {len(self._image_token_ids)} image tokens "
                f"less MAX_NEW_TOKENS={settings.max_new_tokens}): shorten the prompt"
            )

    def prompt_room(self, max_new_tokens: int) -> int | None:
        """Tokens a prompt may take (with its BOS), or None where positions do not bound it (T5)."""
        if self._position_limit is None:
            return None
        return max(0, self._position_limit - len(self._image_token_ids) - max_new_tokens)

    def caption_batch(self, pixels: Sequence[Any], settings: Sequence[GenerationSettings]) -> list[list[str]]:
        """Captions for each input (a list of `num_captions` texts), in input order.

        Inputs that can share a `generate` call are grouped; on a CUDA
        out-of-memory error a group is split in halves and retried, so a large
        batch degrades to smaller ones instead of failing every request in it.
        """
        return self._on_owner(self._caption_batch, pixels, settings)

    def _on_owner(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the thread that owns the compiled graphs (directly when there is none)."""
        if self._owner is None:
            return fn(*args)
        return self._owner.submit(fn, *args).result()

    def _caption_batch(self, pixels: Sequence[Any], settings: Sequence[GenerationSettings]) -> list[list[str]]:
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for index, item in enumerate(settings):
            groups[self._group_key(item)].append(index)
        results: list[list[str]] = [[] for _ in pixels]
        for indexes in groups.values():
            texts = self._generate_splitting([pixels[i] for i in indexes], [settings[i] for i in indexes])
            for i, captions in zip(indexes, texts, strict=True):
                results[i] = captions
        return results

    def _group_key(self, item: GenerationSettings) -> tuple[Any, ...]:
        # BLIP rewrites the first prompt token in place, so it cannot mix prompts in one call.
        prompt_key: Any = item.prompt if self.loaded.kind == "blip" else bool(item.prompt)
        return (item.num_beams, item.max_new_tokens, item.min_new_tokens, item.num_captions, prompt_key)

    def _generate_splitting(self, pixels: list[Any], settings: list[GenerationSettings]) -> list[list[str]]:
        import torch

        try:
            return self._generate(pixels, settings)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            log.warning("out of memory at batch %d; retrying as %d + %d", len(pixels), half, len(pixels) - half)
            return self._generate_splitting(pixels[:half], settings[:half]) + self._generate_splitting(
                pixels[half:], settings[half:]
            )

    def _generate(self, pixels: list[Any], settings: list[GenerationSettings]) -> list[list[str]]:
        import torch

        first = settings[0]
        device = self.loaded.device
        pixel_values = self.pixels.batch(pixels)
        kwargs: dict[str, Any] = {
            "max_new_tokens": first.max_new_tokens,
            "min_new_tokens": first.min_new_tokens,
        }
        if first.sampled:
            kwargs.update(do_sample=True, top_p=0.9, num_beams=1, num_return_sequences=first.num_captions)
        else:
            kwargs.update(do_sample=False, num_beams=first.num_beams)
        inputs: dict[str, Any] = {"pixel_values": pixel_values}
        prompts = [item.prompt or "" for item in settings]
        if any(prompts) or self._is_encoder_decoder:
            # An encoder-decoder (Flan-T5) always gets its text input, empty or not: it has no BOS
            # for `generate` to start from, and LAVIS feeds it the tokenised prompt ("" -> </s>).
            inputs.update(self._encode_prompts(prompts, device))
        # BLIP-2 hands generation to its language model, whose own generation config
        # would otherwise replace the checkpoint's (suppressed tokens, special ids).
        config = copy.deepcopy(self._generation_config)
        config.update(**kwargs)
        output = self._generate_static(inputs, config, first) if self._static_fits(first, config) else None
        if output is None:
            with torch.inference_mode(), attention_kernels(device):
                output = self._model.generate(**inputs, generation_config=config)
            if self._is_decoder_only:
                prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else len(self._image_token_ids) + 1
                output = output[:, prompt_len:]
        texts = [t.strip() for t in self._tokenizer.batch_decode(output, skip_special_tokens=True)]
        if self.loaded.kind == "blip" and first.prompt:
            texts = [_strip_prefix(t, first.prompt) for t in texts]
        n = first.num_captions if first.sampled else 1
        return [texts[i * n : (i + 1) * n] for i in range(len(pixels))]

    def _static_fits(self, first: GenerationSettings, config: Any) -> bool:
        return self.decoder is not None and not first.sampled and unsupported_reason(config) is None

    def _generate_static(self, inputs: dict[str, Any], config: Any, first: GenerationSettings) -> Any:
        """Token ids from the static decoder, as `generate` returns them for this family, or None
        when the prompt leaves it no room (then `generate` decodes).

        Each chunk of at most the largest bucket is padded up to its bucket (copies of its first
        row) before the image is encoded, so every stage runs at a shape recorded at warm-up.
        """
        import torch

        decoder = self.decoder
        assert decoder is not None
        rules = self._token_rules(config)
        total = inputs["pixel_values"].shape[0]
        outputs = []
        prompts = []
        with torch.inference_mode(), attention_kernels(self.loaded.device):
            for first_row in range(0, total, decoder.largest):
                rows = min(decoder.largest, total - first_row)
                bucket = decoder.bucket_for(rows) or rows
                chunk = {key: pad_rows(value[first_row : first_row + rows], bucket) for key, value in inputs.items()}
                start = self._decode_inputs(chunk)
                source_len = 0 if start.encoder_states is None else start.encoder_states.shape[1]
                if not decoder.fits(start.mask.shape[1], first.max_new_tokens, source_len):
                    return None
                tokens = decoder.generate(
                    start,
                    rules=rules,
                    num_beams=first.num_beams,
                    max_new_tokens=first.max_new_tokens,
                    min_new_tokens=first.min_new_tokens,
                )
                outputs.extend(tokens[:rows].unbind(0))
                if start.ids is not None:
                    prompts.append(start.ids[:rows])
        new = torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True, padding_value=rules.pad)
        # BLIP's generate returns its prompt (BOS first) before the new tokens; the caller strips it.
        return torch.cat([torch.cat(prompts), new], dim=1) if self.loaded.kind == "blip" else new

    def _encoders(self) -> list[Any]:
        """The modules compiled into the image encoding whose layers can share compiled code.

        The vision tower and the Q-Former: their layers write to no cache and return none of their
        inputs. (T5's encoder blocks hand their position bias on as they got it, which a compiled
        region may not: it stays inline.)
        """
        model = self._model
        return [model.vision_model, model.qformer] if self.loaded.kind == "blip2" else [model.vision_model]

    def _encode_images(self, pixel_values: Any) -> Any:
        """The image as the language side reads it: BLIP's patch embeddings, BLIP-2's projected queries."""
        if self.loaded.kind == "blip":
            return self._model.vision_model(pixel_values=pixel_values)[0]
        return self._model.get_image_features(pixel_values=pixel_values).pooler_output

    def _encode_text(self, embeds: Any, mask: Any) -> Any:
        """An encoder-decoder's encoder output over the image queries and the prompt (Flan-T5)."""
        return self._model.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def _decode_inputs(self, inputs: dict[str, Any]) -> DecodeInputs:
        """What the language model starts from, computed as the model's own `generate` does."""
        import torch

        model = self._model
        pixel_values = inputs["pixel_values"]
        batch = pixel_values.shape[0]
        device = pixel_values.device
        # A copy: the next replay overwrites a graph's output.
        image = self._encode_fn(dynamic_rows(pixel_values)).clone()
        if self.loaded.kind == "blip":
            image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=device)
            text = model.config.text_config
            if "input_ids" in inputs:  # [CLS] prompt [SEP] -> [BOS] prompt
                ids = inputs["input_ids"][:, :-1].clone()
                ids[:, 0] = text.bos_token_id
                mask = inputs["attention_mask"][:, :-1]
            else:
                ids = torch.full((batch, 1), text.bos_token_id, dtype=torch.long, device=device)
                mask = torch.ones_like(ids)
            return DecodeInputs(mask=mask, ids=ids, encoder_states=image, encoder_mask=image_mask)
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            prompt = [*self._image_token_ids, model.config.text_config.bos_token_id]
            input_ids = torch.tensor([prompt], dtype=torch.long, device=device).repeat(batch, 1)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        embeds = model.get_input_embeddings()(input_ids)
        image_slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_slots, image.to(embeds.dtype))
        if not self._is_encoder_decoder:
            return DecodeInputs(mask=mask, embeds=embeds)
        # T5's encoder is recorded for the unprompted caption's length; prompts of other lengths run
        # it eagerly rather than record a graph each.
        recorded = self.decoder is not None and embeds.shape[1] == self._unprompted_source_len
        dynamic_rows(embeds, mask)
        encoded = (self._text_encode_fn if recorded else self._encode_text)(embeds, mask).clone()
        start = model.language_model.generation_config.decoder_start_token_id
        if start is None:
            start = self._generation_config.decoder_start_token_id
        ids = torch.full((batch, 1), int(start), dtype=torch.long, device=device)
        return DecodeInputs(mask=torch.ones_like(ids), ids=ids, encoder_states=encoded, encoder_mask=mask)

    def _token_rules(self, config: Any) -> TokenRules:
        rules = TokenRules.from_generation_config(config)
        if self.loaded.kind == "blip":  # BLIP's generate stops at [SEP] and pads with [PAD]
            text = self._model.config.text_config
            rules = dataclasses.replace(rules, eos=(int(text.sep_token_id),), pad=int(text.pad_token_id))
        return rules

    def warm_up(self, settings: GenerationSettings) -> int:
        """Run every bucket once (largest first) so no request pays for compiling or recording a graph.

        Returns how many buckets were warmed (0 without a static decoder).
        """

        return self._on_owner(self._warm_up, settings)

    def _warm_up(self, settings: GenerationSettings) -> int:
        decoder = self.decoder
        if decoder is None:
            return 0
        size = self._image_processor.size
        height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        # A few tokens are enough: the captured step does not depend on how many follow.
        short = dataclasses.replace(settings, prompt=None, num_captions=1, max_new_tokens=4, min_new_tokens=4)
        for bucket in reversed(decoder.buckets):
            pixels = [self.preprocess(Image.new("RGB", (width, height)))] * bucket
            started = time.perf_counter()
            for _ in range(3):  # compile, warm, record (CUDA graphs replay from the third call on)
                self._generate(pixels, [short] * bucket)
            log.info("decode bucket %d warmed in %.1fs", bucket, time.perf_counter() - started)
        return len(decoder.buckets)

    def _encode_prompts(self, prompts: list[str], device: Any) -> dict[str, Any]:
        """Tokenise prompts the way `Blip2Processor` does: query-token placeholders, then left-padded text."""
        import torch

        # Decoder-only models pad on the left (new tokens follow the prompt; positions come from the
        # mask); T5's relative positions count pads, so its encoder input is padded at the end.
        side = "right" if self._is_encoder_decoder else "left"
        encoded = self._tokenizer(prompts, padding=True, padding_side=side, return_tensors="pt")
        input_ids = encoded["input_ids"]
        attention = encoded["attention_mask"]
        if self._image_token_ids:
            n = len(self._image_token_ids)
            image_ids = torch.tensor([self._image_token_ids], dtype=input_ids.dtype).repeat(len(prompts), 1)
            input_ids = torch.cat([image_ids, input_ids], dim=1)
            attention = torch.cat([torch.ones(len(prompts), n, dtype=attention.dtype), attention], dim=1)
        return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


def attention_kernels(device: Any) -> AbstractContextManager[Any]:
    """SDPA without its cuDNN backend on CUDA.

    cuDNN attention builds an execution plan for every new shape, and decoding makes a new one
    at every step (the KV cache grows) for every new batch size: on an H200 a batch of 57 at new
    shapes took 1.34 s where 64 at warm ones take 0.32 s (bench/RESULTS.md). Flash and
    memory-efficient attention need no plans, and compute the same attention.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen: AbstractContextManager[Any] = sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )
    return chosen


def _strip_prefix(text: str, prompt: str) -> str:
    if text.lower().startswith(prompt.strip().lower()):
        return text[len(prompt.strip()) :].strip()
    return text
