"""Fast tokenizer of the tiny MiniCPM-V look-alike."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    """Adds the image/slice marker strings, like the real `MiniCPMVTokenizerFast`, in its own `__init__`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eot_token = "<|eot_id|>"
        self.im_start = "<image>"
        self.im_end = "</image>"
        self.slice_start = "<slice>"
        self.slice_end = "</slice>"
        self.unk_marker = "<unk>"

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        # transformers 5 rebuilds a subclass that defines `__init__` from the bare vocabulary of tokenizer.json
        # (no merges, pre-tokenizer or decoder): text would split into bytes and decode would lose spaces.
        # This __init__ only adds attributes, so the whole tokenizer.json must be kept.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    def _token_id(self, token: str) -> int:
        token_id = self.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)
        return token_id

    @property
    def eos_id(self) -> int:
        return self._token_id(self.eos_token)

    @property
    def eot_id(self) -> int:
        return self._token_id(self.eot_token)

    @property
    def im_start_id(self) -> int:
        return self._token_id(self.im_start)

    @property
    def im_end_id(self) -> int:
        return self._token_id(self.im_end)

    @property
    def unk_id(self) -> int:
        return self._token_id(self.unk_marker)
