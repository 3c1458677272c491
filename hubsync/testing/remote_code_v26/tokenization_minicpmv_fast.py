"""Fast tokenizer of the tiny MiniCPM-V 2.6 look-alike (the real one subclasses Qwen2TokenizerFast)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    """Adds MiniCPM-V's image and slice markers in its own `__init__`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.im_start = "<image>"
        self.im_end = "</image>"
        self.slice_start = "<slice>"
        self.slice_end = "</slice>"
        self.unk_marker = "<unk>"

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        # transformers 5 rebuilds a subclass with its own `__init__` from the bare vocabulary (no merges, no
        # pre-tokenizer); this one only adds attributes, so the whole tokenizer.json is kept. 4.x never calls it.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)  # type: ignore[misc]

    @property
    def unk_id(self) -> int:
        token_id = self.convert_tokens_to_ids(self.unk_marker)
        assert isinstance(token_id, int)
        return token_id
