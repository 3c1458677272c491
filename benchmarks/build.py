"""Benchmark `hubsync build` against a plain copy of the base and the usual hand-made route.

Run by hand, from the repository root:

    python benchmarks/build.py --size-gb 2 --workdir /tmp/hubsync-bench
    python benchmarks/build.py --size-gb 0.2 --workdir /tmp/hubsync-bench-smoke   # smoke test, < 1 minute

What it does, in one run (see benchmarks/README.md for the figures):

1. Generates, once per workdir (cached; `--regenerate` forces it), a synthetic base: a real
   `LlavaForConditionalGeneration` (Llama text model + CLIP vision tower + projector) with random bf16
   weights, saved with `save_pretrained(max_shard_size=...)` into ~6 shards, with a locally made tokenizer
   and a LlavaProcessor. It is published to hubsync's local Hub emulator, and one unmeasured `hubsync build`
   warms huggingface_hub's cache (`--no-hub` uses `base.path` instead).
2. Generates a vision fine-tune the way trainers save one: the full state dict in fp32, streamed tensor by
   tensor into safetensors shards, vision tower + projector perturbed, plus tokenizer, config and
   training_args.bin.
3. Times each route in its own subprocess and reads that subprocess's peak RSS from `os.wait4`.
4. Checks the hubsync output: untouched shards are byte-identical to the base (sha256), the right shards
   were rewritten, the tuned tensors are the fine-tune's cast to bf16, and every tensor equals the
   hand-made output's.

The parent process never imports torch, transformers or huggingface_hub: the heavy work runs in worker
subprocesses of this same script (`--worker ...`), so the parent stays small and every hubsync command
gets the emulator's HF_ENDPOINT in its environment before huggingface_hub is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
CACHE_FORMAT = 2  # bump when the generated models change, so that old caches are regenerated
TUNED_PREFIXES = ("vision_tower.", "multi_modal_projector.")  # the base's on-disk names (see _on_disk_name)
FT_TUNED_PREFIXES = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
)  # the same, as a trainer names them
SEED = 1234
# Issue 15's targets. The I/O floor is what no build can avoid: reading the fine-tune's weight files, plus
# `cp -rL` of the base and `sync` (writing a base-sized output durably).
TARGETS = {
    "build_vs_floor_time": ("build / I/O floor time", "<=", 2.0),
    "handmade_vs_build_time": ("hand-made / build time", ">=", 3.0),
    "build_rss_mb": ("build peak RSS (MB)", "<", 1024.0),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ sizing


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    shard_bytes: int

    def params(self) -> dict[str, int]:
        h, i, v = self.hidden, self.intermediate, self.vocab
        text = 2 * v * h + self.layers * (4 * h * h + 3 * h * i + 2 * h) + h
        vh, vi = self.vision_hidden, self.vision_intermediate
        positions = (self.image_size // self.patch_size) ** 2 + 1
        vision = (
            3 * self.patch_size**2 * vh
            + vh
            + positions * vh
            + 4 * vh
            + self.vision_layers * (4 * (vh * vh + vh) + 2 * vh * vi + vi + vh + 4 * vh)
        )
        projector = vh * h + h + h * h + h
        return {"text": text, "vision": vision, "projector": projector, "total": text + vision + projector}


def choose_dims(size_gb: float) -> Dims:
    """Llama + CLIP dims whose bf16 weights reach at least `size_gb` GB (10^9 bytes), in ~6 shards."""
    target = size_gb * 1e9 / 2  # parameters
    if size_gb >= 1.0:
        hidden, inter, heads, vocab = 2048, 5632, 16, 32000
        vision = {
            "vision_hidden": 1024,
            "vision_intermediate": 4096,
            "vision_layers": 24,
            "vision_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        }  # CLIP ViT-L/14, LLaVA's own tower: ~303M parameters, 391 tensors (+ 4 of the projector)
    elif size_gb >= 0.4:
        hidden, inter, heads, vocab = 1024, 2816, 16, 32000
        vision = {
            "vision_hidden": 512,
            "vision_intermediate": 2048,
            "vision_layers": 8,
            "vision_heads": 8,
            "image_size": 224,
            "patch_size": 16,
        }
    else:
        hidden, inter, heads, vocab = 512, 1408, 8, 16000
        vision = {
            "vision_hidden": 384,
            "vision_intermediate": 1536,
            "vision_layers": 6,
            "vision_heads": 6,
            "image_size": 224,
            "patch_size": 16,
        }
    probe = Dims(hidden, inter, 0, heads, vocab, shard_bytes=0, **vision)
    per_layer = (
        Dims(hidden, inter, 1, heads, vocab, shard_bytes=0, **vision).params()["total"]
        - probe.params()["total"]
    )
    layers = max(1, -(-int(target - probe.params()["total"]) // per_layer))
    total_bytes = 2 * Dims(hidden, inter, layers, heads, vocab, shard_bytes=0, **vision).params()["total"]
    # ~6 shards; a shard must still hold the largest tensor (the embedding) whole
    shard_bytes = max(total_bytes // 6 + 1, 2 * vocab * hidden + (1 << 20))
    return Dims(hidden, inter, layers, heads, vocab, shard_bytes=shard_bytes, **vision)


# ------------------------------------------------------------------------------------------------ workers
# Each worker runs in its own subprocess (`--worker NAME`); they may import torch and transformers.


def _llava_config(dims: Dims, image_token_id: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads,
        vocab_size=dims.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_intermediate,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
        projection_dim=dims.hidden,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.dtype = "bfloat16"
    return config


def _make_tokenizer() -> Any:
    """A tiny character-level tokenizer made with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
    )


def _make_processor(tokenizer: Any, dims: Dims) -> Any:
    import transformers
    from transformers import LlavaProcessor

    # The PIL backend: the torchvision one is not installed here, and the saved config is the same.
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_cls(
        size={"shortest_edge": dims.image_size},
        crop_size={"height": dims.image_size, "width": dims.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=dims.patch_size,
        vision_feature_select_strategy="default",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    )


def worker_gen_base(args: argparse.Namespace) -> dict[str, Any]:
    """The base: built on the meta device, materialised directly in bf16 (RAM ~ model size), saved sharded."""
    import torch
    from transformers import LlavaForConditionalGeneration

    dims = Dims(**json.loads(args.dims))
    out = Path(args.out)
    tokenizer = _make_tokenizer()
    config = _llava_config(dims, tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                param.fill_(1.0)
            elif param.ndim == 1 and name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.eval()
    model.save_pretrained(out, max_shard_size=dims.shard_bytes)
    _make_processor(tokenizer, dims).save_pretrained(out)
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# hubsync benchmark base\n\nRandom weights.\n"
    )
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _safetensors_header(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def worker_gen_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """A full fp32 state dict as a trainer saves it, streamed: one fp32 tensor in memory at a time.

    The values are `model.float().state_dict()` without ever holding the fp32 model: each bf16 parameter of
    the loaded base is cast on its own, perturbed when it belongs to the vision tower or the projector, and
    written straight into the current shard (the header is computed first from shapes alone). With
    `--trainable 1`, only the trainable tensors (vision tower + projector) are saved, as a training script that
    saves `requires_grad` parameters does; their values are the same as in the full save.
    """
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, TrainingArguments

    base, out = Path(args.base), Path(args.out)
    shard_bytes = int(args.shard_bytes)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    state = model.state_dict()  # in-memory names: model.vision_tower.*, model.language_model.*, lm_head.*
    names = list(state)
    if args.trainable == "1":
        names = [n for n in names if n.startswith(FT_TUNED_PREFIXES)]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED + 1)
    weight_map: dict[str, str] = {}
    perturbed = 0
    total = 0
    for i, shard_names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, "F32", list(state[n].shape), state[n].numel() * 4) for n in shard_names]
        header = _safetensors_header(entries, {"format": "pt"})
        with open(out / file, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for name in shard_names:
                tensor = state[name].detach().float()
                if name.startswith(FT_TUNED_PREFIXES):
                    tensor = tensor + 1e-2 * torch.randn(tensor.shape, generator=gen)
                    perturbed += 1
                f.write(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
                total += tensor.numel() * 4
                weight_map[name] = file
                del tensor
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.dtype = "float32"  # what a trainer that saved fp32 weights writes
    model.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    try:
        args_obj: Any = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, report_to=[])
    except ImportError:  # TrainingArguments needs accelerate; a pickled dict stands in for it
        args_obj = {
            "output_dir": str(out),
            "per_device_train_batch_size": 1,
            "learning_rate": 1e-5,
            "bf16": False,
        }
    torch.save(args_obj, out / "training_args.bin")
    return {"shards": len(shards), "tensors": len(names), "perturbed": perturbed, "bytes": total}


def worker_publish(args: argparse.Namespace) -> dict[str, Any]:
    """Upload the base to the emulator (HF_ENDPOINT is in this process's environment) and return its sha."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo, exist_ok=True)
    api.upload_folder(folder_path=args.base, repo_id=args.repo, commit_message="benchmark base")
    sha = api.repo_info(args.repo).sha
    return {"repo": args.repo, "sha": sha, "endpoint": os.environ.get("HF_ENDPOINT")}


def worker_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """The cached snapshot folder of the base (local files only: this measures nothing)."""
    from huggingface_hub import snapshot_download

    return {"folder": snapshot_download(args.repo, revision=args.revision, local_files_only=True)}


def worker_handmade(args: argparse.Namespace) -> dict[str, Any]:
    """The usual hand-made route: load the base, load the fine-tune's state dict into it, save, copy files."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    base, finetune, out = Path(args.base), Path(args.finetune), Path(args.out)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    state: dict[str, Any] = {}
    for shard in sorted(finetune.glob("*.safetensors")):
        state.update(load_file(shard))
    # A trainable-only save leaves the frozen tensors out: load what it has over the base.
    partial = args.trainable == "1"
    missing, unexpected = model.load_state_dict(state, strict=not partial)
    if partial:
        missing = [m for m in missing if m.startswith(FT_TUNED_PREFIXES)]
    del state
    model.save_pretrained(out)
    for path in base.iterdir():
        if path.is_file() and not (
            path.name.endswith((".safetensors", ".safetensors.index.json"))
            or path.name in ("config.json", "generation_config.json")
        ):
            shutil.copy(path, out / path.name)
    return {"missing": list(missing), "unexpected": list(unexpected)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _finetune_name(disk_name: str) -> str:
    """transformers 5 saves Llava with the legacy names; the in-memory (trainer state dict) names differ."""
    if disk_name.startswith("language_model.model."):
        return "model.language_model." + disk_name[len("language_model.model.") :]
    if disk_name.startswith("language_model.lm_head."):
        return "lm_head." + disk_name[len("language_model.lm_head.") :]
    return "model." + disk_name


def worker_check(args: argparse.Namespace) -> dict[str, Any]:
    """Correctness of the hubsync output, file by file and tensor by tensor (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    base, out, finetune = Path(args.base), Path(args.out), Path(args.finetune)
    handmade = Path(args.handmade) if args.handmade else None
    problems: list[str] = []
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    tuned_shards = sorted({s for n, s in weight_map.items() if n.startswith(TUNED_PREFIXES)})
    identical, rewritten = [], []
    for shard in shards:
        if not (out / shard).is_file():
            problems.append(f"{shard} missing from the output")
            continue
        same = _sha256(base / shard) == _sha256(out / shard)
        (identical if same else rewritten).append(shard)
    if sorted(rewritten) != tuned_shards:
        problems.append(
            f"rewritten shards {rewritten}, expected exactly the ones holding tuned tensors {tuned_shards}"
        )

    ft_index = json.loads((finetune / "model.safetensors.index.json").read_text())["weight_map"]
    checked_tuned = checked_kept = 0
    for shard in rewritten:
        with safe_open(str(out / shard), "pt") as fo, safe_open(str(base / shard), "pt") as fb:
            if set(fo.keys()) != set(fb.keys()):
                problems.append(f"{shard}: tensor names differ from the base's shard")
                continue
            for name in fo.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                got = fo.get_tensor(name)
                if name.startswith(TUNED_PREFIXES):
                    ft_name = _finetune_name(name)
                    with safe_open(str(finetune / ft_index[ft_name]), "pt") as ff:
                        want = ff.get_tensor(ft_name).to(torch.bfloat16)
                    checked_tuned += 1
                else:
                    want = fb.get_tensor(name)
                    checked_kept += 1
                if got.dtype != want.dtype or not torch.equal(
                    got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)
                ):
                    problems.append(f"{shard}: {name} is not what it should be")
    n_tuned = sum(1 for n in weight_map if n.startswith(TUNED_PREFIXES))
    if checked_tuned != n_tuned:
        problems.append(f"checked {checked_tuned} tuned tensors, the base has {n_tuned}")

    vs_handmade: dict[str, Any] | None = None
    if handmade is not None:
        hm_index_file = handmade / "model.safetensors.index.json"
        if hm_index_file.exists():
            hm_map = json.loads(hm_index_file.read_text())["weight_map"]
        else:
            with safe_open(str(handmade / "model.safetensors"), "pt") as single:
                hm_map = dict.fromkeys(single.keys(), "model.safetensors")
        differing = [n for n in weight_map if n not in hm_map]
        equal = 0
        for name, shard in weight_map.items():
            if name not in hm_map:
                continue
            with safe_open(str(out / shard), "pt") as fo, safe_open(str(handmade / hm_map[name]), "pt") as fh:
                a, b = fo.get_tensor(name), fh.get_tensor(name)
            if (
                a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
            ):
                equal += 1
            else:
                differing.append(name)
        vs_handmade = {"tensors": len(weight_map), "equal": equal, "differing": differing[:10]}
        if differing:
            problems.append(
                f"{len(differing)} tensor(s) differ from the hand-made output, e.g. {differing[:3]}"
            )
    return {
        "shards": len(shards),
        "identical_shards": len(identical),
        "rewritten_shards": rewritten,
        "expected_rewritten": tuned_shards,
        "tuned_tensors_checked": checked_tuned,
        "untuned_tensors_in_rewritten_shards_checked": checked_kept,
        "vs_handmade": vs_handmade,
        "problems": problems,
    }


WORKERS = {
    "gen-base": worker_gen_base,
    "gen-finetune": worker_gen_finetune,
    "publish": worker_publish,
    "snapshot": worker_snapshot,
    "handmade": worker_handmade,
    "check": worker_check,
}


def run_worker(args: argparse.Namespace) -> None:
    result = WORKERS[args.worker](args)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Measure:
    key: str  # build | build-again | read | handmade | copy | copy-sync
    input: str  # full | trainable, or "" for the routes that do not depend on the fine-tune
    name: str
    cache: str  # "warm" (inputs read just before) or "cold" (inputs evicted from the page cache)
    command: str
    seconds: float  # median of the samples
    peak_rss_mb: float  # largest of the samples
    samples_s: list[float]
    min_s: float
    load_avg: float  # 1-minute load average just before the first sample (other work on the machine)


def run_measured(cmd: list[str], env: dict[str, str], log_file: Path) -> tuple[float, float, int]:
    """Wall time and peak RSS of one command run in its own process.

    Peak RSS comes from `os.wait4` on that child: the kernel's ru_maxrss of the child itself and of any of its
    own waited-for descendants (the largest single process, not a sum). The parent's RUSAGE_CHILDREN cannot
    be used: ru_maxrss is a maximum, not a sum, so it would still show the earlier, larger generation workers.
    """
    with open(log_file, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log_file.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # so that Popen does not wait again
    return seconds, usage.ru_maxrss / 1024.0, proc.returncode  # ru_maxrss is in KiB on Linux


def run_checked(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """Run a worker or setup command; return the worker's RESULT line (if any) or fail with its output."""
    proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark setup failed: {what} (exit {proc.returncode})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {}


def worker_cmd(name: str, **kwargs: Any) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--worker", name]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def input_files(folder: Path) -> list[Path]:
    return [p.resolve() for p in sorted(folder.rglob("*")) if p.is_file()]


def warm_read(files: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def evict(files: list[Path]) -> None:
    """Drop these files' clean pages from the page cache (no root needed). A VM's host cache may remain."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def machine(work: Path) -> dict[str, Any]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    fs = subprocess.run(
        ["df", "--output=fstype", str(work)], check=False, capture_output=True, text=True
    ).stdout.split()
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "workdir_fs": fs[-1] if fs else "?",
    }


def versions(env: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "print(json.dumps({p: m.version(p) for p in "
        "('hubsync', 'torch', 'transformers', 'huggingface_hub', 'safetensors', 'tokenizers')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True
    ).stdout
    return json.loads(out) if out.strip() else {}


# ------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Input:
    """One fine-tune the benchmark builds, with its own manifest, outputs and correctness check."""

    key: str  # full | trainable
    folder: str  # under the workdir
    about: str

    @property
    def manifest(self) -> str:
        return f"manifest-{self.key}.yaml"

    @property
    def out_hubsync(self) -> str:
        return f"out-hubsync-{self.key}"

    @property
    def out_handmade(self) -> str:
        return f"out-handmade-{self.key}"


INPUTS = {
    "full": Input(
        "full", "finetune", "the full state dict in fp32, vision tower + projector changed, the rest equal"
    ),
    "trainable": Input(
        "trainable",
        "finetune-trainable",
        "only the trainable tensors (vision tower + projector) in fp32, every one changed",
    ),
}


def prepare_inputs(args: argparse.Namespace, work: Path, env_base: dict[str, str]) -> dict[str, Any]:
    """Generate (or reuse) the base and the two fine-tunes; return what the cache file records."""
    dims = choose_dims(args.size_gb)
    key = {"format": CACHE_FORMAT, "size_gb": args.size_gb, "dims": asdict(dims)}
    cache_file = work / "inputs.json"
    base_src = work / "base-src"
    folders = [work / i.folder for i in INPUTS.values()]
    if not args.regenerate and cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key and base_src.is_dir() and all(f.is_dir() for f in folders):
            log(f"reusing the generated base and fine-tunes in {work} (--regenerate to make them again)")
            return cached
    for path in (base_src, *folders, work / "hub", work / "hf_home", cache_file):
        remove(path)
    expected = dims.params()
    log(
        f"generating a {args.size_gb} GB Llava base: {expected['total'] / 1e6:.0f}M parameters "
        f"(vision {expected['vision'] / 1e6:.0f}M, projector {expected['projector'] / 1e6:.1f}M), "
        f"{dims.layers} text layers, shards of {dims.shard_bytes / 1e6:.0f} MB"
    )
    t0 = time.perf_counter()
    base_info = run_checked(
        worker_cmd("gen-base", dims=json.dumps(asdict(dims)), out=base_src), env_base, "generate base"
    )
    log(f"base written in {time.perf_counter() - t0:.0f}s: {folder_bytes(base_src) / 1e9:.2f} GB")
    record: dict[str, Any] = {"key": key, "base": base_info, "published": None}
    for item in INPUTS.values():
        t0 = time.perf_counter()
        record[item.key] = run_checked(
            worker_cmd(
                "gen-finetune",
                base=base_src,
                out=work / item.folder,
                shard_bytes=max(dims.shard_bytes * 2, 1 << 30),
                trainable=int(item.key == "trainable"),
            ),
            env_base,
            f"generate the {item.key} fine-tune",
        )
        size = folder_bytes(work / item.folder) / 1e9
        log(f"{item.key} fine-tune written in {time.perf_counter() - t0:.0f}s: {size:.2f} GB fp32")
    cache_file.write_text(json.dumps(record, indent=2))
    return record


def write_manifest(work: Path, base: dict[str, str], item: Input) -> Path:
    lines = [f"# written by benchmarks/build.py: {item.about}", "base:"]
    lines += [f"  {k}: {v}" for k, v in base.items()]
    lines += [
        "finetune:",
        f"  path: {item.folder}",
        f"  tuned: [{', '.join(TUNED_PREFIXES)}]",
        "  # The trainer's state dict uses transformers 5's in-memory names and save_pretrained wrote the base",
        "  # with the legacy ones: hubsync maps them with transformers' own (chained) Llava renames.",
        "output:",
        f"  dir: {item.out_hubsync}",
        "  dtype: base",
        "  link: copy",
    ]
    path = work / item.manifest
    path.write_text("\n".join(lines) + "\n")
    return path


PROFILE_STAGES = (  # (label, function name as cProfile records it); missing ones are skipped
    ("all imports (torch, transformers, ...), cumulative", "_find_and_load"),
    ("resolve base", "resolve_base"),
    ("read fine-tune (incl. transformers import for renames)", "read_finetune"),
    ("  of which architecture_renames", "architecture_renames"),
    ("compare all fine-tune tensors with the base", "compare"),
    ("  of which compare_tensor (all pairs)", "compare_tensor"),
    ("  of which load_tensor", "load_tensor"),
    ("write files (copy + rewrite shards)", "write_files"),
    ("  of which copy_file (kernel copy + fsync)", "copy_file"),
    ("  of which write_shard (rewrite)", "write_shard"),
    ("  of which sha256_file (hashing)", "sha256_file"),
    ("swap into place (incl. removing an old output)", "swap_into_place"),
)


def profile_build(
    build_cmd: list[str], env: dict[str, str], logs: Path, output: Path, tag: str
) -> dict[str, Any]:
    """One warm build under cProfile (slower than a plain run); cumulative seconds per stage. cProfile sees
    the main thread only: work done in helper threads shows as the time the main thread waited for it."""
    import pstats

    remove(output)
    os.sync()
    prof = logs / f"build-{tag}.prof"
    cmd = [build_cmd[0], "-m", "cProfile", "-o", str(prof), *build_cmd[1:]]
    secs, _, rc = run_measured(cmd, env, logs / f"build-profile-{tag}.log")
    if rc != 0:
        return {"error": f"profiled build failed (exit {rc})"}
    stats = pstats.Stats(str(prof))
    cumulative: dict[str, float] = {}
    for (_, _, func), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        cumulative[func] = max(cumulative.get(func, 0.0), ct)
    stages = {label: round(cumulative[func], 2) for label, func in PROFILE_STAGES if func in cumulative}
    log(f"profiled {tag} build: " + ", ".join(f"{k.strip()} {v}s" for k, v in stages.items()))
    return {"wall_s": round(secs, 2), "stages_s": stages, "file": str(prof)}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gb", type=float, default=2.0, help="size of the synthetic bf16 base (default 2)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/hubsync-bench"), help="folder for inputs and outputs"
    )
    parser.add_argument("--regenerate", action="store_true", help="make the base and fine-tunes again")
    parser.add_argument(
        "--inputs",
        default="full,trainable",
        help="which fine-tunes to build, comma-separated: full, trainable (default both)",
    )
    parser.add_argument(
        "--no-hub", action="store_true", help="use `base.path` instead of the local Hub emulator"
    )
    parser.add_argument(
        "--cache",
        choices=("warm", "cold", "both"),
        default="both",
        help="page-cache state of the inputs before each measurement (default both)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per route and cache state; the median is reported (default 3)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run one build per input under cProfile and print where its time goes",
    )
    parser.add_argument(
        "--again", action="store_true", help="also time a build over an existing output (the full input)"
    )
    parser.add_argument(
        "--skip-handmade", action="store_true", help="do not run the (slow, RAM-hungry) hand-made route"
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also time each build with the hubsync package of another checkout (e.g. `git worktree add "
        "DIR COMMIT`), by PYTHONPATH, in the same rounds",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout (the report goes to stderr)"
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for hidden in (
        "dims",
        "out",
        "base",
        "finetune",
        "handmade",
        "repo",
        "revision",
        "shard-bytes",
        "trainable",
    ):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def publish_base(
    args: argparse.Namespace, work: Path, record: dict[str, Any], env_base: dict[str, str], notes: list[str]
) -> tuple[Any, dict[str, str], dict[str, str]]:
    """(the running LocalHub or None, the environment for hubsync commands, the manifest's `base:` entries)."""
    if args.no_hub:
        notes.append("base given as `base.path` (--no-hub): no Hub, no huggingface_hub cache involved")
        return None, dict(env_base), {"path": "base-src"}
    hub = None
    try:
        from hubsync.testing.hub import LocalHub

        hub = LocalHub(work / "hub").start()
        env = {**env_base, **hub.client_env(work / "hf_home")}
        repo = f"user/bench-llava-{str(args.size_gb).replace('.', 'p')}gb"
        published = record.get("published")
        if not published or not hub.repo_exists(repo) or hub.branch_head(repo) != published.get("sha"):
            t0 = time.perf_counter()
            published = run_checked(
                worker_cmd("publish", base=work / "base-src", repo=repo), env, "publish to the local Hub"
            )
            log(f"published {repo}@{published['sha']} on {hub.endpoint} in {time.perf_counter() - t0:.0f}s")
            record["published"] = published
            (work / "inputs.json").write_text(json.dumps(record, indent=2))
        return hub, env, {"repo": repo, "revision": published["sha"]}
    except Exception as err:  # noqa: BLE001 - the emulator is a moving part of this project: say so and go on without it
        if hub is not None:
            hub.stop()
        notes.append(f"local Hub emulator failed ({type(err).__name__}: {err}); fell back to `base.path`")
        log(notes[-1])
        return None, dict(env_base), {"path": "base-src"}


@dataclass(frozen=True)
class Route:
    key: str  # build | build-again | read | handmade (per input), copy | copy-sync (shared)
    input: str  # an INPUTS key, or "" for the shared routes
    name: str
    cmd: list[str]
    inputs: list[Path]  # files to warm or evict before each sample
    clear: Path | None  # removed before each sample
    env: dict[str, str] | None = None  # extra environment (PYTHONPATH of a baseline checkout)


def make_routes(
    args: argparse.Namespace, work: Path, base_folder: Path, builds: dict[str, list[str]]
) -> list[Route]:
    base_inputs = input_files(base_folder)
    out_copy = work / "out-copy"
    routes = [
        Route(
            "copy",
            "",
            "cp -rL base snapshot",
            ["cp", "-rL", str(base_folder), str(out_copy)],
            base_inputs,
            out_copy,
        ),
        Route(
            "copy-sync",
            "",
            "cp -rL + sync (fsync, as hubsync does)",
            [
                "sh",
                "-c",
                f"cp -rL '{base_folder}' '{out_copy}' && find '{out_copy}' -type f -exec sync {{}} +",
            ],
            base_inputs,
            out_copy,
        ),
    ]
    for key, build_cmd in builds.items():
        item = INPUTS[key]
        ft = work / item.folder
        ft_inputs = input_files(ft)
        weights = [p for p in ft_inputs if p.name.endswith(".safetensors")]
        routes.append(
            Route(
                "read",
                key,
                f"[{key}] read the fine-tune's weights",
                ["sh", "-c", "cat " + " ".join(f"'{p}'" for p in weights) + " > /dev/null"],
                weights,
                None,
            )
        )
        routes.append(
            Route(
                "build",
                key,
                f"[{key}] hubsync build (output removed first)",
                build_cmd,
                base_inputs + ft_inputs,
                work / item.out_hubsync,
            )
        )
        if args.baseline:
            baseline = Path(args.baseline).resolve()
            routes.append(
                Route(
                    "build-baseline",
                    key,
                    f"[{key}] hubsync build at {baseline.name}",
                    build_cmd,
                    base_inputs + ft_inputs,
                    work / item.out_hubsync,
                    env={"PYTHONPATH": str(baseline)},
                )
            )
        if args.again and key == "full":
            routes.append(
                Route(
                    "build-again",
                    key,
                    f"[{key}] hubsync build (output exists)",
                    build_cmd,
                    base_inputs + ft_inputs,
                    None,
                )
            )
        if not args.skip_handmade:
            hand_cmd = worker_cmd(
                "handmade",
                base=base_folder,
                finetune=ft,
                out=work / item.out_handmade,
                trainable=int(key == "trainable"),
            )
            routes.append(
                Route(
                    "handmade",
                    key,
                    f"[{key}] hand-made: load+overlay+save",
                    hand_cmd,
                    base_inputs + ft_inputs,
                    work / item.out_handmade,
                )
            )
    return routes


def measure_routes(
    routes: list[Route], states: list[str], repeat: int, env: dict[str, str], logs: Path
) -> list[Measure]:
    """Each route `repeat` times per cache state, interleaved round by round (route A, B, C, A, B, C, ...) so
    that a burst of load from other work on the machine spreads over all routes instead of one."""
    samples: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    for state in states:
        for i in range(repeat):
            for route in routes:
                if route.clear is not None:
                    remove(route.clear)
                os.sync()  # no writeback of earlier steps left to compete with the measured command
                if state == "warm":
                    warm_read(route.inputs)
                else:
                    evict(route.inputs)
                load = os.getloadavg()[0]
                slug = re.sub(r"[^a-z0-9]+", "-", route.name.lower()).strip("-")[:48]
                log_file = logs / f"{state}-{slug}-{i + 1}.log"
                secs, rss, rc = run_measured(route.cmd, {**env, **(route.env or {})}, log_file)
                if rc != 0:
                    sys.stderr.write(log_file.read_text()[-6000:])
                    raise SystemExit(f"measured command failed: {route.name} (exit {rc}); log: {log_file}")
                samples.setdefault((state, route.input, route.key), []).append((round(secs, 2), rss, load))
                log(f"{state:4s} {route.name}: {secs:.2f}s, peak RSS {rss:.0f} MB, load {load:.1f}")
    measures = []
    for state in states:
        for route in routes:
            got = samples[(state, route.input, route.key)]
            secs = [s for s, _, _ in got]
            measures.append(
                Measure(
                    route.key,
                    route.input,
                    route.name,
                    state,
                    " ".join(route.cmd),
                    sorted(secs)[len(secs) // 2],
                    round(max(r for _, r, _ in got), 1),
                    secs,
                    min(secs),
                    round(max(load for _, _, load in got), 2),
                )
            )
    return measures


def check_input(
    key: str, work: Path, base_folder: Path, build_cmd: list[str], env: dict[str, str], logs: Path
) -> dict[str, Any]:
    """A fresh build of one input, checked file by file and tensor by tensor (against the hand-made output
    when there is one)."""
    item = INPUTS[key]
    out, hand = work / item.out_hubsync, work / item.out_handmade
    remove(out)
    run_measured(build_cmd, env, logs / f"build-final-{key}.log")
    return run_checked(
        worker_cmd(
            "check",
            base=base_folder,
            out=out,
            finetune=work / item.folder,
            handmade=hand if hand.exists() else "",
        ),
        env,
        f"correctness check of the {key} build",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env_base = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(work / "hf_home"),
    }
    env_base.pop("HF_ENDPOINT", None)
    record = prepare_inputs(args, work, env_base)
    notes: list[str] = []
    keys = [k.strip() for k in args.inputs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in INPUTS]
    if unknown:
        raise SystemExit(f"unknown --inputs {unknown}: use {', '.join(INPUTS)}")

    hub, env, base_entry = publish_base(args, work, record, env_base, notes)
    builds = {
        key: [
            sys.executable,
            "-m",
            "hubsync",
            "-q",
            "build",
            str(write_manifest(work, base_entry, INPUTS[key])),
            "--json",
            "--no-verify",
        ]
        for key in keys
    }
    base_folder = work / "base-src"
    profiles: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    try:
        # Unmeasured: fills huggingface_hub's cache (the download) and checks that each build works at all.
        for key, build_cmd in builds.items():
            remove(work / INPUTS[key].out_hubsync)
            warmup = logs / f"build-warmup-{key}.log"
            secs, _, rc = run_measured(build_cmd, env, warmup)
            if rc != 0:
                sys.stderr.write(warmup.read_text()[-6000:])
                raise SystemExit(
                    f"the warm-up `hubsync build` of the {key} input failed (exit {rc}); log: {warmup}"
                )
            log(f"warm-up build of the {key} input done in {secs:.1f}s")
        if hub is not None:
            found = run_checked(
                worker_cmd("snapshot", repo=base_entry["repo"], revision=base_entry["revision"]),
                env,
                "snapshot",
            )
            base_folder = Path(found["folder"])
        routes = make_routes(args, work, base_folder, builds)
        states = ["warm", "cold"] if args.cache == "both" else [args.cache]
        measures = measure_routes(routes, states, args.repeat, env, logs)
        if args.profile:
            for key, build_cmd in builds.items():
                profiles[key] = profile_build(build_cmd, env, logs, work / INPUTS[key].out_hubsync, key)
        for key, build_cmd in builds.items():
            checks[key] = check_input(key, work, base_folder, build_cmd, env, logs)
    finally:
        if hub is not None:
            hub.stop()

    result = summarize(args, work, record, measures, checks, notes, builds, env, base_folder)
    result["profile"] = profiles
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    report = render(result)
    if args.json:
        print(report, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(report)
    return 1 if any(c["problems"] for c in checks.values()) else 0


def input_ratios(by: dict[tuple[str, str, str], Measure], state: str, key: str) -> dict[str, float]:
    build, read = by[(state, key, "build")], by[(state, key, "read")]
    copy, copy_sync = by[(state, "", "copy")], by[(state, "", "copy-sync")]
    floor = read.seconds + copy_sync.seconds
    values = {
        "io_floor_s": floor,
        "build_vs_floor_time": ratio(build.seconds, floor),
        "build_vs_copy_time": ratio(build.seconds, copy.seconds),
        "build_rss_mb": build.peak_rss_mb,
    }
    # The same ratio round by round (the routes of a round ran back to back, under about the same load).
    rounds = zip(build.samples_s, read.samples_s, copy_sync.samples_s)
    values["build_vs_floor_median_of_rounds"] = median([ratio(b, r + c) for b, r, c in rounds])
    hand = by.get((state, key, "handmade"))
    if hand is not None:
        values["handmade_vs_build_time"] = ratio(hand.seconds, build.seconds)
        values["handmade_vs_build_median_of_rounds"] = median(
            [ratio(h, b) for h, b in zip(hand.samples_s, build.samples_s)]
        )
        values["build_vs_handmade_rss"] = ratio(build.peak_rss_mb, hand.peak_rss_mb)
    baseline = by.get((state, key, "build-baseline"))
    if baseline is not None:
        values["baseline_vs_build_time"] = ratio(baseline.seconds, build.seconds)
    return values


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def summarize(
    args: argparse.Namespace,
    work: Path,
    record: dict[str, Any],
    measures: list[Measure],
    checks: dict[str, Any],
    notes: list[str],
    builds: dict[str, list[str]],
    env: dict[str, str],
    base_folder: Path,
) -> dict[str, Any]:
    by = {(m.cache, m.input, m.key): m for m in measures}
    ratios: dict[str, dict[str, dict[str, Any]]] = {}
    for state in sorted({m.cache for m in measures}, key=["warm", "cold"].index):
        for key in builds:
            ratios.setdefault(state, {})[key] = {
                k: {
                    "value": round(v, 3),
                    "target": f"{TARGETS[k][1]} {TARGETS[k][2]:.3g}" if k in TARGETS else None,
                    "met": _meets(k, v) if k in TARGETS else None,
                }
                for k, v in input_ratios(by, state, key).items()
            }
    busiest = max((m.load_avg for m in measures), default=0.0)
    if busiest > 1.0:
        notes = [
            *notes,
            (
                f"other processes were running (1-min load average up to {busiest:.1f} on "
                f"{os.cpu_count()} cores): timings are noisy; compare the samples and minimums"
            ),
        ]
    return {
        "command": " ".join([Path(sys.executable).name, "benchmarks/build.py", *sys.argv[1:]]),
        "commit": _commit(),
        "machine": machine(work),
        "versions": versions(env),
        "size_gb": args.size_gb,
        "base_bytes": folder_bytes(base_folder),
        "base_folder": str(base_folder),
        "finetune_bytes": {k: folder_bytes(work / INPUTS[k].folder) for k in builds},
        "inputs": record,
        "hubsync_commands": {k: " ".join(v) for k, v in builds.items()},
        "measures": [asdict(m) for m in measures],
        "ratios": ratios,
        "checks": checks,
        "notes": notes,
    }


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
        check=False,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


def _meets(key: str, value: float) -> bool:
    _, op, target = TARGETS[key]
    return {"<=": value <= target, ">=": value >= target, "<": value < target}[op]


def render(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    sizes = ", ".join(f"{k} {b / 1e9:.2f} GB" for k, b in result["finetune_bytes"].items())
    lines = [
        f"command:  {result['command']}",
        f"commit:   {result['commit']}",
        (
            f"machine:  {m['cores']} cores ({m['cpu']}), {m['ram_gb']} GB RAM, {m['workdir_fs']}, Linux {m['kernel']}, "
            f"Python {m['python']}"
        ),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"base:     {result['base_bytes'] / 1e9:.2f} GB bf16 ({result['base_folder']}); fine-tunes (fp32): {sizes}",
        "",
        f"{'route':50s} {'cache':5s} {'median s':>9s} {'min s':>7s} {'peak RSS MB':>12s} {'load':>5s}",
    ]
    for meas in result["measures"]:
        lines.append(
            f"{meas['name']:50s} {meas['cache']:5s} {meas['seconds']:9.2f} {meas['min_s']:7.2f} "
            f"{meas['peak_rss_mb']:12.0f} {meas['load_avg']:5.1f}"
        )
    lines.append("")
    for state, per_input in result["ratios"].items():
        for key, values in per_input.items():
            for name, item in values.items():
                label = TARGETS[name][0] if name in TARGETS else name
                verdict = (
                    ""
                    if item["met"] is None
                    else ("  target " + item["target"] + (": MET" if item["met"] else ": NOT MET"))
                )
                lines.append(f"{state:4s} [{key}] {label:40s} {item['value']:9.3f}{verdict}")
    for key, c in result["checks"].items():
        lines += [
            "",
            (
                f"check [{key}]: {c['identical_shards']}/{c['shards']} shards byte-identical to the base (sha256); "
                f"rewritten: {', '.join(c['rewritten_shards']) or 'none'} (expected {', '.join(c['expected_rewritten'])}); "
                f"{c['tuned_tensors_checked']} tuned tensors = fine-tune cast to bf16"
            ),
        ]
        if c["vs_handmade"]:
            h = c["vs_handmade"]
            lines.append(
                f"check [{key}]: {h['equal']}/{h['tensors']} tensors bit-identical to the hand-made output"
            )
        lines.append(
            f"check [{key}]: " + ("OK" if not c["problems"] else "PROBLEMS: " + "; ".join(c["problems"]))
        )
    for key, profile in (result.get("profile") or {}).items():
        if "stages_s" in profile:
            lines += [
                "",
                f"profile of one {key} build under cProfile ({profile['wall_s']:.1f}s with profiling overhead):",
            ]
            lines += [f"  {label:58s} {secs:7.2f}s" for label, secs in profile["stages_s"].items()]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
