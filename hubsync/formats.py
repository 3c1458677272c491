"""Which files of a base repo are other copies of its weights, and so never belong in a build.

Many bases ship the same weights more than once: `pytorch_model.bin` beside the safetensors shards, Mistral's
`consolidated.safetensors`, Meta's `original/*.pth`, TensorFlow, Flax, GGUF, ONNX, OpenVINO or Core ML exports.
A build rewrites only the indexed safetensors shards, so every other copy would publish the *base's* weights
under the fine-tune's name, and a loader that prefers another format would load them silently. The plan
leaves them out and says why; verification does not miss them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

# (patterns, what they are); a pattern without "/" matches top-level files only.
_OTHER_FORMATS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("pytorch_model*.bin", "pytorch_model*.bin.index.json"), "PyTorch pickle"),
    (
        ("consolidated*.safetensors", "consolidated*.pth", "consolidated*.pt"),
        "original consolidated checkpoint",
    ),
    (("original/*",), "original checkpoint format"),
    (("*.pth", "*.ckpt"), "PyTorch checkpoint"),
    (("tf_model*.h5", "tf_model*.h5.index.json"), "TensorFlow"),
    (("flax_model*.msgpack", "flax_model*.msgpack.index.json"), "Flax"),
    (("rust_model.ot",), "rust-bert"),
    (("*.gguf", "*.ggml", "gguf/*", "ggml/*"), "GGUF/GGML"),
    (("*.onnx", "*.onnx_data", "*.onnx.data", "onnx/*"), "ONNX"),
    (("openvino/*", "openvino_model*"), "OpenVINO"),
    (("*.tflite",), "TensorFlow Lite"),
    (("coreml/*", "*.mlmodel", "*.mlpackage/*"), "Core ML"),
)


def _matches(path: str, pattern: str) -> bool:
    if "/" not in pattern and "/" in path:
        return False
    if pattern.endswith("/*"):  # everything below a folder of that name, at any depth
        folders = path.split("/")[:-1]
        return any(fnmatch.fnmatch(folder, pattern[:-2]) for folder in folders)
    return fnmatch.fnmatch(path, pattern)


def weight_copy_kind(path: str) -> str | None:
    """What format of the weights `path` (repo-relative) holds, or None when it is not a known weight file."""
    for patterns, kind in _OTHER_FORMATS:
        if any(_matches(path, p) for p in patterns):
            return kind
    return None


def stale_weight_copies(files: Iterable[str], indexed: Iterable[str]) -> dict[str, str]:
    """Base files that hold the weights in another form than the `indexed` safetensors (the shards and
    their index), each with the reason it is left out."""
    keep = set(indexed)
    found: dict[str, str] = {}
    for path in sorted(set(files) - keep):
        kind = weight_copy_kind(path)
        if kind is None and path.endswith(".safetensors") and "/" not in path:
            kind = "safetensors outside the base's index"
        if kind is not None:
            found[path] = (
                f"another copy of the base's weights ({kind}): only the safetensors shards the build rewrote "
                "are published, so this copy would hold untuned weights"
            )
    return found
