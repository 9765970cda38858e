"""The static-cache, bucket-padded decode loop (COMPILE) against `generate`, on the real tiny models of
every family: BLIP-2 OPT (tiny-random), BLIP-2 Flan-T5 (tiny-random-t5) and BLIP (tiny-random-blip).

Float32 throughout: there both paths do the same arithmetic, so the captions must be identical.
(In half precision the two attention layouts round differently and beam search may break a
near-tie the other way; transformers' own static-cache `generate` does the same.)
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blip2_service.captioner import Captioner, LoadedModel, load_model
from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.static_decode import (
    PROMPT_ROOM,
    DecodeInputs,
    StaticDecoder,
    TokenRules,
    compile_enabled,
    effective_buckets,
    make_decoder,
    prepare_compiling_thread,
    unsupported_reason,
)
from blip2_service.domain import GenerationSettings
from blip2_service.http_api.app import make_app
from blip2_service.runtime import Runtime, prepare_captioner

from ..conftest import image_bytes


def _pixels(captioner: Captioner, n: int, start: int = 0) -> list[Any]:
    return [captioner.preprocess(Image.open(io.BytesIO(image_bytes(start + i))).convert("RGB")) for i in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_model: LoadedModel) -> Captioner:
    return Captioner(tiny_model)


def _static(tiny_model: LoadedModel, buckets: tuple[int, ...] = (1, 2, 4, 8), *, compiled: bool = False) -> Captioner:
    queries = int(tiny_model.model.config.num_query_tokens)
    decoder = StaticDecoder(
        tiny_model.model.language_model,
        buckets=buckets,
        max_cache_len=queries + PROMPT_ROOM + 12,
        prefill_len=queries + 1,
        compiled=compiled,
    )
    return Captioner(tiny_model, decoder=decoder)


@pytest.fixture(scope="module")
def static(tiny_model: LoadedModel) -> Captioner:
    return _static(tiny_model)


PROMPTS = [None, "a dog", None, "a photo of a red bus on the street", "two", None, "a cat on a", None, "a", None, "x"]


@pytest.mark.parametrize("beams", [1, 3, 5])
@pytest.mark.parametrize("size", [1, 3, 11])  # one bucket exactly, padded 3 -> 4, split 8 + 3 -> 4
def test_static_decoder_gives_exactly_the_captions_of_generate(
    plain: Captioner, static: Captioner, beams: int, size: int
) -> None:
    pixels = _pixels(plain, size, start=40)
    settings = [GenerationSettings(num_beams=beams, max_new_tokens=12, min_new_tokens=1) for _ in range(size)]
    expected = plain.caption_batch(pixels, settings)
    assert static.caption_batch(pixels, settings) == expected
    assert len({c[0] for c in expected}) > 1 or size == 1  # the images matter


@pytest.mark.parametrize("beams", [1, 4])
def test_static_decoder_with_mixed_prompts_and_min_tokens(plain: Captioner, static: Captioner, beams: int) -> None:
    pixels = _pixels(plain, len(PROMPTS), start=60)
    settings = [GenerationSettings(num_beams=beams, max_new_tokens=12, min_new_tokens=6, prompt=p) for p in PROMPTS]
    assert static.caption_batch(pixels, settings) == plain.caption_batch(pixels, settings)


def test_static_decoder_is_used_and_hands_what_it_cannot_do_to_generate(
    plain: Captioner, tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    captioner = _static(tiny_model)
    decoder = captioner.decoder
    assert decoder is not None
    calls: list[int] = []
    original = decoder.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "generate", counting)
    pixels = _pixels(plain, 2, start=80)
    greedy = GenerationSettings(num_beams=1, max_new_tokens=10)
    assert captioner.caption_batch(pixels, [greedy] * 2) == plain.caption_batch(pixels, [greedy] * 2)
    assert calls == [1]
    # A prompt past the cache's room, and sampled alternatives, take `generate`: same answers, no call.
    long_prompt = GenerationSettings(num_beams=1, max_new_tokens=10, prompt=" ".join(["dog"] * (PROMPT_ROOM + 5)))
    assert captioner.caption_batch(pixels, [long_prompt] * 2) == plain.caption_batch(pixels, [long_prompt] * 2)
    sampled = captioner.caption_batch(pixels, [GenerationSettings(num_beams=1, max_new_tokens=6, num_captions=3)] * 2)
    assert [len(c) for c in sampled] == [3, 3]
    assert calls == [1]


@pytest.fixture(scope="module", params=["tiny-random-t5", "tiny-random-blip"])
def cross_family(request: pytest.FixtureRequest, data_dir: Path) -> tuple[Captioner, Captioner]:
    """`generate` and the static decoder on a model whose decoder attends to an encoder (T5, BLIP)."""
    loaded = load_model(str(request.param), data_dir=data_dir, dtype="float32", device="cpu")
    decoder = make_decoder(loaded, mode="on", buckets=(1, 2, 4, 8), batch_max_size=8, max_new_tokens=12)
    assert decoder is not None and decoder.family == ("seq2seq" if loaded.kind == "blip2" else "blip-text")
    decoder.compiled, decoder._step_fn = False, decoder._forward  # eager here; compiled below
    return Captioner(loaded), Captioner(loaded, decoder=decoder)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("size", [3, 11])
def test_cross_attention_decoders_give_exactly_the_captions_of_generate(
    cross_family: tuple[Captioner, Captioner], beams: int, size: int
) -> None:
    plain, static = cross_family
    pixels = _pixels(plain, size, start=140)
    settings = [GenerationSettings(num_beams=beams, max_new_tokens=12, min_new_tokens=2) for _ in range(size)]
    expected = plain.caption_batch(pixels, settings)
    assert static.caption_batch(pixels, settings) == expected
    assert len({c[0] for c in expected}) > 1


@pytest.mark.parametrize("beams", [1, 4])
def test_cross_attention_decoders_with_prompts(cross_family: tuple[Captioner, Captioner], beams: int) -> None:
    """T5 batches mixed prompts (its encoder input right-padded); BLIP one prompt per call, kept in its output."""
    plain, static = cross_family
    pixels = _pixels(plain, len(PROMPTS), start=160)
    settings = [GenerationSettings(num_beams=beams, max_new_tokens=12, min_new_tokens=6, prompt=p) for p in PROMPTS]
    assert static.caption_batch(pixels, settings) == plain.caption_batch(pixels, settings)


def test_cross_attention_decoder_is_used(
    cross_family: tuple[Captioner, Captioner], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, static = cross_family
    decoder = static.decoder
    assert decoder is not None
    calls: list[int] = []
    original = decoder.generate
    monkeypatch.setattr(decoder, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    pixels = _pixels(plain, 2, start=180)
    greedy = [GenerationSettings(num_beams=1, max_new_tokens=10)] * 2
    assert static.caption_batch(pixels, greedy) == plain.caption_batch(pixels, greedy)
    assert calls == [1]
    # More prompt than the cache holds: `generate` answers (T5: the encoder's room; BLIP: the decoder's).
    long_prompt = [GenerationSettings(num_beams=1, max_new_tokens=10, prompt=" ".join(["dog"] * (PROMPT_ROOM + 5)))] * 2
    assert static.caption_batch(pixels, long_prompt) == plain.caption_batch(pixels, long_prompt)
    assert calls == [1]


@pytest.mark.parametrize("name", ["tiny-random-t5", "tiny-random-blip"])
def test_cross_attention_step_compiles_whole(name: str, data_dir: Path) -> None:
    """fullgraph=True on the CPU's inductor: a graph break in T5's or BLIP's step (or in the image
    encoder, or T5's text encoder, recorded for the unprompted caption) would raise here."""
    loaded = load_model(name, data_dir=data_dir, dtype="float32", device="cpu")
    decoder = make_decoder(loaded, mode="on", buckets=(1, 2), batch_max_size=2, max_new_tokens=8)
    captioner = Captioner(loaded, decoder=decoder)
    recorded_text_encodes: list[int] = []
    compiled_text_encode = captioner._text_encode_fn
    captioner._text_encode_fn = lambda *a: recorded_text_encodes.append(1) or compiled_text_encode(*a)
    assert captioner.warm_up(GenerationSettings(num_beams=1, max_new_tokens=8)) == 2
    plain = Captioner(loaded)
    pixels = _pixels(plain, 3, start=190)
    for beams in (1, 2):
        settings = [GenerationSettings(num_beams=beams, max_new_tokens=8)] * 3
        assert captioner.caption_batch(pixels, settings) == plain.caption_batch(pixels, settings)
    assert len(recorded_text_encodes) == (3 * 2 + 2 * 2 if name == "tiny-random-t5" else 0)


@pytest.mark.parametrize(("name", "beams"), [("tiny-random", 1), ("tiny-random-blip", 3)])
def test_after_warm_up_no_batch_compiles_anything(name: str, beams: int, data_dir: Path) -> None:
    """On a GPU a new graph is seconds of compiling and recording inside someone's request: after
    warm-up, batches of every size up to the largest bucket (padded or not), with or without a
    prompt, must all run graphs recorded at start. And the warm-up itself traces each compiled
    stage (image encoder, prefill, step) at most twice, however many buckets: once for size 1,
    which dynamo always specialises, once for every size from 2 up (it compiled the first size
    as a constant and again at the second, a whole model's trace and lowering more at start-up)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled by earlier tests for another model of these shapes would serve this one
    loaded = load_model(name, data_dir=data_dir, dtype="float32", device="cpu")
    decoder = make_decoder(loaded, mode="on", buckets=(1, 2, 4), batch_max_size=4, max_new_tokens=6)
    captioner = Captioner(loaded, decoder=decoder)
    default = GenerationSettings(num_beams=beams, max_new_tokens=6)
    before_warm_up = counters["stats"]["unique_graphs"]
    captioner.warm_up(default)
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs - before_warm_up <= 2 * 3
    pixels = _pixels(captioner, 4, start=210)
    for size in (1, 2, 3, 4, 3):
        captioner.caption_batch(pixels[:size], [default] * size)
    prompted = dataclasses.replace(default, prompt="a photo of")
    captioner.caption_batch(pixels[:3], [prompted] * 3)
    assert counters["stats"]["unique_graphs"] == graphs


def test_generation_configs_the_loop_cannot_mirror_are_named(tiny_model: LoadedModel) -> None:
    config = tiny_model.model.generation_config
    assert unsupported_reason(config) is None
    config2 = config.__class__(**config.to_dict())
    config2.repetition_penalty = 1.3
    assert "repetition_penalty" in (unsupported_reason(config2) or "")


def test_compile_on_a_cpu_with_prepacked_bf16_layers_decodes_through_generate(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """oneDNN-packed weights are opaque to torch.compile: COMPILE=on there once failed the model load."""
    from blip2_service.captioner.cpu_prepack import has_prepacked_layers
    from blip2_service.captioner.loading import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16 (no AMX or AVX512-BF16): its layers are never prepacked")
    loaded = load_model("tiny-random-blip", data_dir=data_dir, dtype="bfloat16", device="cpu")
    assert has_prepacked_layers(loaded.model)
    with caplog.at_level("WARNING"):
        decoder = make_decoder(loaded, mode="on", buckets=(1, 2), batch_max_size=2, max_new_tokens=8)
    assert decoder is None
    assert "prepacked" in caplog.text and "DTYPE=float32" in caplog.text
    captioner = Captioner(loaded, decoder=decoder)
    assert captioner.caption_batch(_pixels(captioner, 1), [GenerationSettings(num_beams=1, max_new_tokens=4)])[0][0]


def test_buckets_stop_at_the_first_that_holds_a_full_batch() -> None:
    assert effective_buckets([1, 2, 4, 8, 16, 32, 64], 16) == (1, 2, 4, 8, 16)
    assert effective_buckets([1, 2, 4, 8, 16, 32, 64], 12) == (1, 2, 4, 8, 16)
    assert effective_buckets([1, 4], 10) == (1, 4, 10)
    assert effective_buckets([8, 2, 2], 1) == (2,)


def test_compile_auto_is_on_for_cuda_only() -> None:
    import torch

    assert compile_enabled("auto", torch.device("cuda:0"))
    assert not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu"))
    assert not compile_enabled("off", torch.device("cuda:0"))


def test_compiled_step_traces_whole_and_gives_the_same_captions(plain: Captioner, tiny_model: LoadedModel) -> None:
    """torch.compile with fullgraph=True: a graph break would raise here instead of silently slowing a GPU."""
    captioner = _static(tiny_model, buckets=(1, 2), compiled=True)
    assert captioner.warm_up(GenerationSettings(num_beams=1, max_new_tokens=12)) == 2
    pixels = _pixels(plain, 3, start=90)
    settings = [GenerationSettings(num_beams=1, max_new_tokens=12)] * 3
    assert captioner.caption_batch(pixels, settings) == plain.caption_batch(pixels, settings)


def test_compiled_graphs_run_on_one_thread_whoever_calls(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA graph trees are thread-local: warmed on the loader thread and replayed on the inference
    thread, every graph would be recorded twice. Every compiled call runs on the captioner's thread."""
    decoder = make_decoder(tiny_model, mode="on", buckets=(1, 2), batch_max_size=2, max_new_tokens=4)
    assert decoder is not None
    captioner = Captioner(tiny_model, decoder=decoder)
    captioner._encode_fn, decoder._step_fn = captioner._encode_images, decoder._forward  # thread, not compile
    threads: list[int] = []
    original = decoder.generate
    monkeypatch.setattr(decoder, "generate", lambda *a, **k: threads.append(threading.get_ident()) or original(*a, **k))
    loader = threading.Thread(target=captioner.warm_up, args=(GenerationSettings(num_beams=1, max_new_tokens=4),))
    loader.start()
    loader.join()
    pixels = _pixels(captioner, 2, start=200)
    settings = [GenerationSettings(num_beams=1, max_new_tokens=4)] * 2
    captioner.caption_batch(pixels, settings)
    other = threading.Thread(target=captioner.caption_batch, args=(pixels, settings))
    other.start()
    other.join()
    assert len(threads) == 2 * 3 + 2  # 2 buckets x 3 warm-up runs, then two batches
    assert len(set(threads)) == 1 and threads[0] not in (threading.get_ident(), loader.ident, other.ident)
    # Dynamo's recompile limit is per thread: raised where the graphs are compiled.
    import torch

    assert captioner._on_owner(lambda: torch._dynamo.config.recompile_limit) >= 64
    # And CUDA graph trees of its own (next test).
    from torch._inductor import cudagraph_trees

    assert captioner._on_owner(lambda: hasattr(cudagraph_trees.local, "tree_manager_containers"))


def test_every_compiling_thread_has_cuda_graph_trees_of_its_own() -> None:
    """torch 2.11 (the GPU image's) kept the graph trees' state only on the thread that imported
    them: a second captioner's thread (gpu_check's beam pass, gpu_serve's beam figure) failed an
    assertion at its first recording (pytorch#123177). What 2.11 reads is the thread's own attribute."""
    from torch._inductor import cudagraph_trees

    def state() -> Any:
        prepare_compiling_thread()
        return getattr(cudagraph_trees.local, "tree_manager_containers", None)

    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        mine, theirs = first.submit(state).result(), second.submit(state).result()
    assert isinstance(mine, dict) and isinstance(theirs, dict) and mine is not theirs


async def test_health_says_warming_until_every_bucket_is_ready(
    aiohttp_client: Callable[..., Any], settings_factory: Callable[..., Any], tiny_model: LoadedModel
) -> None:
    settings = settings_factory(compile="on", compile_buckets="1,2", batch_max_size=2, num_beams=1, load_wait_seconds=0)
    release = threading.Event()
    warmed = threading.Event()

    def prepare(loaded: LoadedModel) -> Captioner:
        assert release.wait(60), "the test never let warm-up proceed"
        captioner = prepare_captioner(loaded, settings=settings)
        warmed.set()
        return captioner

    holder = ModelHolder(lambda: tiny_model, prepare)
    runtime = Runtime(settings, holder=holder)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.start)
    try:
        client = await aiohttp_client(make_app(runtime.http_context()))
        for _ in range(200):
            if holder.status == "warming":
                break
            await asyncio.sleep(0.05)
        resp = await client.get("/health")
        body = await resp.json()
        assert resp.status == 503 and body["model_status"] == "warming"
        analyze = await client.post("/v3/analyze", data=image_bytes(1), headers={"Content-Type": "image/jpeg"})
        assert analyze.status == 503 and "warming" in (await analyze.json())["error"]["message"]
        release.set()
        await loop.run_in_executor(None, partial(warmed.wait, 300))
        await loop.run_in_executor(None, partial(holder.wait, 60))
        resp = await client.get("/health")
        body = await resp.json()
        assert resp.status == 200 and body["model_status"] == "loaded"
        assert body["decode"]["compiled"] is True and body["decode"]["buckets"] == [1, 2]
        assert body["decode"]["warm_seconds"] > 0
        analyze = await client.post("/v3/analyze", data=image_bytes(1), headers={"Content-Type": "image/jpeg"})
        assert analyze.status == 200
    finally:
        release.set()
        await loop.run_in_executor(None, runtime.stop)


class _Graphs:
    """A torch.compile backend that keeps dynamo's graphs (and runs them as traced)."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def keep(self, graph: Any, _inputs: Any) -> Any:
        self.kept.append(graph)
        return graph.forward

    def region_calls(self, index: int) -> tuple[int, int]:
        """(calls of compiled regions, distinct regions called) in the `index`th graph kept."""
        import torch

        calls = [n for n in self.kept[index].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        return len(calls), len({str(n.args[0].target) for n in calls})


@pytest.mark.parametrize(
    ("name", "calls", "regions"),
    # Four layers a stack. BLIP-2: ViT 4 calls of 1 region, Q-Former 2 + 2 (its layers with and without
    # cross-attention). BLIP: ViT 4 of 1.
    [("tiny-random", 8, 3), ("tiny-random-blip", 4, 1)],
)
def test_encoder_layers_are_compiled_once_per_kind_of_layer(
    name: str, calls: int, regions: int, data_dir: Path
) -> None:
    """Start-up grows with depth: every layer of BLIP-2's 39-layer ViT and 12-layer Q-Former was traced
    and lowered again. Marked as repeated regions, a stack's layers call one compiled region per kind
    of layer, and the image encoder still gives exactly the eager embeddings."""
    import torch

    loaded = load_model(name, data_dir=data_dir, dtype="float32", device="cpu")
    config = copy.deepcopy(loaded.model.config)
    config.vision_config.num_hidden_layers = 4
    if hasattr(config, "qformer_config"):
        config.qformer_config.num_hidden_layers = 4
    torch.manual_seed(0)
    deeper = dataclasses.replace(loaded, model=type(loaded.model)(config).eval())
    decoder = make_decoder(deeper, mode="on", buckets=(1, 2), batch_max_size=2, max_new_tokens=4)
    captioner = Captioner(deeper, decoder=decoder)
    graphs = _Graphs()
    pixels = captioner.pixels.batch(_pixels(captioner, 2, start=230))

    def encoded(encode: Callable[[Any], Any]) -> Any:
        with torch.inference_mode():
            return encode(pixels)

    compiled = torch.compile(captioner._encode_images, backend=graphs.keep, fullgraph=True)
    # compiled where the captioner compiles: on its thread, with its settings
    assert torch.equal(captioner._on_owner(encoded, compiled), encoded(captioner._encode_images))
    assert graphs.region_calls(0) == (calls, regions)


def test_opt_layers_split_around_the_cache_write_give_opt_s_own_outputs(tiny_model: LoadedModel) -> None:
    """BLIP-2 OPT's decoder layers run as two compiled regions with the cache write between them: the
    split layer must compute what transformers' own layer does, over a prefill and a cached step."""
    import torch
    from transformers.cache_utils import DynamicCache

    from blip2_service.captioner.regions import compile_opt_layers_once

    original = copy.deepcopy(tiny_model.model.language_model)
    for layer in original.model.decoder.layers:
        vars(layer).pop("forward", None)  # transformers' own forward, whatever earlier tests did to the model
    split = copy.deepcopy(original)
    assert compile_opt_layers_once(split) == len(split.model.decoder.layers)
    assert compile_opt_layers_once(split) == 0  # once
    torch.manual_seed(0)
    embeds = torch.randn(3, 9, original.config.hidden_size)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :2] = 0
    token = torch.tensor([[5], [7], [11]])
    outputs = []
    with torch.inference_mode():
        for model in (original, split):
            cache = DynamicCache(config=model.config)
            first = model(inputs_embeds=embeds, attention_mask=mask[:, :9], cache=cache, use_cache=True).logits
            second = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits
            outputs.append((first, second))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_compiled_opt_step_calls_two_regions_for_all_its_layers(tiny_model: LoadedModel) -> None:
    """The per-token step (and prefill) of BLIP-2 OPT: every layer calls the same two compiled regions."""
    import torch

    config = copy.deepcopy(tiny_model.model.language_model.config)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    lm = type(tiny_model.model.language_model)(config).eval()
    queries = int(tiny_model.model.config.num_query_tokens)
    decoder = StaticDecoder(lm, buckets=(2,), max_cache_len=queries + 16, prefill_len=queries + 1, compiled=True)
    graphs = _Graphs()
    eager = StaticDecoder(lm, buckets=(2,), max_cache_len=queries + 16, prefill_len=queries + 1, compiled=False)
    decoder._step_fn = torch.compile(decoder._forward, backend=graphs.keep, fullgraph=True)
    rules = TokenRules.from_generation_config(tiny_model.model.generation_config)
    inputs = DecodeInputs(
        mask=torch.ones(2, queries + 1, dtype=torch.long), embeds=torch.randn(2, queries + 1, config.hidden_size)
    )

    def run(on: StaticDecoder) -> Any:
        return on.generate(inputs, rules=rules, num_beams=1, max_new_tokens=6, min_new_tokens=6)

    with ThreadPoolExecutor(1, initializer=prepare_compiling_thread) as compiling:  # as the captioner does
        assert torch.equal(compiling.submit(run, decoder).result(), run(eager))
    assert len(graphs.kept) == 2
    for index in range(2):  # the prefill's and the step's
        assert graphs.region_calls(index) == (2 * 4, 2)
