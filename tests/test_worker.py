"""The verification worker and the runtimes it runs in: real models, real interpreters, real subprocesses.

The worker runs out of process on the tiny models of `hubsync.testing.models` (and their broken variants in
`broken_models`); each test reads its JSON result and the arrays it wrote. One test builds a second Python
environment with transformers 4.x through `verify.requirements` and runs the remote-code look-alike in it, as
a user whose model only runs on 4.x would.
"""

from __future__ import annotations

import ast
import io
import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from hubsync.build import build
from hubsync.errors import VerifyError
from hubsync.testing.broken_models import (
    MISSING_MODULE,
    make_crashing_model,
    make_legacy_only_model,
    make_llava_without_image_placeholder,
    make_model_with_lossy_tokenizer,
    make_model_with_missing_import,
)
from hubsync.testing.models import NATIVE_VISION_PREFIXES, REMOTE_VISION_PREFIXES
from hubsync.verify import runtime as R
from hubsync.verify.runtime import Runtime, WorkerResult, current_runtime, run_worker
from hubsync.verify.worker import STEPS, map_prefix
from tests.fixtures_runtime import LEGACY_REQUIREMENTS

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_worker")]

TIMEOUT = 300.0
UNMAPPED = "not_a_part."


def request(
    folder: Path, tuned: list[str] | tuple[str, ...] = REMOTE_VISION_PREFIXES, **extra: Any
) -> dict[str, Any]:
    return {
        "folder": str(folder),
        "trust_remote_code": True,
        "device": "cpu",
        "tuned_prefixes": list(tuned),
        **extra,
    }


def run(runtime: Runtime, folder: Path, workdir: Path, **extra: Any) -> WorkerResult:
    return run_worker(runtime, request(folder, **extra), timeout=TIMEOUT, workdir=workdir)


def array(result: WorkerResult, name: str | None) -> np.ndarray:
    assert name, "the worker wrote no array for this output"
    return np.load(result.outputs_dir / name)


def module_output(result: WorkerResult, prefix: str) -> np.ndarray:
    (module,) = result.step("image_forward")["liveness"][prefix]["modules"]
    assert module["ran"], f"{module['name']} did not run in the image forward"
    return array(result, module["output"])


def assert_every_step_passed(result: WorkerResult, *, skipped: tuple[str, ...] = ()) -> None:
    assert result.failure is None, (result.failure, result.stderr_tail)
    for name in STEPS:
        expected = None if name in skipped else True
        assert result.step(name)["ok"] is expected, (name, result.step(name))


@pytest.fixture(scope="module")
def current() -> Runtime:
    return current_runtime()


@pytest.fixture(scope="module")
def remote_build(
    tmp_path_factory: pytest.TempPathFactory, remote_base_dir: Path, remote_trainer_output: Path
) -> Path:
    """hubsync's build of the vision fine-tune of the look-alike, from the local base folder."""
    root = tmp_path_factory.mktemp("worker-build")
    manifest = root / "manifest.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "base": {"path": str(remote_base_dir)},
                "finetune": {"path": str(remote_trainer_output), "tuned": list(REMOTE_VISION_PREFIXES)},
                "output": {"dir": "out"},
                "verify": {"device": "cpu", "trust_remote_code": True},
            }
        )
    )
    return build(manifest, record_last_build=False).output


@pytest.fixture(scope="module")
def remote_runs(
    tmp_path_factory: pytest.TempPathFactory, current: Runtime, remote_base_dir: Path, remote_build: Path
) -> dict[str, WorkerResult]:
    root = tmp_path_factory.mktemp("worker-runs")
    return {
        "base": run(current, remote_base_dir, root / "base", generate=False),
        "build": run(
            current, remote_build, root / "build", tuned_prefixes=[*REMOTE_VISION_PREFIXES, UNMAPPED]
        ),
    }


# ------------------------------------------------------------------------------------- the look-alike, here


def test_the_look_alike_passes_every_step(remote_runs: dict[str, WorkerResult]) -> None:
    assert_every_step_passed(remote_runs["base"], skipped=("generate",))
    build = remote_runs["build"]
    assert_every_step_passed(build)
    assert build.step("generate")["via"] == "chat"
    assert build.step("generate")["text"].strip(), "generation returned no text"
    tokenizer = build.step("tokenizer")
    assert tokenizer["class"] == "MiniCPMVTokenizerFast"
    assert tokenizer["reference"]["source"] == "tokenizer.json"
    assert tokenizer["agrees_with_reference"] is True and tokenizer["roundtrip"] is True
    processor = build.step("processor")
    assert (processor["class"], processor["is_processor"]) == ("MiniCPMVProcessor", True)
    assert processor["chat_template"]["renders"] is True
    load = build.step("load")
    assert load["via"].startswith("auto_map:") and load["class"] == "MiniCPMV"
    assert load["missing_keys"] == load["unexpected_keys"] == load["mismatched_keys"] == []
    assert load["device_counts"] == {"cpu": 1}


def test_frozen_logits_equal_and_tuned_modules_differ(remote_runs: dict[str, WorkerResult]) -> None:
    base, build = remote_runs["base"], remote_runs["build"]
    text = "text_forward"
    assert np.array_equal(array(base, base.step(text)["logits"]), array(build, build.step(text)["logits"]))
    for prefix, module in zip(REMOTE_VISION_PREFIXES, ("vpm", "resampler")):
        entry = build.step("image_forward")["liveness"][prefix]
        assert [m["name"] for m in entry["modules"]] == [module]
        assert entry["unmatched_tensors"] == 0
        delta = np.abs(module_output(base, prefix) - module_output(build, prefix)).max()
        assert delta > 0, f"{prefix} gives the base's output: the tuned weights are not the ones used"


def test_a_tuned_prefix_without_a_module_is_reported(remote_runs: dict[str, WorkerResult]) -> None:
    entry = remote_runs["build"].step("image_forward")["liveness"][UNMAPPED]
    assert entry["modules"] == []
    assert entry["reason"] == f"no tensor of the checkpoint starts with '{UNMAPPED}'"


def test_prefixes_map_to_modules_across_renamed_levels() -> None:
    """Checkpoint names as transformers 4.x saved a LLaVA, module names as transformers 5 builds it."""
    import torch
    from torch import nn

    model = nn.Module()
    model.model = nn.Module()
    model.model.vision_tower = nn.Sequential(nn.Linear(2, 2))
    model.model.language_model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model.lm_head = nn.Linear(2, 2, bias=False)
    checkpoint = [
        "vision_tower.vision_model.0.weight",
        "vision_tower.vision_model.0.bias",
        "language_model.model.0.weight",
        "language_model.model.0.bias",
        "language_model.model.1.gamma",  # the old LayerNorm name, renamed on load
        "language_model.model.1.beta",
        "language_model.lm_head.weight",
        "old_projector.weight",  # a tensor the model has no place for
    ]
    with torch.no_grad():
        assert [m["name"] for m in map_prefix("vision_tower.", checkpoint, model)["modules"]] == [
            "model.vision_tower"
        ]
        assert [m["name"] for m in map_prefix("language_model.model.1.", checkpoint, model)["modules"]] == [
            "model.language_model.1"
        ]
        assert [m["name"] for m in map_prefix("language_model.lm_head.", checkpoint, model)["modules"]] == [
            "lm_head"
        ]
        orphan = map_prefix("old_projector.", checkpoint, model)
    assert orphan["modules"] == [] and orphan["unmatched_tensors"] == 1
    assert orphan["reason"] == "no parameter of the model corresponds to a tensor under 'old_projector.'"


# --------------------------------------------------------------------------------------- broken models


@pytest.mark.parametrize(("how", "signal_name"), [("abort", "SIGABRT"), ("segfault", "SIGSEGV")])
def test_a_crash_in_model_code_is_a_failed_result(
    current: Runtime, remote_base_dir: Path, tmp_path: Path, how: Any, signal_name: str
) -> None:
    folder = make_crashing_model(remote_base_dir, tmp_path / "model", how=how)
    result = run(current, folder, tmp_path / "run")  # returns: the crash did not reach this process
    assert result.failure is not None
    assert result.failure.startswith(
        f"the worker crashed ({signal_name}) during image_forward, in modeling_minicpmv.py"
    )
    assert result.failure.endswith("(_break_here)")
    assert "Traceback" not in result.failure
    for done in ("runtime", "preflight", "tokenizer", "processor", "load", "text_forward"):
        assert result.step(done)["ok"] is True, done
    assert result.step("image_forward")["ok"] is None  # running when the process died
    assert result.step("generate") == {"ok": None, "skipped": "the worker never reached this step"}


def test_memory_error_in_model_code_is_a_failed_step(
    current: Runtime, remote_base_dir: Path, tmp_path: Path
) -> None:
    folder = make_crashing_model(remote_base_dir, tmp_path / "model", how="memory_error")
    result = run(current, folder, tmp_path / "run")
    assert result.failure is None  # the worker itself finished
    image = result.step("image_forward")
    assert image["ok"] is False
    assert (
        image["error"] == "MemoryError: the vision tower asked for more memory than there is (test fixture)"
    )
    assert result.step("text_forward")["ok"] is True


def test_preflight_names_a_module_the_code_imports_but_the_runtime_lacks(
    current: Runtime, remote_base_dir: Path, tmp_path: Path
) -> None:
    folder = make_model_with_missing_import(remote_base_dir, tmp_path / "model")
    result = run(current, folder, tmp_path / "run")
    preflight = result.step("preflight")
    assert preflight["ok"] is False
    assert preflight["missing"] == [
        {
            "module": MISSING_MODULE,
            "files": ["modeling_minicpmv.py"],
            "error": f"ModuleNotFoundError: No module named '{MISSING_MODULE}'",
        }
    ]
    assert preflight["error"] == f"missing modules: {MISSING_MODULE} (imported by modeling_minicpmv.py)"
    assert result.step("load") == {
        "ok": None,
        "skipped": "the model's code imports modules this runtime lacks",
    }


def test_code_written_for_transformers_4_does_not_load_here(
    current: Runtime, remote_build: Path, tmp_path: Path
) -> None:
    """The MiniCPM-Llama3-V 2.5 failure: its model class never calls post_init(). (It loads under 4.x: see the
    transformers 4 test.)"""
    folder = make_legacy_only_model(remote_build, tmp_path / "model")
    result = run(current, folder, tmp_path / "run")
    assert result.step("load")["ok"] is False
    assert (
        result.step("load")["error"]
        == "AttributeError: 'MiniCPMV' object has no attribute 'all_tied_weights_keys'"
    )
    assert result.step("text_forward") == {"ok": None, "skipped": "the model did not load"}


def test_a_tokenizer_rebuilt_without_its_merges_disagrees_with_tokenizer_json(
    current: Runtime, remote_build: Path, tmp_path: Path
) -> None:
    """transformers 5 rebuilds a remote tokenizer class with its own __init__ from the bare vocabulary."""
    folder = make_model_with_lossy_tokenizer(remote_build, tmp_path / "model")
    result = run(current, folder, tmp_path / "run", generate=False)
    tokenizer = result.step("tokenizer")
    assert tokenizer["ok"] is True  # it loads and encodes: only the reference shows it is wrong
    assert tokenizer["agrees_with_reference"] is False and tokenizer["roundtrip"] is False
    reference = tokenizer["reference"]["ids"]
    assert len(tokenizer["ids_plain"]) > 2 * len(reference)  # characters instead of merged tokens
    assert tokenizer["decoded"].startswith("D e s c r i b e")


# -------------------------------------------------------------------------------------------------- LLaVA


@pytest.fixture(scope="module")
def llava_plain(
    tmp_path_factory: pytest.TempPathFactory, current: Runtime, native_base_dir: Path
) -> WorkerResult:
    """A LLaVA whose chat template renders no `<image>` (it failed with "Found total 0 <image> tokens")."""
    root = tmp_path_factory.mktemp("worker-llava")
    folder = make_llava_without_image_placeholder(native_base_dir, root / "model")
    return run(current, folder, root / "run", tuned=NATIVE_VISION_PREFIXES)


def test_llava_without_image_placeholder_still_runs_the_image(llava_plain: WorkerResult) -> None:
    assert_every_step_passed(llava_plain)
    image = llava_plain.step("image_forward")
    assert (image["via"], image["placeholder"], image["placeholder_added"]) == ("processor", "<image>", True)
    assert "<image>\nDescribe the image." in image["prompt"]
    assert array(llava_plain, image["logits"]).shape[0] == 1
    for prefix, module in zip(NATIVE_VISION_PREFIXES, ("model.vision_tower", "model.multi_modal_projector")):
        (entry,) = image["liveness"][prefix]["modules"]
        assert (entry["name"], entry["ran"]) == (module, True)
    assert llava_plain.step("generate")["text"].strip()


def test_offload_with_a_small_memory_budget(
    current: Runtime, native_base_dir: Path, llava_plain: WorkerResult, tmp_path: Path
) -> None:
    result = run(
        current,
        native_base_dir,
        tmp_path / "run",
        tuned=NATIVE_VISION_PREFIXES,
        max_memory={"cpu": "150KB"},
        offload_dir=str(tmp_path / "offload"),
        generate=False,
    )
    load = result.step("load")
    assert load["ok"] is True, load
    assert set(load["device_counts"]) == {"cpu", "disk"}, load["device_map"]
    assert "disk" in load["device_map"].values()
    for step in ("text_forward", "image_forward"):
        assert result.step(step)["ok"] is True, result.step(step)
    # The same weights in and out of offload: the same logits, to the bit, on a CPU.
    logits = result.step("text_forward")["logits"]
    assert np.array_equal(
        array(result, logits), array(llava_plain, llava_plain.step("text_forward")["logits"])
    )


# ------------------------------------------------------------------------------------ the worker's promise


def test_the_worker_imports_only_the_standard_library_at_load_time() -> None:
    """It runs where hubsync is not installed, on Python >= 3.9: no hubsync, no third-party import at top."""
    source = Path(R.WORKER).read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert top - {"__future__"} <= set(sys.stdlib_module_names), top - set(sys.stdlib_module_names)


def test_a_request_the_worker_does_not_know_is_refused(tmp_path: Path) -> None:
    (tmp_path / "request.json").write_text(json.dumps({"protocol": 1, "folder": ".", "devise": "cpu"}))
    subprocess.run([sys.executable, str(R.WORKER), "request.json", "result.json"], cwd=tmp_path, check=False)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["error"] == "bad request: ValueError: unknown request keys: devise"


# ------------------------------------------------------------------------------------------ the runtimes


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_verify_python_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(VerifyError) as err:
        R.python_runtime(tmp_path / "nope" / "python")
    assert err.value.one_line() == (
        f"verify.python {tmp_path / 'nope' / 'python'} does not exist: point it at the interpreter of the "
        "environment the model runs in (e.g. /path/to/venv/bin/python)"
    )


def test_verify_python_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="is not an executable file: point it at a python interpreter"):
        R.python_runtime(tmp_path)


def test_verify_python_that_fails_to_start(tmp_path: Path) -> None:
    broken = _script(
        tmp_path / "python", 'echo "libpython3.11.so.1.0: cannot open shared object file" >&2; exit 127'
    )
    with pytest.raises(VerifyError) as err:
        R.python_runtime(broken)
    assert err.value.one_line() == (
        f"verify.python {broken} fails to start (libpython3.11.so.1.0: cannot open shared object file): "
        "repair or recreate that environment"
    )


def test_verify_python_without_torch_or_transformers(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    bare = R.venv_python(tmp_path / "env")
    with pytest.raises(VerifyError) as err:
        R.python_runtime(bare)
    assert err.value.one_line() == (
        f"verify.python {bare} has no torch and no transformers installed: install them into that environment"
    )


def test_a_worker_that_cannot_start_is_a_verify_error(tmp_path: Path) -> None:
    broken = _script(tmp_path / "python", 'echo "Fatal Python error: init_fs_encoding" >&2; exit 1')
    runtime = Runtime("python", broken, {"python": "3.11.7"})
    with pytest.raises(VerifyError) as err:
        run_worker(runtime, request(tmp_path), timeout=30, workdir=tmp_path / "run")
    assert err.value.one_line() == (
        f"the verification worker could not start with verify.python {broken} (python 3.11.7) "
        "(Fatal Python error: init_fs_encoding): check that interpreter"
    )


def test_a_worker_past_its_timeout_is_stopped_with_its_children(tmp_path: Path) -> None:
    hanging = _script(tmp_path / "python", "sleep 600 & echo $! > child.pid; echo $$ > pid; wait")
    start = time.monotonic()
    result = run_worker(Runtime("python", hanging), request(tmp_path), timeout=2, workdir=tmp_path / "run")
    assert time.monotonic() - start < 30
    assert result.timed_out and not result.finished
    assert result.failure is not None and result.failure.startswith("the worker did not finish within")
    assert result.failure.endswith("s and was stopped")
    for name in ("pid", "child.pid"):
        pid = int((tmp_path / "run" / name).read_text())
        assert not _running(pid), f"process {pid} ({name}) survived the timeout"


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed grandchild may wait for a reaper that a container does not run)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUBSYNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(R.INSTALLER_ENV, "pip")
    return tmp_path / "cache"


def test_a_requirement_pip_cannot_install_is_one_line(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing leaves the machine: only the local wheel folders
    wanted = ["hubsync-no-such-package==1.0", "torch==2.13.0"]
    folder = cache_dir / "runtimes" / R.runtime_key(wanted)
    folder.mkdir(parents=True)
    (folder / "half-made").write_text("a creation killed before its marker")
    progress = io.StringIO()
    with pytest.raises(VerifyError) as err:
        R.requirements_runtime(wanted, progress=progress)
    message = err.value.one_line()
    assert message.startswith(
        "could not create the venv for verify.requirements [hubsync-no-such-package==1.0, torch==2.13.0]: "
        "pip install exited with 1 (ERROR: No matching distribution found for hubsync-no-such-package==1.0); "
    )
    assert message.endswith(
        "fix the requirements (the installer's output is above) or set verify.python to an environment that "
        "has them"
    )
    assert not folder.exists(), "the half-made venv must not be kept"
    assert "creating the verification runtime" in progress.getvalue()


def test_an_unknown_installer_is_refused(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(R.INSTALLER_ENV, "conda")
    with pytest.raises(VerifyError, match="HUBSYNC_VENV_INSTALLER='conda' is not an installer hubsync knows"):
        R.requirements_runtime(["torch"])


def test_the_runtime_key_is_the_set_of_requirements() -> None:
    assert R.runtime_key(["torch==2.6.0", "transformers==4.40.0"]) == R.runtime_key(
        [" transformers==4.40.0", "torch==2.6.0", "torch==2.6.0"]
    )
    assert R.runtime_key(["torch==2.6.0"]) != R.runtime_key(["torch==2.7.0"])


# ------------------------------------------------------------------------------- transformers 4.x, for real


@pytest.mark.timeout(1200)
def test_the_look_alike_runs_under_transformers_4(
    legacy_runtime: tuple[Runtime, Path],
    remote_base_dir: Path,
    remote_build: Path,
    remote_runs: dict[str, WorkerResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    legacy, cache = legacy_runtime
    assert legacy.kind == "requirements"
    assert legacy.versions["transformers"] == "4.40.2"
    runs = {
        "base": run(legacy, remote_base_dir, tmp_path / "base", generate=False),
        "build": run(legacy, remote_build, tmp_path / "build"),
        # code that transformers 5 cannot load (see test_code_written_for_transformers_4_does_not_load_here)
        "legacy-only": run(legacy, make_legacy_only_model(remote_build, tmp_path / "legacy"), tmp_path / "l"),
        # the tokenizer transformers 5 rebuilds without merges is read from tokenizer.json as it is by 4.x
        "tokenizer": run(
            legacy,
            make_model_with_lossy_tokenizer(remote_build, tmp_path / "tok"),
            tmp_path / "t",
            generate=False,
        ),
    }
    assert_every_step_passed(runs["base"], skipped=("generate",))
    assert_every_step_passed(runs["build"])
    assert_every_step_passed(runs["legacy-only"])
    assert_every_step_passed(runs["tokenizer"], skipped=("generate",))
    assert runs["tokenizer"].step("tokenizer")["agrees_with_reference"] is True
    assert runs["build"].step("runtime")["transformers"] == "4.40.2"
    assert runs["build"].step("load")["via"] == "auto_map:AutoModelForCausalLM"
    assert runs["build"].step("generate")["text"].strip()
    assert runs["build"].step("tokenizer")["agrees_with_reference"] is True
    for prefix in REMOTE_VISION_PREFIXES:
        assert np.abs(module_output(runs["base"], prefix) - module_output(runs["build"], prefix)).max() > 0
        # The same model in transformers 4 and 5 computes the same thing (bf16 tolerance).
        here, there = module_output(remote_runs["build"], prefix), module_output(runs["build"], prefix)
        assert here.shape == there.shape and np.abs(here - there).max() < 0.05
    # The second request for the same set reuses the venv: no second creation.
    monkeypatch.setenv("HUBSYNC_CACHE_DIR", str(cache))
    progress = io.StringIO()
    again = R.requirements_runtime(list(reversed(LEGACY_REQUIREMENTS)), progress=progress)
    assert again.python == legacy.python and progress.getvalue() == ""
