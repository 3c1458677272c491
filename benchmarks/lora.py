"""Benchmark merging a LoRA adapter: `hubsync build` (streaming) against PEFT's in-memory merge.

Run by hand, from the repository root:

    python benchmarks/lora.py --size-gb 2 --workdir /tmp/hubsync-lora-bench
    python benchmarks/lora.py --size-gb 0.2 --workdir /tmp/hubsync-lora-smoke   # smoke test, < 1 minute

What it does:

1. Generates, once per workdir (reused when present; `--regenerate` forces it), a synthetic base: a real
   `LlamaForCausalLM` architecture sized to `--size-gb` of bf16 weights, whose tensors are drawn one at a time
   (the model is built on the meta device, so no fp32 copy ever exists) and written into ~1 GB safetensors
   shards with an index, plus config.json and generation_config.json.
2. Writes a rank-`--rank` LoRA adapter on every attention and MLP projection (q, k, v, o, gate, up, down) of
   every layer directly with safetensors, in PEFT's on-disk format (`base_model.model.<module>.lora_A.weight`,
   fp32) with its adapter_config.json. It is not trained; B is random and non-zero so every merge shows.
3. Times each route in its own subprocess and reads that subprocess's peak RSS from `os.wait4`:
   * hubsync: `hubsync build --no-verify manifest.yaml` (`base.path`, the adapter folder as `finetune.path`);
   * PEFT: `PeftModel.from_pretrained(base in bf16, adapter).merge_and_unload().save_pretrained(out)`.
4. Checks that both outputs hold the same tensors, bit for bit.

The parent imports neither torch nor transformers before the timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SEED = 1234

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def llama_config(size_gb: float) -> dict[str, Any]:
    """A Llama shape of about `size_gb` GB in bf16: 2048 wide, 5632 MLP, 32000 vocab, as many layers as fit."""
    hidden, inner, vocab, heads, kv_heads = 2048, 5632, 32000, 16, 16
    per_layer = 4 * hidden * hidden + 3 * hidden * inner + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def generate(workdir: Path, size_gb: float, rank: int) -> tuple[Path, Path]:
    """The base and the adapter folders (reused when a previous run finished writing them)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = workdir / "base", workdir / "adapter"
    config_dict = llama_config(size_gb)
    marker = workdir / "generated.json"
    wanted = {"config": config_dict, "rank": rank, "seed": SEED}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)

    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(SEED)
    shard_bytes, shards, current, filled = 1_000_000_000, [], {}, 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:  # drawn in bf16 chunks: never an fp32 copy of a whole tensor beyond one row block
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = flat[start : start + (1 << 24)]
                chunk.copy_(torch.randn(chunk.numel(), generator=generator) * 0.02)
        current[name] = tensor
        filled += tensor.numel() * 2
        if filled >= shard_bytes:
            shards.append(current)
            current, filled = {}, 0
            _flush(base, shards, save_file, final=False)
    if current:
        shards.append(current)
    weight_map = _flush(base, shards, save_file, final=True)
    total = sum(2 * _numel(s) for s in shapes.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    config.save_pretrained(str(base))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")

    lora: dict[str, torch.Tensor] = {}
    hidden, inner = config_dict["hidden_size"], config_dict["intermediate_size"]
    dims = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inner, hidden),
        "up_proj": (inner, hidden),
        "down_proj": (hidden, inner),
    }
    for layer in range(config_dict["num_hidden_layers"]):
        for module in PROJECTIONS:
            out_f, in_f = dims[module.split(".")[1]]
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) / in_f**0.5
            lora[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 1e-3
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": [m.split(".")[1] for m in PROJECTIONS],
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "modules_to_save": None,
                "base_model_name_or_path": str(base),
                "revision": None,
                "inference_mode": True,
                "init_lora_weights": True,
                "rank_pattern": {},
                "alpha_pattern": {},
            },
            indent=2,
        )
        + "\n"
    )
    marker.write_text(json.dumps(wanted))
    return base, adapter


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_written: dict[str, str] = {}


def _flush(base: Path, shards: list[dict[str, Any]], save_file: Any, *, final: bool) -> dict[str, str]:
    """Write every full shard not yet written (names need the final count, so they are renamed at the end)."""
    for i, shard in enumerate(shards):
        if shard and not shard.get("__written__"):
            path = base / f"part-{i:05d}.safetensors"
            save_file({k: v for k, v in shard.items()}, str(path), metadata={"format": "pt"})
            _written.update({k: path.name for k in shard})
            shards[i] = {"__written__": True}
    if not final:
        return {}
    count = len(shards)
    renamed = {
        f"part-{i:05d}.safetensors": f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
    }
    for old, new in renamed.items():
        os.replace(base / old, base / new)
    return {k: renamed[v] for k, v in _written.items()}


def timed(argv: list[str], cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def warm(files: list[Path]) -> None:
    """Read the inputs once, so that both routes start from the page cache."""
    buffer = bytearray(16 << 20)
    for path in files:
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ), one tensor at a time."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if not index.is_file():  # one file below the shard size
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                return {k: folder / "model.safetensors" for k in f.keys()}
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}

    left, right = where(a), where(b)
    differ = sorted(set(left) ^ set(right))
    for name in sorted(set(left) & set(right)):
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
            differ.append(name)
    return len(set(left) & set(right)), differ


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hubsync-lora-bench"))
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs per route, interleaved; medians reported")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.regenerate:
        (workdir / "generated.json").unlink(missing_ok=True)

    start = time.perf_counter()
    generator = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import lora; "
            f"lora.generate(__import__('pathlib').Path({str(workdir)!r}), {args.size_gb}, {args.rank})",
        ],
        cwd=REPO_ROOT,
        check=True,
    )
    del generator
    print(f"inputs ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    base, adapter = workdir / "base", workdir / "adapter"
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size

    manifest = workdir / "manifest.yaml"
    manifest.write_text(
        f"base:\n  path: {base}\nfinetune:\n  path: {adapter}\noutput:\n  dir: {workdir / 'out-hubsync'}\n"
        "verify:\n  device: cpu\n"
    )
    peft_out = workdir / "out-peft"
    hubsync = [sys.executable, "-m", "hubsync", "-q", "build", "--no-verify", str(manifest)]
    peft = [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(peft_out)]
    routes = {"hubsync build": (hubsync, workdir / "out-hubsync"), "PEFT merge_and_unload": (peft, peft_out)}
    samples: dict[str, list[tuple[float, int, float]]] = {name: [] for name in routes}
    inputs = [*base.iterdir(), *adapter.iterdir()]
    for _ in range(args.repeat):  # interleaved, so that a burst of other work on the machine hits both
        for name, (argv, out) in routes.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            warm(inputs)
            load = os.getloadavg()[0]
            wall, rss = timed(argv, workdir)
            samples[name].append((wall, rss, load))
            print(f"{name}: {wall:.2f} s, {rss / 1e6:.0f} MB, load {load:.1f}", file=sys.stderr)
    results = {
        name: (sorted(s[0] for s in got)[len(got) // 2], max(s[1] for s in got)) for name, got in samples.items()
    }
    compared, differ = same_tensors(workdir / "out-hubsync", peft_out)

    print(
        f"\nbase {base_bytes / 1e9:.2f} GB bf16 ({len(list(base.glob('*.safetensors')))} shards), "
        f"adapter rank {args.rank} on {len(PROJECTIONS)} projections x every layer "
        f"({adapter_bytes / 1e6:.0f} MB fp32); {os.cpu_count()} CPUs, {platform.platform()}"
    )
    print(f"{'route':<24} {'median s':>9} {'samples s':>22} {'peak RSS MB':>12} {'load':>5}")
    for route, (wall, rss) in results.items():
        got = samples[route]
        shown = " ".join(f"{s[0]:.1f}" for s in got)
        print(f"{route:<24} {wall:>9.2f} {shown:>22} {rss / 1e6:>12.0f} {max(s[2] for s in got):>5.1f}")
    (h_wall, h_rss), (p_wall, p_rss) = results.values()
    print(f"hubsync / PEFT: time {h_wall / p_wall:.2f}x, peak RSS {h_rss / p_rss:.2f}x")
    print(
        f"outputs: {compared} tensors compared, {len(differ)} differ"
        + (f" (first: {differ[0]})" if differ else "")
    )


if __name__ == "__main__":
    main()
