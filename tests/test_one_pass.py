"""A build reads and casts each changed tensor once, computes each LoRA merge once, copies the shards it must
copy while it compares, and imports neither torch nor transformers for a plain bf16/fp32 fine-tune.

Reads are counted through wrappers of the tensors layer's own readers (`iter_chunks`, `load_tensor`), which is
where every tensor byte that compare or write takes from an input passes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from hubsync import tensors as T
from hubsync.build import build, prepare
from hubsync.plan import certain_copies, output_dtype_for
from hubsync.testing.models import PublishedModel

REMOTE_TUNED = ["vpm.", "resampler."]


def _manifest(tmp_path: Path, base: PublishedModel, finetune: Path, tuned: list[str] | None) -> Path:
    data: dict[str, Any] = {
        "base": {"repo": base.repo_id, "revision": base.sha},
        "finetune": {"path": str(finetune), **({"tuned": tuned} if tuned else {})},
        "output": {"dir": "out"},
        "verify": {"device": "cpu", "trust_remote_code": True},
    }
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Reads:
    """How often each input tensor was read, through the tensors layer's readers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chunked: Counter[tuple[str, str]] = Counter()
        self.loaded: Counter[tuple[str, str]] = Counter()
        chunked, loaded = T.iter_chunks, T.load_tensor

        def counting_chunks(info: T.TensorRef, *args: Any, **kwargs: Any) -> Iterator[np.ndarray]:
            self.chunked[(str(info.file), info.name)] += 1
            return chunked(info, *args, **kwargs)

        def counting_load(info: T.TensorRef, *args: Any, **kwargs: Any) -> Any:
            self.loaded[(str(info.file), info.name)] += 1
            return loaded(info, *args, **kwargs)

        monkeypatch.setattr(T, "iter_chunks", counting_chunks)
        monkeypatch.setattr(T, "load_tensor", counting_load)


def test_a_changed_tensor_is_read_and_cast_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> None:
    reads = Reads(monkeypatch)
    result = build(_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED))

    finetune = T.list_checkpoint(remote_trainer_output)
    tuned = result.plan.tuned_tensors
    assert tuned and all(finetune.tensors[t.finetune_name or t.name].dtype == "F32" for t in tuned)
    for t in tuned:  # fp32 in the fine-tune, bf16 in the output: each one read, and cast, once
        info = finetune.tensors[t.finetune_name or t.name]
        key = (str(info.file), info.name)
        assert (reads.chunked[key], reads.loaded[key]) == (1, 0), t.name
    # and what was written is that cast, to the bit
    out = T.list_checkpoint(result.output)
    for t in tuned:
        expected = T.load_tensor(finetune.tensors[t.finetune_name or t.name]).to(T.torch_dtype(t.dtype))
        written = T.load_tensor(out.tensors[t.name])
        assert torch.equal(written.view(-1).view(torch.int16), expected.view(-1).view(torch.int16)), t.name


def test_each_lora_merge_is_computed_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    native_base_dir: Path,
    published_native_base: PublishedModel,
) -> None:
    pytest.importorskip("peft")
    from hubsync.testing.lora import make_lora_output

    lora = make_lora_output(native_base_dir, tmp_path / "lora", base_name=published_native_base.repo_id)
    computed: Counter[str] = Counter()
    loaded = T.load_tensor

    def counting_load(info: T.TensorRef, *args: Any, **kwargs: Any) -> Any:
        if isinstance(info, T.ComputedTensor):
            computed[info.name] += 1
        return loaded(info, *args, **kwargs)

    monkeypatch.setattr(T, "load_tensor", counting_load)
    result = build(_manifest(tmp_path, published_native_base, lora, None))
    merged = [t for t in result.plan.tuned_tensors if (t.finetune_name or "").endswith(".weight")]
    assert merged and computed and set(computed.values()) == {1}, computed


def test_the_shards_copied_while_comparing_are_the_plans_copies(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = _manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    prep = prepare(manifest)
    early = certain_copies(prep.base, output_dtype_for(prep.manifest), tuple(REMOTE_TUNED))
    actions = {f.path: (f.action, f.source) for f in prep.plan.files}
    assert early, "the remote base keeps its LLM in shards of its own"
    assert all(actions[shard] == ("copy", "base") for shard in early)
    tuned_shards = {t.shard for t in prep.plan.tuned_tensors}
    assert tuned_shards and not tuned_shards & set(early)
    assert (
        certain_copies(prep.base, output_dtype_for(prep.manifest), None) == []
    )  # nothing declared, no guess


def _imports_during(argv: list[str], cwd: Path) -> Callable[[str], bool]:
    code = (
        "import sys, runpy\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_module('hubsync', run_name='__main__')\n"
        "except SystemExit as done:\n    assert not done.code, done.code\n"
        "print(' '.join(sorted(m for m in sys.modules if '.' not in m)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split()[-400:])
    return loaded.__contains__


def test_a_bf16_build_from_fp32_imports_neither_torch_nor_transformers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> None:
    """The first build of an architecture reads transformers' rename table once (here the names match, so
    not even that); the comparison and the write never need torch for bf16 and fp32."""
    monkeypatch.setenv("HUBSYNC_CACHE_DIR", str(tmp_path / "cache"))
    manifest = _manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    imported = _imports_during(["hubsync", "-q", "build", str(manifest), "--no-verify"], tmp_path)
    assert imported("numpy") and not imported("torch") and not imported("transformers")
    assert T.list_checkpoint(tmp_path / "out").tensors


def test_transformers_rename_table_is_read_once_per_version(tmp_path: Path) -> None:
    code = (
        "import sys; from hubsync.names import architecture_renames\n"
        "rules = architecture_renames({'model_type': 'llava', 'architectures': ['LlavaForConditionalGeneration']})\n"
        "print(len(rules), 'transformers' in sys.modules)\n"
    )
    env = {"HUBSYNC_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first, second = (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        for _ in range(2)
    )
    assert first.stdout.split() == [second.stdout.split()[0], "True"], first.stderr[-2000:]
    assert int(second.stdout.split()[0]) > 0 and second.stdout.split()[1] == "False", second.stderr[-2000:]
    assert list((tmp_path / "renames").glob("transformers-*.json"))
