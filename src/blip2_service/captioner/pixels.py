"""Image -> model input in two halves: resize on a worker thread, normalise on the model's device.

The processor's own path (resize, then rescale and normalise in NumPy, then a float32 tensor) costs
about 2 ms of GIL-holding NumPy per image on top of the resize, and ships four bytes per pixel to
the GPU. Here the worker only resizes (Pillow releases the GIL) and keeps 8-bit pixels; the
inference thread moves the batch as uint8 and rescales and normalises it on the device, with the
same float64-then-float32 arithmetic as the processor, so the model sees identical numbers (a test
compares them bit for bit). Processors this does not mirror (a crop, padding, shortest-edge
resizing) keep their own path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..imaging import to_srgb


def _mirrorable(processor: Any) -> bool:
    size = getattr(processor, "size", None) or {}
    return (
        bool(getattr(processor, "do_resize", False))
        and "height" in size
        and "width" in size
        and not getattr(processor, "do_center_crop", False)
        and not getattr(processor, "do_pad", False)
        and bool(getattr(processor, "do_rescale", False))
        and bool(getattr(processor, "do_normalize", False))
        and getattr(processor, "image_mean", None) is not None
        and getattr(processor, "image_std", None) is not None
    )


class PixelPrep:
    """`prepare` per image on worker threads; `batch` on the inference thread."""

    def __init__(self, processor: Any, device: Any, dtype: Any) -> None:
        import torch

        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.fast = _mirrorable(processor)
        if self.fast:
            self.height = int(processor.size["height"])
            self.width = int(processor.size["width"])
            self.resample = int(processor.resample if processor.resample is not None else Image.Resampling.BICUBIC)
            self.scale = float(processor.rescale_factor)
            self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def prepare(self, image: Image.Image) -> Any:
        """One RGB image -> uint8 [H, W, 3] at the model's size (or the processor's float [3, H, W]).

        Brought into sRGB after the resize (`imaging.to_srgb`): a wide-gamut photo costs a 224x224
        colour conversion, not a full-size one.
        """
        import torch

        if not self.fast:
            return self.processor(images=[to_srgb(image)], return_tensors="pt")["pixel_values"][0]
        resized = to_srgb(image.resize((self.width, self.height), resample=self.resample))
        return torch.from_numpy(np.array(resized, dtype=np.uint8))

    def batch(self, items: list[Any]) -> Any:
        """Prepared images -> the model's `pixel_values` on its device, in its dtype."""
        import torch

        stacked = torch.stack(items)
        if self.device.type == "cuda":
            stacked = stacked.pin_memory()
        stacked = stacked.to(self.device, non_blocking=True)
        if stacked.dtype == torch.uint8:
            chw = stacked.permute(0, 3, 1, 2)
            rescaled = (chw.to(torch.float64) * self.scale).to(torch.float32)
            stacked = (rescaled - self.mean) / self.std
        return stacked.to(dtype=self.dtype)
