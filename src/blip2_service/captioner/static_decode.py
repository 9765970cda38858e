"""A decode loop that is not launch-bound: a static KV cache, batch buckets and one captured step.

`generate` with a dynamic cache spends 14-19 ms per token on an H200 whatever the batch, almost all
of it launching the language model's ~500 small kernels from Python; reading OPT-2.7b's weights
once takes about 1 ms. Here the per-token forward runs against a KV cache of fixed shape, so
`torch.compile(mode="reduce-overhead")` can record it once per batch size as a CUDA graph and
replay it with one launch. Batches are padded up to a fixed set of sizes (buckets), each warmed at
start, so no request ever pays for a recording.

Three decoder shapes, one loop: BLIP-2's decoder-only language models (OPT) start from the prompt's
embeddings; BLIP's text decoder and BLIP-2 Flan-T5's decoder start from token ids and attend to an
encoder's states (the image embeddings; T5's encoder output), whose keys and values are computed
once, at the first forward, into a cross-attention cache of fixed length.

Only the forward pass is captured. Token selection stays in eager PyTorch and mirrors
transformers' own greedy and beam search step for step (its beam helpers are called directly), so
this path gives exactly the captions `generate` gives; tests compare the two on each family's tiny
model. What it does not mirror (sampling, logits processors beyond the three below, prompts longer
than the cache leaves room for) is reported by `unsupported_reason` and goes to `generate` instead.

Like gpt-fast, the loop never asks the GPU whether it is done at every step: it looks every
`check_every` steps, so the host can queue graph replays ahead of the device.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .regions import compile_opt_layers_once

log = logging.getLogger(__name__)

# Generation-config fields whose non-neutral values add logits processors or criteria this loop
# does not reproduce; `generate` handles such configurations instead.
_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "max_time": None,
    "stop_strings": None,
    "min_length": 0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "num_return_sequences": 1,
}

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# "causal": a decoder-only language model (BLIP-2 OPT); "blip-text": BLIP's BERT-style text decoder
# with cross-attention to the image; "seq2seq": an encoder-decoder's decoder (BLIP-2 Flan-T5).
Family = Literal["causal", "blip-text", "seq2seq"]


@dataclass(frozen=True, slots=True)
class DecodeInputs:
    """What decoding starts from, one row per image, prompts left-padded.

    A decoder-only model starts from `embeds` (the image queries scattered into the prompt's
    embeddings); a cross-attention decoder from token `ids`, attending to `encoder_states` under
    `encoder_mask`. `mask` covers the prompt (`embeds` or `ids`).
    """

    mask: Any
    embeds: Any = None
    ids: Any = None
    encoder_states: Any = None
    encoder_mask: Any = None

    def map(self, fn: Callable[[Any], Any]) -> DecodeInputs:
        """The same inputs with `fn` applied to every tensor present (row padding, beam copies)."""
        return DecodeInputs(
            **{f.name: None if (t := getattr(self, f.name)) is None else fn(t) for f in dataclasses.fields(self)}
        )


def pad_rows(tensor: Any, rows: int) -> Any:
    """`tensor` with copies of its first row appended up to `rows` rows (valid inputs, results dropped).

    Always a new tensor, made in inference mode: a compiled graph guards on the kind of tensor it
    was traced with, and a full batch passed through as it came would recompile the graph that a
    padded one recorded (found by counting dynamo's graphs after warm-up).
    """
    import torch

    extra = rows - tensor.shape[0]
    return tensor.clone() if extra <= 0 else torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])])


def dynamic_rows(*tensors: Any) -> Any:
    """Mark dimension 0 (rows) of each tensor dynamic for the compiler; returns the first.

    Left to itself, dynamo compiles the first batch size it meets as a constant and compiles again,
    with the size symbolic, at the second: a whole trace and lowering of the model more at start-up
    than needed (size 1 it always compiles apart). Marked before every compiled call, every bucket
    from 2 up shares one graph from the first. A dimension of 1 is left alone (`maybe_`).
    """
    import torch

    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return tensors[0]


def same_rows(rows_of: Any, cache: Any) -> None:
    """Tell the compiler, before it traces a layer, that every cache tensor has the batch's rows.

    Each cache tensor is marked dynamic on its own and gets a size symbol of its own; the compiler
    learns they are equal only as it traces each layer's cache write. Until then every layer's
    compiled region saw other symbols, and torch 2.11 compiled each layer's apart (2.13 matches
    them anyway). Stated up front, every layer sees one symbol. Only while tracing (the prompted
    prefill runs eagerly and has nothing to tell): no work at run time.
    """
    import torch

    if not torch.compiler.is_compiling():
        return
    rows = rows_of.shape[0]
    caches = getattr(cache, "self_attention_cache", cache), getattr(cache, "cross_attention_cache", None)
    for part in caches:
        for layer in getattr(part, "layers", ()):
            torch._check(layer.keys.shape[0] == rows)
            torch._check(layer.values.shape[0] == rows)


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What the three supported logits processors and the stopping criteria need to know."""

    eos: tuple[int, ...]
    pad: int
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    length_penalty: float
    early_stopping: bool | str

    @classmethod
    def from_generation_config(cls, config: Any) -> TokenRules:
        eos_raw = config.eos_token_id
        eos = tuple(eos_raw) if isinstance(eos_raw, list | tuple) else (() if eos_raw is None else (int(eos_raw),))
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(
            eos=eos,
            pad=int(pad),
            suppress=tuple(config.suppress_tokens or ()),
            begin_suppress=tuple(config.begin_suppress_tokens or ()),
            length_penalty=float(config.length_penalty if config.length_penalty is not None else 1.0),
            early_stopping=config.early_stopping if config.early_stopping is not None else False,
        )


def unsupported_reason(config: Any) -> str | None:
    """Why `generate` must handle this generation config, or None when the static loop can."""
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, list | tuple) and not value):
            return f"generation config sets {name}={value!r}"
    if not config.eos_token_id and config.eos_token_id != 0:
        return "no eos_token_id"
    return None


class StaticDecoder:
    """Greedy and beam decoding over a static cache, for the three decoder families above.

    One instance per loaded model; used from the inference thread only (one batch at a time),
    which is what lets every bucket's cache be a view of one shared allocation.
    """

    def __init__(
        self,
        model: Any,
        *,
        family: Family = "causal",
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_cache_len: int,
        encoder_len: int = 0,
        prefill_len: int | None = None,
        compiled: bool,
        check_every: int = 4,
    ) -> None:
        """`model`: the module whose forward gives logits (OPT's or T5's LM, BLIP's text decoder).

        `max_cache_len`: prompt tokens plus new tokens the self-attention cache holds;
        `encoder_len`: encoder positions the cross-attention cache holds (shorter sources are padded).
        With `compiled`, the prompt's forward is compiled too for prompts of `prefill_len` tokens
        (the unprompted caption's); other lengths run it eagerly rather than record a graph each.
        """
        import torch

        self.lm = model
        self.family: Family = family
        self.buckets = tuple(sorted(set(buckets)))
        self.max_cache_len = max_cache_len
        self.encoder_len = encoder_len
        self.compiled = compiled
        self.prefill_len = prefill_len
        self.check_every = max(1, check_every)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config
        if family == "seq2seq":
            self._layers, self._heads, self._head_dim = config.num_decoder_layers, config.num_heads, config.d_kv
            self._encoder_width = config.d_model
        else:
            heads = config.num_attention_heads
            self._layers, self._heads = config.num_hidden_layers, heads
            self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            self._encoder_width = getattr(config, "encoder_hidden_size", 0)
        self._slots: dict[int, _Slot] = {}
        self._largest: _Slot | None = None  # owns the memory; every other slot is a view of it
        self._step_fn: Any = self._forward
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this one takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            compile_opt_layers_once(model)  # BLIP-2 OPT: its 32 layers compile as two regions
            self._step_fn = torch.compile(self._forward, mode=mode, fullgraph=True)

    # -- public ---------------------------------------------------------------------------

    def bucket_for(self, batch: int) -> int | None:
        """The smallest bucket that holds `batch` images, or None when none does."""
        return next((b for b in self.buckets if b >= batch), None)

    @property
    def largest(self) -> int:
        return self.buckets[-1]

    def fits(self, prompt_len: int, max_new_tokens: int, encoder_len: int = 0) -> bool:
        return prompt_len + max_new_tokens <= self.max_cache_len and encoder_len <= self.encoder_len

    def generate(
        self,
        inputs: DecodeInputs,
        *,
        rules: TokenRules,
        num_beams: int,
        max_new_tokens: int,
        min_new_tokens: int,
    ) -> Any:
        """New token ids [batch, <= max_new_tokens] (finished rows filled with pad), as `generate` picks them."""
        import torch

        batch, prompt_len = inputs.mask.shape
        source_len = 0 if inputs.encoder_states is None else inputs.encoder_states.shape[1]
        bucket = self.bucket_for(batch)
        if bucket is None or not self.fits(prompt_len, max_new_tokens, source_len):
            raise ValueError(f"batch {batch} x {prompt_len} tokens does not fit the static decoder")
        if bucket > batch:
            inputs = inputs.map(lambda t: pad_rows(t, bucket))
        if num_beams > 1:
            inputs = inputs.map(lambda t: t.repeat_interleave(num_beams, dim=0))
        rows = bucket * num_beams
        slot = self._slot(rows)
        slot.cache.reset()
        mask = torch.ones(rows, self.max_cache_len, dtype=inputs.mask.dtype, device=self.device)
        mask[:, :prompt_len] = inputs.mask
        positions = (inputs.mask.long().cumsum(-1) * inputs.mask - 1).clamp_min(0)
        with torch.inference_mode():
            if slot.states is not None:  # the encoder side, copied where the captured step reads it
                slot.states.zero_()
                slot.states[:, :source_len] = inputs.encoder_states
                slot.encoder_mask.zero_()
                slot.encoder_mask[:, :source_len] = inputs.encoder_mask
            prefill = self._step_fn if prompt_len == self.prefill_len else self._forward
            dynamic_rows(inputs.embeds, inputs.ids, positions, mask)
            logits = prefill(
                slot.cache, inputs.ids, positions, mask, slot.states, slot.encoder_mask, embeds=inputs.embeds
            )
            # Always a copy (`.float()` is none in float32): a graph's output is overwritten by its next replay.
            logits = logits.to(torch.float32, copy=True)
            next_position = inputs.mask.long().sum(-1, keepdim=True)  # where the first new token sits
            tokens_buffer = dynamic_rows(torch.empty((rows, 1), dtype=torch.long, device=self.device))
            state = _State(slot, mask, next_position, prompt_len, tokens_buffer)
            if num_beams > 1:
                tokens = self._beam(state, logits, rules, bucket, num_beams, max_new_tokens, min_new_tokens)
            else:
                tokens = self._greedy(state, logits, rules, max_new_tokens, min_new_tokens)
        return tokens[:batch]

    # -- the captured step ----------------------------------------------------------------

    def _forward(
        self,
        cache: Any,
        tokens: Any,
        positions: Any,
        mask: Any,
        states: Any,
        encoder_mask: Any,
        *,
        embeds: Any = None,
    ) -> Any:
        """Logits of the last position; the prompt's forward (`embeds` or prompt ids) fills the caches."""
        same_rows(positions, cache)
        cached = {self._cache_kw: cache, "use_cache": True}
        if self.family == "seq2seq":
            from transformers.modeling_outputs import BaseModelOutput

            out = self.lm(
                decoder_input_ids=tokens,
                decoder_attention_mask=mask,
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=encoder_mask,
                **cached,
            )
        elif self.family == "blip-text":
            out = self.lm(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                encoder_hidden_states=states,
                encoder_attention_mask=encoder_mask,
                logits_to_keep=1,
                **cached,
            )
        elif embeds is not None:
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1, **cached)
        else:
            out = self.lm(input_ids=tokens, attention_mask=mask, position_ids=positions, **cached)
        return out.logits[:, -1, :]

    def _step(self, state: _State, tokens: Any, t: int) -> Any:
        import torch

        positions = dynamic_rows(state.next_position + (t - 1))
        # Copied into one buffer: a strided view would fail the compiled graph's guards and recompile it.
        state.tokens.copy_(tokens.reshape(-1, 1))
        slot = state.slot
        logits = self._step_fn(slot.cache, state.tokens, positions, state.mask, slot.states, slot.encoder_mask)
        return logits.to(torch.float32, copy=True)  # a copy: the graph's output is reused by the next replay

    # -- token selection (mirrors transformers' greedy and beam search) ---------------------

    def _biases(self, rules: TokenRules, vocab: int, max_new: int, min_new: int) -> list[Any]:
        """The bias of each step up to the first after `min_new` (every later step uses the last)."""
        return [self._bias(rules, vocab, t, min_new) for t in range(min(max_new, max(min_new, 1) + 1))]

    def _bias(self, rules: TokenRules, vocab: int, t: int, min_new_tokens: int) -> Any:
        import torch

        bias = torch.zeros(vocab, device=self.device)
        blocked = list(rules.suppress)
        if t == 0:
            blocked += rules.begin_suppress
        if t < min_new_tokens:
            blocked += rules.eos
        blocked = [i for i in blocked if 0 <= i < vocab]
        if blocked:
            bias[torch.tensor(blocked, device=self.device)] = float("-inf")
        return bias

    def _greedy(self, state: _State, logits: Any, rules: TokenRules, max_new: int, min_new: int) -> Any:
        import torch

        rows, vocab = logits.shape
        eos = torch.tensor(rules.eos, device=self.device)
        biases = self._biases(rules, vocab, max_new, min_new)
        out = torch.full((rows, max_new), rules.pad, dtype=torch.long, device=self.device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=self.device)
        used = 0
        for t in range(max_new):
            if t > 0:
                logits = self._step(state, out[:, t - 1], t)
            scores = logits + biases[min(t, len(biases) - 1)]
            chosen = scores.argmax(-1)
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, rules.pad))
            out[:, t] = chosen
            unfinished &= ~torch.isin(chosen, eos)
            used = t + 1
            if used % self.check_every == 0 and not bool(unfinished.any()):
                break
        return out[:, :used]

    def _beam(
        self, state: _State, logits: Any, rules: TokenRules, batch: int, num_beams: int, max_new: int, min_new: int
    ) -> Any:
        import torch
        from transformers.generation.utils import GenerationMixin as G

        lm = self.lm
        device = self.device
        vocab = logits.shape[-1]
        eos = torch.tensor(rules.eos, device=device)
        biases = self._biases(rules, vocab, max_new, min_new)
        keep = max(2, 1 + len(rules.eos)) * num_beams
        top_mask = torch.cat(
            [torch.ones(num_beams, dtype=torch.bool), torch.zeros(keep - num_beams, dtype=torch.bool)]
        ).to(device)
        fill = rules.pad if rules.pad is not None else rules.eos[0]
        running = torch.full((batch, num_beams, max_new), fill, dtype=torch.int64, device=device)
        sequences = running.clone()
        running_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
        running_scores[:, 1:] = -1e9
        beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
        finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
        unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=device)
        hits = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
        running_idx = torch.full((batch, num_beams, max_new), -1, dtype=torch.int32, device=device)
        beam_indices = running_idx.clone()
        for t in range(max_new):
            if t > 0:
                logits = self._step(state, running[:, :, t - 1].reshape(-1), t)
            log_probs = torch.nn.functional.log_softmax(logits, dim=-1) + biases[min(t, len(biases) - 1)]
            log_probs = log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]
            log_probs = log_probs.reshape(batch, -1)
            topk_lp, topk_seq, topk_idx = G._get_top_k_continuations(
                lm,
                accumulated_log_probs=log_probs,
                running_sequences=running,
                running_beam_indices=running_idx,
                cur_len=t,
                decoder_prompt_len=0,
                do_sample=False,
                beams_to_keep=keep,
                num_beams=num_beams,
                batch_size=batch,
            )
            hits = torch.isin(topk_seq[:, :, t], eos)
            if t + 1 >= max_new:
                hits = torch.ones_like(hits)
            running, running_scores, running_idx = G._get_running_beams_for_next_iteration(
                lm,
                topk_log_probs=topk_lp,
                topk_running_sequences=topk_seq,
                topk_running_beam_indices=topk_idx,
                next_token_hits_stopping_criteria=hits,
                num_beams=num_beams,
            )
            sequences, beam_scores, beam_indices, finished = G._update_finished_beams(
                lm,
                sequences=sequences,
                topk_running_sequences=topk_seq,
                beam_scores=beam_scores,
                topk_log_probs=topk_lp,
                beam_indices=beam_indices,
                topk_running_beam_indices=topk_idx,
                is_early_stop_heuristic_unsatisfied=unsatisfied,
                is_sent_finished=finished,
                next_token_hits_stopping_criteria=hits,
                top_num_beam_mask=top_mask,
                num_beams=num_beams,
                cur_len=t,
                decoder_prompt_len=0,
                length_penalty=rules.length_penalty,
                early_stopping=rules.early_stopping,
            )
            if t + 1 >= max_new:
                break
            self._reorder(state, running_idx[..., t].reshape(-1).long(), state.prompt_len + t + 1)
            unsatisfied = G._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=unsatisfied,
                running_beam_scores=running_scores,
                beam_scores=beam_scores,
                is_sent_finished=finished,
                cur_len=t + 1,
                max_length=max_new,
                decoder_prompt_len=0,
                early_stopping=rules.early_stopping,
                length_penalty=rules.length_penalty,
            )
            if (t + 1) % self.check_every == 0 and not bool(
                G._beam_search_has_unfinished_sequences(unsatisfied, finished, hits, rules.early_stopping)
            ):
                break
        best = sequences[:, 0, :]
        best_idx = beam_indices[:, 0, :]
        length = int(((best_idx + 1).bool()).sum(dim=1).max())
        return best[:, :length]

    # -- caches ---------------------------------------------------------------------------

    def _reorder(self, state: _State, index: Any, filled: int) -> None:
        """Beam reordering in place, over the filled positions of every layer at once.

        Every layer's keys are views of one tensor and its values of another, so this is four
        launches per step (it was two per layer: 128 for OPT-2.7b, bench/launch_count.py), moving only what is
        filled; in place, so the recorded step keeps reading the same memory. Self-attention only:
        every beam of an image attends to the same encoder states.
        """
        for shared in state.slot.self_kv:
            kv = shared[..., :filled, :]
            kv.copy_(kv.index_select(1, index))

    def _slot(self, rows: int) -> _Slot:
        """The caches (and encoder buffers) for `rows` rows: views of one allocation for the largest."""
        if rows not in self._slots:
            if self._largest is None or rows > self._largest.rows:
                self._slots.clear()
                self._largest = self._allocate_slot(rows)
            self._slots[rows] = self._first_rows(self._largest, rows)
        return self._slots[rows]

    def _first_rows(self, largest: _Slot, rows: int) -> _Slot:
        """The slot of `largest`'s first `rows` rows: views of its memory, with caches of their own."""
        import torch

        own = self._view_cache(largest.self_kv, rows)
        if largest.cross_kv is None:
            return _Slot(_first(largest.self_kv, rows), cache=own)
        from transformers.cache_utils import EncoderDecoderCache

        states, encoder_mask = largest.states[:rows], largest.encoder_mask[:rows]
        torch._dynamo.mark_static_address(states)
        torch._dynamo.mark_static_address(encoder_mask)
        dynamic_rows(states, encoder_mask)
        cache = EncoderDecoderCache(own, self._view_cache(largest.cross_kv, rows))
        return _Slot(_first(largest.self_kv, rows), _first(largest.cross_kv, rows), states, encoder_mask, cache)

    def _allocate_slot(self, rows: int) -> _Slot:
        import torch

        if self.family == "causal":
            return _Slot(self._allocate(rows, self.max_cache_len))
        source = (rows, self.encoder_len)
        return _Slot(
            self._allocate(rows, self.max_cache_len),
            self._allocate(rows, self.encoder_len),
            torch.zeros(*source, self._encoder_width, dtype=self.dtype, device=self.device),
            torch.zeros(*source, dtype=torch.long, device=self.device),
        )

    def _allocate(self, rows: int, length: int) -> tuple[Any, Any]:
        """Keys and values, each [layer, row, head, position, dim]: one op reorders every layer's.

        Two tensors, not one: a layer's keys and values are handed to its compiled region together,
        and a region's inputs must not share memory.
        """
        import torch

        shape = (self._layers, rows, self._heads, length, self._head_dim)
        return tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))

    def _view_cache(self, shared: Any, rows: int) -> Any:
        """A cache of static layers whose tensors are the first `rows` rows of `shared`."""
        import torch
        from transformers.cache_utils import Cache, StaticLayer

        keys, values = shared
        cache = Cache(layers=[StaticLayer(max_cache_len=keys.shape[3]) for _ in range(self._layers)])
        cache.early_initialization(1, self._heads, self._head_dim, self.dtype, self.device)
        for index, layer in enumerate(cache.layers):
            layer.keys = keys[index, :rows]
            layer.values = values[index, :rows]
            layer.batch_size = rows
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)
            dynamic_rows(layer.keys, layer.values)
        return cache


def _first(shared: tuple[Any, Any], rows: int) -> tuple[Any, Any]:
    """The first `rows` rows of keys and values [layer, row, ...]: views, no copy."""
    return shared[0][:, :rows], shared[1][:, :rows]


@dataclass(slots=True)
class _Slot:
    """One row count's memory: self-attention keys and values, each [layer, row, head, position, dim]
    (beams reorder them), and for cross-attention decoders the encoder's keys and values and the
    encoder states and mask the captured step reads. `cache` is what the model is handed."""

    self_kv: Any
    cross_kv: Any = None
    states: Any = None
    encoder_mask: Any = None
    cache: Any = None

    @property
    def rows(self) -> int:
        return int(self.self_kv[0].shape[1])


@dataclass(slots=True)
class _State:
    slot: _Slot
    mask: Any
    next_position: Any
    prompt_len: int
    tokens: Any


# Text prompt tokens (with BOS) the static cache leaves room for; longer prompts go to `generate`.
PROMPT_ROOM = 32


def effective_buckets(buckets: Sequence[int], batch_max_size: int) -> tuple[int, ...]:
    """The buckets a service with this BATCH_MAX_SIZE can use: none past the first that holds a full batch."""
    ordered = sorted({b for b in buckets if b > 0})
    kept = [b for b in ordered if b < batch_max_size]
    kept.append(next((b for b in ordered if b >= batch_max_size), batch_max_size))
    return tuple(kept)


def prepare_compiling_thread() -> None:
    """Set up the thread that compiles and replays the graphs (run first on it, as its initializer)."""
    allow_recompiles()
    specialize_floats()
    own_graph_trees()


def allow_recompiles() -> None:
    """Let dynamo record one graph per bucket, beam width and stage: more than its default of 8.

    Dynamo's settings are per thread (torch 2.13): this must run on the thread that compiles.
    """
    import torch

    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(64, getattr(dynamo, limit)))


def specialize_floats() -> None:
    """Compile float arguments and module attributes as constants, never as graph inputs.

    Dynamo remembers, per function and across every model in the process, a float that once had
    another value, and from then on passes it in as a symbolic input: a
    Flan-T5 model's vision layers (eps 1e-6) after an OPT one's (1e-5), say. A compiled region
    (`regions.py`) takes only tensors and integers, and failed to build. Per thread, like the rest.
    """
    import torch

    torch._dynamo.config.specialize_float = True


def own_graph_trees() -> None:
    """Give this thread CUDA graph trees of its own, as torch 2.13 does lazily for any thread.

    Up to torch 2.12 (the GPU image has 2.11) the trees' state lived only on the thread that first
    imported them, and any other thread's first recording failed an assertion (pytorch#123177):
    the second captioner in one process (a benchmark's greedy, then beam) could not record a graph.
    """
    import threading
    from collections import defaultdict

    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers"):
        return
    initialize = getattr(trees, "_initialize_tls", None)
    if initialize is not None:
        initialize(trees.local)
    else:  # what torch 2.13's _initialize_tls does, for the versions before it
        trees.local.tree_manager_containers = {}
        trees.local.tree_manager_locks = defaultdict(threading.Lock)


def compile_enabled(mode: str, device: Any) -> bool:
    """COMPILE=auto means on for CUDA, where kernel launches are the bottleneck; off for CPUs."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def make_decoder(
    loaded: Any, *, mode: str, buckets: Sequence[int], batch_max_size: int, max_new_tokens: int
) -> StaticDecoder | None:
    """The static decoder for this model and these settings, or None where `generate` decodes (COMPILE off)."""
    if not compile_enabled(mode, loaded.device):
        return None
    model = loaded.model
    from .cpu_prepack import has_prepacked_layers

    if has_prepacked_layers(model):
        log.warning(
            "COMPILE=%s: this CPU's bfloat16 layers are prepacked for oneDNN, which torch.compile cannot "
            "trace; decoding through generate (DTYPE=float32 compiles)",
            mode,
        )
        return None
    config = model.config
    kept = effective_buckets(buckets, batch_max_size)
    if loaded.kind == "blip":  # the text decoder attends to every patch of the image
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2 + 1
        return StaticDecoder(
            model.text_decoder,
            family="blip-text",
            buckets=kept,
            max_cache_len=PROMPT_ROOM + max_new_tokens,
            encoder_len=patches,
            prefill_len=1,  # [BOS]
            compiled=True,
        )
    queries = int(config.num_query_tokens)
    if config.text_config.is_encoder_decoder:  # T5's decoder starts from one token; its encoder reads the prompt
        return StaticDecoder(
            model.language_model,
            family="seq2seq",
            buckets=kept,
            max_cache_len=1 + max_new_tokens,
            encoder_len=queries + PROMPT_ROOM,
            prefill_len=1,  # the decoder's start token
            compiled=True,
        )
    return StaticDecoder(
        model.language_model,
        buckets=kept,
        max_cache_len=queries + PROMPT_ROOM + max_new_tokens,
        prefill_len=queries + 1,  # the image queries and BOS
        compiled=True,
    )
