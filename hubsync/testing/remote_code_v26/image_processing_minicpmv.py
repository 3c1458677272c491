"""Image processor of the tiny MiniCPM-V 2.6 look-alike: one square crop per image (no slicing at this size)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]  # noqa: RUF012 - overrides an instance-level declaration of the base

    def __init__(
        self,
        max_slice_nums: int = 1,
        scale_resolution: int = 28,
        patch_size: int = 7,
        image_feature_size: int = 8,
        im_start: str = "<image>",
        im_end: str = "</image>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        unk: str = "<unk>",
        norm_mean: list[float] | None = None,
        norm_std: list[float] | None = None,
        slice_mode: bool = True,
        version: float = 2.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.im_start = im_start
        self.im_end = im_end
        self.slice_start = slice_start
        self.slice_end = slice_end
        self.unk = unk
        self.norm_mean = list(norm_mean) if norm_mean is not None else [0.5, 0.5, 0.5]
        self.norm_std = list(norm_std) if norm_std is not None else [0.5, 0.5, 0.5]
        self.slice_mode = slice_mode
        self.version = version

    def get_slice_image_placeholder(self) -> str:
        return self.im_start + self.unk * self.image_feature_size + self.im_end

    def _to_array(self, image: Image.Image) -> np.ndarray:
        side = self.scale_resolution
        resized = image.convert("RGB").resize((side, side), resample=Image.Resampling.BICUBIC)
        scaled = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.norm_mean, dtype=np.float32)
        std = np.asarray(self.norm_std, dtype=np.float32)
        return ((scaled - mean) / std).astype(np.float32).transpose(2, 0, 1)

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        pixel_values = np.stack([self._to_array(image) for image in images])
        image_sizes = [list(image.size) for image in images]
        return _as_batch(pixel_values, image_sizes, return_tensors)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def _as_batch(
    pixel_values: np.ndarray, image_sizes: list[list[int]], return_tensors: str | None
) -> BatchFeature:
    if return_tensors == "pt":
        import torch

        return BatchFeature({"pixel_values": torch.from_numpy(pixel_values), "image_sizes": image_sizes})
    return BatchFeature({"pixel_values": pixel_values, "image_sizes": image_sizes})
