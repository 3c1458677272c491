"""`hubsync plan` and `hubsync doctor` with a cold cache: what they fetch of the base, against downloading it.

Makes a Llama-shaped bf16 base of about --size-gb (a vision tower `vpm.` and a language model `llm.`, in ~1 GB
shards) and the full state dict a trainer saves with --bf16 (the vision tower changed, the rest equal to the
base), publishes the base on the local Hub emulator, and measures, each in its own process with a fresh cache:
`hubsync plan` (headers and samples over HTTP), a download of the whole base (what `plan` did before), `hubsync
plan` again with the base in the cache (every byte compared), and `hubsync doctor`. Bytes are what the emulator
sent (its request log), split into the weight files and the rest.

    python benchmarks/plan.py --size-gb 1 --workdir /tmp/hubsync-plan-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAYERS_PER_GB = 4  # llm layers of hidden 2048 per GB of bf16 weights (about 0.23 GB each)


def make_inputs(work: Path, size_gb: float) -> tuple[Path, Path]:
    """The base folder and the fine-tune folder (made once per workdir)."""
    import torch
    from safetensors.torch import save_file

    base, finetune = work / "base", work / "finetune"
    if (base / "config.json").is_file() and (finetune / "model.safetensors").is_file():
        return base, finetune
    base.mkdir(parents=True, exist_ok=True)
    finetune.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = _layout(max(1, round(size_gb * LAYERS_PER_GB)))
    shards: list[dict[str, Any]] = [{}]
    weight_map, trained = {}, {}
    for name, shape in tensors:
        value = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if sum(t.numel() * 2 for t in shards[-1].values()) + value.numel() * 2 > 1_000_000_000:
            shards.append({})
        shards[-1][name] = value
        trained[name] = (
            value + 0.01 * torch.randn(shape, generator=generator) if name.startswith("vpm.") else value
        )
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
        save_file(shard, str(base / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    index = {
        "metadata": {"total_size": sum(2 * t.numel() for s in shards for t in s.values())},
        "weight_map": weight_map,
    }
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (finetune / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {n: t.to(torch.bfloat16).contiguous() for n, t in trained.items()},
        str(finetune / "model.safetensors"),
    )
    return base, finetune


def _layout(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """A vision tower of 12 blocks (hidden 1152) and `layers` language-model blocks (hidden 2048)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(12):
        p = f"vpm.encoder.layers.{i}."
        out += [(p + n, (1152, 1152)) for n in ("q.weight", "k.weight", "v.weight", "o.weight")]
        out += [
            (p + "fc1.weight", (4304, 1152)),
            (p + "fc2.weight", (1152, 4304)),
            (p + "norm.weight", (1152,)),
        ]
    out.append(("llm.embed_tokens.weight", (32000, 2048)))
    for i in range(layers):
        p = f"llm.layers.{i}."
        out += [
            (p + n, (2048, 2048))
            for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
        ]
        out += [(p + n, (5632, 2048)) for n in ("gate_proj.weight", "up_proj.weight")]
        out += [(p + "down_proj.weight", (2048, 5632)), (p + "input_layernorm.weight", (2048,))]
    return out


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, result


def served(hub: Any, repo_id: str, weights: set[str]) -> dict[str, int]:
    records = hub.requests(repo_id=repo_id)
    weight = sum(r.bytes_out for r in records if any(w in r.path for w in weights))
    return {"requests": len(records), "bytes": sum(r.bytes_out for r in records), "weight_bytes": weight}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    work = args.workdir.resolve()
    base, finetune = make_inputs(work, args.size_gb)

    from hubsync.fsio import list_files
    from hubsync.tensors import sha256_file
    from hubsync.testing.hub import LocalHub
    from hubsync.testing.models import publish_model

    hub = LocalHub(work / f"hub-{time.time_ns()}").start()
    # huggingface_hub reads these once, at import: this process publishes the base with it
    os.environ.update(hub.client_env(work / "hf-publisher"))
    try:
        published = publish_model(base, "my-org/bench-base", endpoint=hub.endpoint, token="hf_user_token")
        shards = [p for p in list_files(base) if p.endswith(".safetensors")]
        marks = set(shards) | {sha256_file(base / p) for p in shards}
        weight_bytes = sum((base / p).stat().st_size for p in shards)
        manifest = work / "manifest.yaml"
        manifest.write_text(
            f"base: {{repo: my-org/bench-base, revision: {published.sha}}}\n"
            f"finetune: {{path: {finetune}, tuned: [vpm.]}}\noutput: {{dir: {work / 'out'}}}\n"
        )
        results: dict[str, Any] = {"weight_bytes": weight_bytes, "shards": len(shards)}
        hubsync = [sys.executable, "-m", "hubsync", "-q"]
        home = work / f"hf-{time.time_ns()}"
        env = {**os.environ, **hub.client_env(home)}
        steps = [
            ("plan, cold cache", [*hubsync, "plan", "--json", str(manifest)]),
            (
                "download the base",
                [
                    sys.executable,
                    "-c",
                    f"from huggingface_hub import snapshot_download; snapshot_download('my-org/bench-base', revision='{published.sha}')",
                ],
            ),
            ("plan, base in the cache", [*hubsync, "plan", "--json", str(manifest)]),
        ]
        for label, cmd in steps:
            hub.clear_log()
            seconds, result = run(cmd, env, work)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                return 1
            results[label] = {"seconds": round(seconds, 2), **served(hub, "my-org/bench-base", marks)}
        hub.clear_log()
        doctor_env = {**os.environ, **hub.client_env(work / f"hf-doctor-{time.time_ns()}")}
        seconds, result = run(
            [*hubsync, "doctor", str(finetune), "--base", f"my-org/bench-base@{published.sha}"],
            doctor_env,
            work,
        )
        results["doctor, cold cache"] = {
            "seconds": round(seconds, 2),
            "exit": result.returncode,
            **served(hub, "my-org/bench-base", marks),
        }
    finally:
        hub.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
