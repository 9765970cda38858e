"""The model: loading (hub id, cache, local folder, LAVIS alias, random builds) and batched generation."""

from .generate import Captioner
from .loading import LAVIS_ALIASES, LoadedModel, ModelLoadError, load_model, resolve_model_id

__all__ = ["LAVIS_ALIASES", "Captioner", "LoadedModel", "ModelLoadError", "load_model", "resolve_model_id"]
