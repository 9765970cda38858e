"""Find, load and place the model: hub id, cache, local folder, LAVIS alias or a random build."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# LAVIS (the legacy service's loader) names and their Hugging Face twins.
LAVIS_ALIASES: dict[str, str] = {
    "blip2_opt:pretrain_opt2.7b": "Salesforce/blip2-opt-2.7b",
    "blip2_opt:caption_coco_opt2.7b": "Salesforce/blip2-opt-2.7b-coco",
    "blip2_opt:pretrain_opt6.7b": "Salesforce/blip2-opt-6.7b",
    "blip2_opt:caption_coco_opt6.7b": "Salesforce/blip2-opt-6.7b-coco",
    "blip2_t5:pretrain_flant5xl": "Salesforce/blip2-flan-t5-xl",
    "blip2_t5:pretrain_flant5xxl": "Salesforce/blip2-flan-t5-xxl",
    "blip2_t5:caption_coco_flant5xl": "Salesforce/blip2-flan-t5-xl-coco",
    "blip_caption:large_coco": "Salesforce/blip-image-captioning-large",
    "blip_caption:base_coco": "Salesforce/blip-image-captioning-base",
}

# Random-weight builds made offline (captioner/tiny.py): real code paths, meaningless text.
RANDOM_MODELS = ("tiny-random", "tiny-random-t5", "full-random", "tiny-random-blip", "blip-large-random")


class ModelLoadError(Exception):
    """The model cannot be loaded; the message tells the user where we looked and what to do."""


@dataclass(slots=True)
class LoadedModel:
    name: str
    kind: str  # "blip2" or "blip"
    model: Any
    processor: Any
    device: Any
    dtype: Any

    @property
    def framework(self) -> str:
        if self.kind == "blip":
            return "BLIP (Bootstrapping Language-Image Pre-training)"
        return "BLIP2 (Bootstrapping Language-Image Pre-training v2)"


def resolve_model_id(model: str) -> str:
    return LAVIS_ALIASES.get(model, model)


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"DEVICE={device} but CUDA is not available to this torch build "
            f"({torch.__version__}); install the CUDA build of torch (README, 'GPU') or set DEVICE=cpu"
        )
    return torch.device(device)


def _cpu_has(probes: tuple[str, ...], flags: tuple[str, ...]) -> bool:
    """torch's own CPU probes, else the kernel's flags (an older torch has fewer probes)."""
    import torch

    for probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except RuntimeError:
                pass
    return not _cpu_flags().isdisjoint(flags)


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN runs bfloat16 matmuls natively, so DTYPE=bfloat16 is prepacked
    for it (whether bf16 is also the faster choice is `cpu_has_amx`'s question)."""
    return _cpu_has(("_is_amx_tile_supported", "_is_avx512_bf16_supported"), ("amx_bf16", "avx512_bf16"))


def cpu_has_amx() -> bool:
    """AMX: the only CPUs where bfloat16 is the faster choice for the whole model.

    With AMX a bf16 matmul runs 3-5x faster than float32 at every size. With AVX512-BF16 alone
    (AMD EPYC Zen 4/5, Xeons whose hypervisor hides AMX) it is faster only at a few rows: on such
    a Xeon, bf16 took 0.53x float32's speed in the vision tower and the prefill, 0.82x in a beam-5
    decode step, 2.5x only in a greedy step at 8 rows (bench/RESULTS.md, "DTYPE=auto on CPUs").
    """
    return _cpu_has(("_is_amx_tile_supported",), ("amx_bf16",))


def pick_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16
    return torch.float32


def load_model(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    model_dir: Path | None = None,
    data_dir: Path = Path("./data"),
    allow_download: bool = True,
) -> LoadedModel:
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    source = resolve_model_id(model)
    location: str | Path = source
    if source in RANDOM_MODELS:
        from .tiny import RANDOM_BUILDERS

        location = RANDOM_BUILDERS[source](data_dir / "models" / source)
    elif Path(source).expanduser().is_dir():
        location = Path(source).expanduser()

    cache_dir = str(model_dir) if model_dir else None
    local_only = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    common: dict[str, Any] = {"cache_dir": cache_dir, "local_files_only": local_only}
    try:
        config = AutoConfig.from_pretrained(location, **common)
        kind = _kind_of(config.model_type, source)
        if kind == "blip2":
            from transformers import Blip2ForConditionalGeneration as model_class
        else:
            from transformers import BlipForConditionalGeneration as model_class
        processor = AutoProcessor.from_pretrained(location, backend="pil", **common)
        net = model_class.from_pretrained(location, dtype=torch_dtype, **common)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_not_found_message(model, source, model_dir, local_only, exc)) from exc

    if kind == "blip2":
        _check_blip2(net, processor, model)
    net.to(torch_device)
    net.eval()
    optimize_for_device(net, torch_device, torch_dtype)
    processor.tokenizer.padding_side = "left"
    log.info("model %s loaded on %s as %s", model, torch_device, str(torch_dtype).removeprefix("torch."))
    return LoadedModel(model, kind, net, processor, torch_device, torch_dtype)


def optimize_for_device(net: Any, device: Any, dtype: Any) -> None:
    """Device-specific speed-ups that do not change results: prepacked bf16 weights on CPU."""
    import torch

    if device.type == "cpu" and dtype == torch.bfloat16:
        from .cpu_prepack import prepack_bf16_linears

        prepack_bf16_linears(net)


def _kind_of(model_type: str, source: str) -> str:
    if model_type == "blip-2":
        return "blip2"
    if model_type == "blip":
        return "blip"
    raise ModelLoadError(
        f"MODEL={source} is a {model_type!r} model; this service runs BLIP-2 (blip-2) and BLIP (blip) captioning models"
    )


def _check_blip2(net: Any, processor: Any, model: str) -> None:
    """Refuse checkpoints that would silently caption without the image (transformers 5.x traps)."""
    config = net.config
    if getattr(config, "image_token_index", None) is None:
        raise ModelLoadError(
            f"MODEL={model}: config.json has no image_token_index; re-save the checkpoint with a "
            "current transformers (the processor adds an <image> token)"
        )
    if getattr(processor, "num_query_tokens", None) != config.num_query_tokens:
        raise ModelLoadError(
            f"MODEL={model}: processor num_query_tokens={getattr(processor, 'num_query_tokens', None)} "
            f"but the model uses {config.num_query_tokens}; without it the processor drops the image. "
            "Add num_query_tokens to processor_config.json"
        )


def _not_found_message(model: str, source: str, model_dir: Path | None, local_only: bool, exc: Exception) -> str:
    """One line: where we looked and what to do, for a hub id, a LAVIS name or a local folder."""
    from huggingface_hub.constants import HF_HUB_CACHE

    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _looks_like_path(source):
        return (
            f"Cannot load MODEL={model}: no folder with config.json and the weights there. Fix: point MODEL at "
            "the folder that `hf download <repo> --local-dir DIR` or save_pretrained() wrote, or at a hub id "
            f"such as Salesforce/blip2-opt-2.7b. Detail: {detail}"
        )
    cache = str(model_dir) if model_dir else HF_HUB_CACHE
    tried = f"MODEL={model}" + (f" (the LAVIS name for Hugging Face {source})" if source != model else "")
    if local_only:
        how = "downloads are off (MODEL_DOWNLOAD=false or HF_HUB_OFFLINE=1)"
        allow = " or allow downloads (MODEL_DOWNLOAD=true, HF_HUB_OFFLINE unset)"
    else:
        how = "and it could not be downloaded from the Hugging Face hub (no network?)"
        allow = ""
    return (
        f"Cannot load {tried}: not in the cache {cache}, {how}. Fix: on a machine with network run "
        f"`hf download {source}` and copy its cache folder to MODEL_DIR here (or `hf download {source} "
        f"--local-dir DIR` and set MODEL=DIR){allow}. Detail: {detail}"
    )


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `org/name`; anything else given is meant as a folder."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


def device_hint(device: str) -> str:
    """The device DEVICE would give, without loading anything: what /health shows before the model."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
