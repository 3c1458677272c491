"""Model folders that break the verification worker on purpose, made from the tiny models of `models.py`.

Each function copies a good folder and changes one thing, so that a test can show that the failure is reported
as a finding (a failed step with its message) and never takes hubsync down:

* `make_crashing_model`: the remote code kills the interpreter (abort, segfault) or raises `MemoryError` when
  the vision tower runs, i.e. after the model has loaded and the text-only forward has passed.
* `make_model_with_missing_import`: the remote code imports, at top level, a module that is not installed.
* `make_llava_without_image_placeholder`: a LLaVA whose chat template renders no image placeholder (like the
  one in `benchmarks/build.py`), so an image prompt must be built from the processor's own image token.
* `make_legacy_only_model`: remote code that runs on transformers 4.x but does not load on 5.x, the way
  MiniCPM-Llama3-V 2.5's does (its `__init__` never calls `post_init()`).
* `make_model_with_lossy_tokenizer`: a remote tokenizer class with its own `__init__` that transformers 5
  rebuilds from the bare vocabulary (no merges): character-level ids, as it does to the real MiniCPM-V one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

MODELING_FILE = "modeling_minicpmv.py"
CRASH_HOW = ("abort", "segfault", "memory_error")
MISSING_MODULE = "hubsync_missing_dependency"

# Where the look-alike's vision path starts (`MiniCPMV.get_vision_embedding`), and its first import of torch.
_VISION_ANCHOR = "        dtype = self.vpm.embeddings.patch_embedding.weight.dtype\n"
_IMPORT_ANCHOR = "import torch.nn.functional as F\n"
_POST_INIT = "        self.post_init()\n"
TOKENIZER_FILE = "tokenization_minicpmv_fast.py"
# The look-alike's tokenizer keeps its tokenizer.json under transformers 5 with this method; without it, 5.x
# rebuilds it from the vocabulary alone.
_KEEP_TOKENIZER_JSON = "    @classmethod\n    def convert_to_native_format("

_CRASHES = {
    "abort": "import os\n\n    os.abort()",
    # Reading address 0 is a real segmentation fault, not a Python exception.
    "segfault": "import ctypes\n\n    ctypes.string_at(0)",
    "memory_error": 'raise MemoryError("the vision tower asked for more memory than there is (test fixture)")',
}

# A chat template that knows nothing of images: it prints each message's content as it is.
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _copy(source: Path, dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; the broken-model generators only write a new folder.")
    shutil.copytree(source, dest)
    return dest


def _edit(path: Path, anchor: str, insert: str, *, before: bool = True) -> None:
    source = _source_with(path, anchor)
    path.write_text(source.replace(anchor, insert + anchor if before else anchor + insert), encoding="utf-8")


def _source_with(path: Path, anchor: str) -> str:
    source = path.read_text(encoding="utf-8")
    if source.count(anchor) != 1:
        raise ValueError(f"{path.name} no longer has exactly one {anchor.strip()!r}: update broken_models.py")
    return source


def make_crashing_model(
    base_dir: Path, dest: Path, *, how: Literal["abort", "segfault", "memory_error"]
) -> Path:
    """A copy of a remote-code model (`make_remote_code_vlm`) whose vision tower crashes the interpreter."""
    if how not in CRASH_HOW:
        raise ValueError(f"how must be one of {', '.join(CRASH_HOW)}, not {how!r}")
    dest = _copy(base_dir, dest)
    modeling = dest / MODELING_FILE
    _edit(modeling, _VISION_ANCHOR, "        _break_here()\n")
    with modeling.open("a", encoding="utf-8") as f:
        f.write(f"\n\ndef _break_here() -> None:\n    {_CRASHES[how]}\n")
    return dest


def make_model_with_missing_import(base_dir: Path, dest: Path, *, module: str = MISSING_MODULE) -> Path:
    """A copy of a remote-code model whose modeling file imports `module`, which nothing provides."""
    dest = _copy(base_dir, dest)
    _edit(dest / MODELING_FILE, _IMPORT_ANCHOR, f"import {module}  # noqa: F401\n", before=False)
    return dest


def make_llava_without_image_placeholder(base_dir: Path, dest: Path) -> Path:
    """A copy of a LLaVA (`make_native_vlm`) whose chat template renders no `<image>`."""
    dest = _copy(base_dir, dest)
    (dest / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE, encoding="utf-8")
    return dest


def make_legacy_only_model(base_dir: Path, dest: Path) -> Path:
    """A copy of a remote-code model whose model class never calls `post_init()`: transformers 4.x loads it,
    transformers 5 fails with "'MiniCPMV' object has no attribute 'all_tied_weights_keys'"."""
    dest = _copy(base_dir, dest)
    modeling = dest / MODELING_FILE
    modeling.write_text(_source_with(modeling, _POST_INIT).replace(_POST_INIT, ""), encoding="utf-8")
    return dest


def make_model_with_lossy_tokenizer(base_dir: Path, dest: Path) -> Path:
    """A copy of a remote-code model whose tokenizer class defines `__init__` and nothing that keeps its
    tokenizer.json: transformers 5 encodes text character by character (4.x reads tokenizer.json as it is)."""
    dest = _copy(base_dir, dest)
    tokenizer = dest / TOKENIZER_FILE
    source = _source_with(tokenizer, _KEEP_TOKENIZER_JSON)
    start = source.index(_KEEP_TOKENIZER_JSON)
    end = source.index("\n\n    def ", start)  # the next method
    tokenizer.write_text(source[:start] + source[end + 2 :], encoding="utf-8")
    return dest
