"""LoRA trainer outputs for the tiny fixtures, made with real PEFT, and PEFT's own merge to compare against.

* `make_lora_output(base_dir, dest, ...)`: wraps the tiny base (LLaVA or the MiniCPM-V look-alike) with
  `get_peft_model(LoraConfig(...))`, gives every LoRA factor random non-zero values (scaled by `b_scale`, so a
  test can make the delta vanish below bf16 resolution on purpose), and saves it with PEFT's `save_pretrained`,
  plus what a LoRA run leaves beside it (tokenizer, `training_args.bin`, `trainer_state.json`). The adapter's
  `base_model_name_or_path` is set to `base_name` (the Hub id a real run would have loaded).
* `peft_merged_state(base_dir, adapter_dir)`: the reference: `PeftModel.from_pretrained(base in bf16,
  adapter).merge_and_unload()`, saved with `save_pretrained` and read back under the on-disk tensor names.
* `make_gpt2_base(dest)`: a tiny GPT-2 (Conv1D layers, so LoRA needs `fan_in_fan_out`) in bf16.
* `make_deepspeed_checkpoint(dest)`: the file layout of a ZeRO-2/3 checkpoint without consolidated weights.

peft, torch and transformers are imported inside the functions (peft is a test extra, not a dependency).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubsync.testing.models import (
    _deterministic,
    _is_remote_base,
    _prepare_dest,
    _write_json,
    read_state_dict,
)

if TYPE_CHECKING:
    import torch

# Module names (PEFT suffix matching) that a LoRA run on each fixture targets: every LLM projection and the
# vision tower's attention and MLP, the way MiniCPM-V's LoRA recipe and LLaVA recipes do.
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NATIVE_TARGETS = (*LLM_PROJECTIONS, "fc1", "fc2", "out_proj")
REMOTE_TARGETS = (*LLM_PROJECTIONS, "fc1", "fc2")
NATIVE_MODULES_TO_SAVE = ("multi_modal_projector",)
REMOTE_MODULES_TO_SAVE = ("resampler",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def load_base_model(base_dir: Path, dtype: str = "bfloat16") -> Any:
    """The tiny base as a torch module in `dtype` (remote code is imported from hubsync.testing, not run from
    the folder)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    base_dir = Path(base_dir)
    if _is_remote_base(base_dir):
        from hubsync.testing.remote_code.configuration_minicpm import MiniCPMVConfig
        from hubsync.testing.remote_code.modeling_minicpmv import MiniCPMV

        model = MiniCPMV(MiniCPMVConfig.from_pretrained(base_dir)).to(torch_dtype)
        model.load_state_dict(read_state_dict(base_dir), strict=True)
        return model.eval()
    import transformers

    config = json.loads((base_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    return cls.from_pretrained(base_dir, dtype=torch_dtype).eval()


def make_lora_output(
    base_dir: Path,
    dest: Path,
    *,
    base_name: str | None = None,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    r: int = 4,
    lora_alpha: float = 8,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    fan_in_fan_out: bool = False,
    lora_bias: bool = False,
    b_scale: float = 0.02,
    seed: int = 0,
    safe_serialization: bool = True,
    trainer_files: bool = True,
) -> Path:
    """A LoRA trainer output for `base_dir` in `dest` (see the module docstring). Returns `dest`."""
    import torch
    from peft import LoraConfig, get_peft_model

    base_dir = Path(base_dir)
    dest = _prepare_dest(dest)
    remote = _is_remote_base(base_dir) if (base_dir / "config.json").is_file() else False
    if target_modules is None:
        target_modules = REMOTE_TARGETS if remote else NATIVE_TARGETS
    if modules_to_save is None:
        modules_to_save = REMOTE_MODULES_TO_SAVE if remote else NATIVE_MODULES_TO_SAVE
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        fan_in_fan_out=fan_in_fan_out,
        lora_bias=lora_bias,
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    with _deterministic(seed):
        model = get_peft_model(load_base_model(base_dir), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    # What training leaves: A of the usual init scale, B moved away from its zero init.
                    scale = (
                        b_scale
                        if ".lora_B" in name or "lora_embedding_B" in name
                        else 1.0 / param.shape[-1] ** 0.5
                    )
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
                elif ".modules_to_save." in name:
                    param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
        model.save_pretrained(str(dest), safe_serialization=safe_serialization, save_embedding_layers=False)

    adapter_config = json.loads((dest / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base_name or str(base_dir)
    (dest / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    if trainer_files:
        for name in _TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, dest / name)
        torch.save(
            {"use_lora": True, "lora_r": r, "model_name_or_path": base_name or str(base_dir)},
            dest / "training_args.bin",
        )
        _write_json(dest / "trainer_state.json", {"global_step": 2, "log_history": []})
    return dest


def peft_merged_state(base_dir: Path, adapter_dir: Path, workdir: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of `adapter_dir` into the bf16 base, under the names `save_pretrained` writes."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(base_dir), str(adapter_dir)).merge_and_unload()
    out = Path(workdir) / "peft-merged"
    model.save_pretrained(str(out))
    return read_state_dict(out)


def make_gpt2_base(dest: Path, *, seed: int = 0) -> Path:
    """A tiny GPT-2 in bf16: its attention and MLP are transformers' Conv1D, weights stored (in, out)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dest = _prepare_dest(dest)
    with _deterministic(seed):
        config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)
        GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(str(dest))
    return dest


def make_deepspeed_checkpoint(dest: Path, *, step: int = 4, with_script: bool = True) -> Path:
    """A Trainer `checkpoint-N` written under DeepSpeed ZeRO without gathered 16-bit weights: `latest`,
    `global_stepN/` with per-rank model and optimizer states, `zero_to_fp32.py`, config and trainer state,
    and no model weights. The `.pt` files are placeholders; only their names and layout matter here."""
    dest = _prepare_dest(dest)
    tag = f"global_step{step}"
    (dest / "latest").write_text(tag)
    shards = dest / tag
    shards.mkdir()
    (shards / "mp_rank_00_model_states.pt").write_bytes(b"placeholder")
    for rank in range(2):
        (shards / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"placeholder")
    if with_script:
        (dest / "zero_to_fp32.py").write_text(
            "# DeepSpeed's conversion script is copied here by the engine\n"
        )
    _write_json(dest / "config.json", {"model_type": "llama"})
    _write_json(dest / "trainer_state.json", {"global_step": step})
    return dest
