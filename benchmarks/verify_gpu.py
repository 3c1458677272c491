"""GPU check: build + verify a full-size random-weight LLaVA (about 7 B parameters, bf16) on CUDA.

    python benchmarks/verify_gpu.py --size full --workdir /tmp/hubsync-gpu      # on a GPU machine
    python benchmarks/verify_gpu.py --size small --workdir /tmp/hubsync-gpu     # anywhere, in a minute

It makes a real transformers architecture (LlavaForConditionalGeneration: Llama-7B-shaped text model, CLIP
ViT-L/14-336 vision tower) with random bf16 weights, a vision fine-tune of it (vision tower and projector
perturbed, saved in fp32 as trainers do; the frozen LLM is not re-saved, which hubsync handles: absent tensors
come from the base), then runs `hubsync build --no-verify` and `hubsync verify --json` as separate processes and
prints each step's wall time and, from the verification (which loads and runs both models in the verification
worker, in the runtime `--python` names, else hubsync's own), the time of each worker step and the peak device
memory of each model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # hidden, intermediate, layers, heads, vision (hidden, intermediate, layers, heads, image, patch)
    "full": (4096, 11008, 34, 32, (1024, 4096, 24, 16, 336, 14)),
    "small": (256, 688, 2, 4, (64, 128, 2, 4, 32, 8)),
}


def make_base(dest: Path, size: str) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from hubsync.testing.models import make_native_vlm

    tiny = make_native_vlm(dest.parent / "tiny-template")
    config = LlavaConfig.from_pretrained(tiny)
    hidden, inter, layers, heads, (v_hidden, v_inter, v_layers, v_heads, image, patch) = SIZES[size]
    config.text_config.update(
        {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
        }
    )
    config.vision_config.update(
        {
            "hidden_size": v_hidden,
            "intermediate_size": v_inter,
            "num_hidden_layers": v_layers,
            "num_attention_heads": v_heads,
            "image_size": image,
            "patch_size": patch,
        }
    )
    config.image_seq_length = (image // patch) ** 2
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    params = sum(p.numel() for p in model.parameters())
    print(f"base: {params / 1e9:.2f} B parameters", flush=True)
    model.save_pretrained(dest, max_shard_size="4GB")
    # tokenizer, chat template, processor and generation config come from the tiny template
    for name in os.listdir(tiny):
        if not name.endswith(".safetensors") and name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(tiny / name, dest / name)
    processor = json.loads((tiny / "processor_config.json").read_text())
    image_proc = processor.get("image_processor", processor)
    for key, value in (("crop_size", {"height": image, "width": image}), ("size", {"shortest_edge": image})):
        if key in image_proc:
            image_proc[key] = value
    if "patch_size" in processor:
        processor["patch_size"] = patch
    (dest / "processor_config.json").write_text(json.dumps(processor, indent=2))
    del model


def make_finetune(base: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from hubsync.tensors import list_checkpoint, load_tensor

    dest.mkdir(parents=True)
    state = {}
    generator = torch.Generator().manual_seed(1)
    for name, info in list_checkpoint(base).tensors.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            value = load_tensor(info).float()
            state[name] = value + 1e-2 * torch.randn(value.shape, generator=generator)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(base / name, dest / name)
    (dest / "training_args.bin").write_bytes(b"\0")
    print(f"fine-tune: {len(state)} vision tensors in fp32", flush=True)


def run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hubsync-gpu"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--python", default=None, help="the interpreter the worker runs models with")
    args = parser.parse_args()
    os.environ["HUBSYNC_VERIFY_CACHE"] = "0"  # time the base's run too, never a kept one
    work = args.workdir.resolve() / args.size
    base, ft = work / "base", work / "finetune"
    timings: dict[str, float] = {}
    if not (base / "config.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        make_base(base, args.size)
        make_finetune(base, ft)
        timings["generate base + fine-tune"] = time.perf_counter() - start
    manifest = work / "manifest.yaml"
    manifest.write_text(
        f"base: {{path: {base}}}\nfinetune: {{path: {ft}, tuned: [vision_tower., multi_modal_projector.]}}\n"
        f"output: {{dir: {work / 'out'}}}\nverify: {{device: {args.device}}}\n"
    )
    hubsync = [sys.executable, "-m", "hubsync"]
    timings["hubsync build --no-verify"] = run([*hubsync, "-q", "build", "--no-verify", str(manifest)], work)
    verify = [*hubsync, "verify", "--json", str(work / "out")] + (["--python", args.python] if args.python else [])
    start = time.perf_counter()
    print("$ " + " ".join(verify), flush=True)
    done = subprocess.run(verify, cwd=work, capture_output=True, text=True)
    timings["hubsync verify"] = time.perf_counter() - start
    print(done.stderr[-2000:], flush=True)
    record = json.loads(done.stdout)
    record = record.get("verification", record)  # the verify JSON, with timings and memory from this run
    size_gb = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors")) / 1e9
    print(
        f"\nmodel: {size_gb:.2f} GB of bf16 shards; device: {record['device']}; device_map: {record['device_map']}"
    )
    print(f"versions: {record['versions']}")
    for step, seconds in timings.items():
        print(f"  {step:<34} {seconds:8.1f} s")
    for step, seconds in record["timings_s"].items():
        print(f"  verify: {step:<26} {seconds:8.1f} s")
    for step, value in record["peak_memory_bytes"].items():
        print(f"  peak memory {step:<22} {value / 2**30:8.2f} GiB")
    print("verification", "PASSED" if record["passed"] else "FAILED")


if __name__ == "__main__":
    main()
