"""Processor of the tiny MiniCPM-V 2.6 look-alike: expands the image marker and records where the image goes."""

from __future__ import annotations

from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_MARKER = "(<image>./</image>)"


class MiniCPMVProcessor(ProcessorMixin):
    # transformers 4.x finds the parts through these class fields; 5.x reads the __init__ parameter names.
    attributes = ["image_processor", "tokenizer"]  # noqa: RUF012
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.version = getattr(image_processor, "version", 2.6)

    def __call__(  # type: ignore[override]
        self,
        text: str | list[str],
        images: list[Any] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None:
            placeholder = self.image_processor.get_slice_image_placeholder()
            texts = [t.replace(IMAGE_MARKER, placeholder) for t in texts]
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Left padding: generation continues from the last position of every row.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        start_id = self.tokenizer.convert_tokens_to_ids(self.image_processor.im_start)
        end_id = self.tokenizer.convert_tokens_to_ids(self.image_processor.im_end)
        bounds = []
        for row in input_ids:
            starts = (row == start_id).nonzero().flatten() + 1
            ends = (row == end_id).nonzero().flatten()
            bounds.append(
                torch.stack([starts, ends], dim=1) if len(starts) else torch.zeros(0, 2, dtype=torch.long)
            )
        data["image_bound"] = bounds
        if images is not None:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)
