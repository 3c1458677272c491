"""Never destroy an input, never publish what was not meant, every OS error in one line (issue 11).

Every case that would delete or overwrite a folder runs against a throwaway project folder under tmp_path
(`make_project`): a manifest, the fine-tune inside it, notes and a `.git`, as users keep them. Filesystems that
are read-only, full or mounted are real tmpfs mounts in a private mount namespace (`unshare -m`), skipped
where the test may not mount.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubsync.build import build, prepare
from hubsync.errors import (
    BuildError,
    FinetuneError,
    ManifestError,
    ManifestProblem,
    VerifyError,
)
from hubsync.manifest import load_manifest, parse_manifest
from hubsync.safety import is_mount_point, output_problems
from hubsync.testing.hub import LocalHub
from hubsync.testing.models import PublishedModel
from tests.safety_helpers import (
    hubsync_command,
    last_line,
    make_project,
    needs_private_mounts,
    run_with_mount,
    snapshot,
)

# ------------------------------------------------------------------------------------------------ helpers


def validate_problems(manifest: Path) -> list[ManifestProblem]:
    """`hubsync validate MANIFEST` in this process: the problems it reports."""
    from hubsync.cli import cli

    with pytest.raises(ManifestError) as info:
        cli.main(["validate", str(manifest)], standalone_mode=False)
    return info.value.problems


def output_line(manifest: Path) -> int:
    lines = manifest.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.strip().startswith("dir:"))


def base_snapshot_folder(base: PublishedModel) -> Path:
    from hubsync.resolve import download_base

    return download_base(base.repo_id, base.sha)[1]


# ------------------------------------------------------------------------------------------------ 1. output


def _case(
    name: str, tmp_path: Path, base: PublishedModel, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """(output.dir as written in the manifest, a part of the message that names the rule), with whatever
    the case needs made on disk first."""
    project = tmp_path / "project"
    project.mkdir()
    ft = project / "ft"
    if name == "dot":
        return ".", f"{project} is the manifest's folder"
    if name == "finetune":
        return "ft", f"{ft} is the fine-tune folder (finetune.path)"
    if name == "inside finetune":
        return "ft/build", f"{ft / 'build'} is inside the fine-tune folder (finetune.path) ({ft})"
    if name == "symlink to finetune":
        (project / "ft-link").symlink_to("ft")
        return "ft-link", f"{ft} is the fine-tune folder (finetune.path)"
    if name == "dotdot into finetune":
        return "build/../ft/x", f"{ft / 'x'} is inside the fine-tune folder (finetune.path)"
    if name == "contains the manifest":
        return "..", f"{tmp_path} contains the manifest's folder ({project})"
    if name == "root":
        return "/", "/ is a filesystem root"
    if name == "home":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        return str(tmp_path / "home"), f"{tmp_path / 'home'} is your home folder"
    if name == "contains home":
        monkeypatch.setenv("HOME", str(tmp_path / "users" / "me"))
        (tmp_path / "users" / "me").mkdir(parents=True)
        return str(tmp_path / "users"), f"{tmp_path / 'users'} contains your home folder"
    if name == "hf cache snapshot":
        snap = base_snapshot_folder(base)
        return str(snap), f"{snap} is inside the Hugging Face cache ("
    if name == "unrelated folder":
        (project / "stuff").mkdir()
        (project / "stuff" / "thesis.tex").write_text("years of work\n")
        return "stuff", f"{project / 'stuff'} already exists and was not written by hubsync"
    if name == "failed folder beside":
        (project / "out.failed").mkdir()
        (project / "out.failed" / "mine.txt").write_text("mine\n")
        return "out", f"{project / 'out.failed'} already exists and was not written by hubsync"
    if name == "under a file":
        return (
            "notes.txt/out",
            f"{project / 'notes.txt' / 'out'} is under {project / 'notes.txt'}, which is a file",
        )
    raise AssertionError(name)


OUTPUT_CASES = [
    "dot",
    "finetune",
    "inside finetune",
    "symlink to finetune",
    "dotdot into finetune",
    "contains the manifest",
    "root",
    "home",
    "contains home",
    "hf cache snapshot",
    "unrelated folder",
    "failed folder beside",
    "under a file",
]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_unsafe_output_is_refused_by_validate_and_build_before_anything_is_touched(
    case: str,
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output, rule = _case(case, tmp_path, published_remote_base, monkeypatch)
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output=output)
    cache = base_snapshot_folder(published_remote_base)
    before, cache_before = snapshot(tmp_path), snapshot(cache)

    found = validate_problems(manifest)
    assert all((p.key, p.line) == ("output.dir", output_line(manifest)) for p in found), found
    assert any(rule in p.message for p in found), [p.message for p in found]

    hub.clear_log()
    with pytest.raises(BuildError) as refused:
        build(manifest, record_last_build=False)
    assert refused.value.message.startswith(f"output.dir {found[0].message}")
    assert hub.requests() == [], "the build must refuse before anything is downloaded"
    assert snapshot(tmp_path) == before and snapshot(cache) == cache_before


def test_output_dot_from_the_command_line_is_one_line_and_deletes_nothing(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output=".")
    before = snapshot(tmp_path)
    project = manifest.parent
    validate = subprocess.run(
        hubsync_command("validate", "manifest.yaml"), capture_output=True, text=True, cwd=project, timeout=120
    )
    assert validate.returncode == 2 and validate.stdout == ""
    assert validate.stderr.splitlines() == [
        (
            f"manifest.yaml:{output_line(manifest)}: output.dir: {project} is the manifest's folder: hubsync "
            "replaces the folder it writes as a whole and would destroy it; choose a folder of its own, e.g. "
            "build/<name> next to the manifest"
        ),
        (
            f"manifest.yaml:{output_line(manifest)}: output.dir: {project} contains the fine-tune folder "
            f"(finetune.path) ({project / 'ft'}): hubsync replaces the folder it writes as a whole and would delete "
            "it; choose a folder that holds none of the build's inputs"
        ),
        (
            f"manifest.yaml:{output_line(manifest)}: output.dir: {project} already exists and was not written by "
            "hubsync (no hubsync.json it recognises, not empty): a build replaces it as a whole; move its files "
            "away, or choose another output.dir"
        ),
    ]
    built = subprocess.run(
        hubsync_command("build", "manifest.yaml"), capture_output=True, text=True, cwd=project, timeout=300
    )
    assert built.returncode == 1 and "Traceback" not in built.stderr
    assert built.stderr.strip().splitlines() == [
        (
            f"error: output.dir {project} is the manifest's folder: hubsync replaces the folder it writes as a whole "
            "and would destroy it; choose a folder of its own, e.g. build/<name> next to the manifest "
            "(and 2 more: run `hubsync validate` to see all)"
        )
    ]
    assert snapshot(tmp_path) == before


def test_the_normal_places_stay_allowed(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """A build folder inside the project, an empty folder, and a folder hubsync built are all fine."""
    for output in ("build/x", "empty", "out"):
        manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output=output)
        (manifest.parent / "empty").mkdir(exist_ok=True)
        assert output_problems(load_manifest(manifest), manifest) == [], output
    build(manifest, record_last_build=False)  # "out": now a build folder, which a rebuild may replace
    assert output_problems(load_manifest(manifest), manifest) == []


def test_mount_point_detection() -> None:
    if not Path("/proc/self/mountinfo").is_file():
        pytest.skip("no /proc/self/mountinfo (not Linux)")
    assert is_mount_point(Path("/proc")) and is_mount_point(Path("/"))
    assert not is_mount_point(Path(__file__).parent)


@needs_private_mounts
def test_a_mount_point_as_output_is_refused_up_front(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """A real tmpfs mounted on output.dir (a Docker volume, say), and a bind mount of a folder onto itself
    (same filesystem: only the mount table shows it)."""
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="volume")
    volume = manifest.parent / "volume"
    volume.mkdir()
    before = snapshot(tmp_path)
    built = run_with_mount(
        f"mount -t tmpfs -o size=4m tmpfs {volume}",
        hubsync_command("build", "--no-verify", "manifest.yaml"),
        cwd=manifest.parent,
    )
    assert built.returncode == 1 and "Traceback" not in built.stderr
    assert built.stderr.strip().splitlines() == [
        (
            f"error: output.dir {volume} is a mount point: hubsync swaps a finished folder in with one rename, "
            f"which cannot replace a mount point; use a folder inside it, e.g. {volume / 'model'}"
        )
    ]
    bound = run_with_mount(
        f"mount --bind {volume} {volume}", hubsync_command("validate", "manifest.yaml"), cwd=manifest.parent
    )
    assert bound.returncode == 2 and f"output.dir: {volume} is a mount point" in bound.stderr
    assert snapshot(tmp_path) == before


@needs_private_mounts
def test_a_mount_point_refuses_the_swap_in_one_line(tmp_path: Path) -> None:
    """Behind the up-front refusal: the rename itself onto a mount point (EBUSY) is one line too."""
    target, staging = tmp_path / "volume", tmp_path / ".volume.hubsync-staging-1"
    target.mkdir()
    staging.mkdir()
    code = (
        "import sys; from pathlib import Path; from hubsync.write import swap_into_place; "
        "from hubsync.errors import HubsyncError\n"
        f"try:\n    swap_into_place(Path({str(staging)!r}), Path({str(target)!r}))\n"
        "except HubsyncError as err:\n    print(err.one_line())\n"
    )
    result = run_with_mount(
        f"mount -t tmpfs -o size=64k tmpfs {target}", [sys.executable, "-c", code], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"cannot move {target} to {tmp_path / '.volume.hubsync-old'}: the path is busy (a mount point or in use): "
        "choose another path"
    )


def test_verify_never_records_into_a_cache_or_a_foreign_place(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """`hubsync verify DIR` writes its record into DIR: a build that sits in a Hugging Face cache layout
    (`cache_dir=` downloads) is refused before any check runs."""
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="out")
    out = build(manifest, record_last_build=False).output
    snap = tmp_path / "cache" / "models--my-org--ft" / "snapshots" / ("0" * 40)
    shutil.copytree(out, snap)
    (snap.parent.parent / "blobs").mkdir()
    before = snapshot(tmp_path / "cache")
    with pytest.raises(VerifyError) as refused:
        from hubsync.verify import verify

        verify(snap, trust_remote_code=True)
    assert refused.value.message.startswith(
        f"the verified folder {snap} is inside a Hugging Face cache ({tmp_path / 'cache'}): writing there would "
        "change what every later load of that model returns"
    )
    assert snapshot(tmp_path / "cache") == before


def test_verify_keeps_everything_the_folder_holds(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """The verification is recorded through a relinked copy of the folder swapped in at once: hidden folders,
    empty folders and symlinks survive it (0.1.0 kept only the files it hashed)."""
    from hubsync.verify import verify

    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="out")
    out = build(manifest, record_last_build=False).output
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "empty").mkdir()
    (out / ".hub-link").symlink_to("config.json")
    report = verify(out, run_models=False)
    assert report.check("files match hubsync.json") is not None  # it ran, and recorded what it found:
    assert json.loads((out / "hubsync.json").read_text())["verification"]["passed"] is report.passed
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (out / "empty").is_dir() and os.readlink(out / ".hub-link") == "config.json"
    assert not list(out.parent.glob(".out.hubsync-staging-*"))


# ------------------------------------------------------------------------------------------------ 2. inputs


def _finetune_copy(tmp_path: Path, remote_trainer_output: Path) -> Path:
    ft = tmp_path / "ft"
    shutil.copytree(remote_trainer_output, ft)
    return ft


def _manifest_for(tmp_path: Path, base: PublishedModel, ft: Path, **finetune: Any) -> Path:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "base": {"repo": base.repo_id, "revision": base.sha},
                "finetune": {"path": str(ft), "tuned": ["vpm.", "resampler."], **finetune},
                "output": {"dir": "out"},
            }
        )
    )
    return manifest


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "extra.txt"])
def test_a_finetune_file_linked_from_outside_is_refused(
    name: str, tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    ft = _finetune_copy(tmp_path, remote_trainer_output)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if (ft / name).exists():
        shutil.move(ft / name, outside)
    else:
        outside.write_text("a private file of the user's\n")
    (ft / name).symlink_to(outside)
    keep = {"keep_files": [name]} if name == "extra.txt" else {}
    manifest = _manifest_for(tmp_path, published_remote_base, ft, **keep)
    with pytest.raises(FinetuneError) as refused:
        prepare(manifest)
    assert refused.value.message == (
        f"{ft / name} is a link to {outside}, outside the fine-tune folder {ft}: hubsync reads inputs only "
        "inside their folder; copy the file in, or point the manifest at the folder that holds it"
    )
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_folder_linked_from_outside_is_refused(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    elsewhere = _finetune_copy(tmp_path, remote_trainer_output)
    (runs / "checkpoint-5").symlink_to(elsewhere)
    with pytest.raises(FinetuneError) as refused:
        prepare(_manifest_for(tmp_path, published_remote_base, runs))
    assert refused.value.message.startswith(
        f"{runs / 'checkpoint-5'} leads out of the fine-tune folder {runs} (to {elsewhere}): hubsync reads "
        "inputs only inside their folder"
    )


def test_links_that_stay_inside_the_finetune_are_fine(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    ft = _finetune_copy(tmp_path, remote_trainer_output)
    (ft / "store").mkdir()
    shutil.move(ft / "model.safetensors", ft / "store" / "model.safetensors")
    (ft / "model.safetensors").symlink_to(Path("store") / "model.safetensors")
    assert prepare(_manifest_for(tmp_path, published_remote_base, ft)).plan.problems == ()


BOMB_LEVELS = "abcdefghi"


def alias_bomb() -> str:
    """The classic "billion laughs", in YAML: nine levels of ten aliases each, about 700 bytes."""
    lines = ["x-a: &a [" + ", ".join(['"laughing out loud"'] * 10) + "]"]
    for prev, name in itertools.pairwise(BOMB_LEVELS):
        lines.append(f"x-{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    lines += ["base: {repo: a/b@main}", "finetune: {path: ft, tuned: *i}", "output: {dir: out}"]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_fails_fast_in_one_line_with_bounded_memory(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(alias_bomb())
    assert 600 < manifest.stat().st_size < 800

    def limit_memory() -> (
        None
    ):  # 0.1.0 went past 5 GB; hubsync itself needs a few hundred MB of address space
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run(
        hubsync_command("validate", str(manifest)),
        capture_output=True,
        text=True,
        preexec_fn=limit_memory,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        (
            f"{manifest}:4: uses aliases (*name) that expand to more than 10,000 values: write the values out "
            "instead of repeating anchors"
        )
    ]


def test_recursive_aliases_deep_nesting_and_huge_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as recursive:
        parse_manifest("base: &x {repo: a/b@main, again: *x}\nfinetune: {path: f}\noutput: {dir: o}\n")
    assert recursive.value.problems[0].message == (
        "uses an alias inside its own anchor (a recursive alias): write the values out"
    )
    with pytest.raises(ManifestError) as deep:
        parse_manifest("x: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert deep.value.problems[0].message == "nests too deeply to be a manifest: flatten it"
    huge = tmp_path / "huge.yaml"
    huge.write_text(
        "base: {repo: a/b@main}\nfinetune: {path: f}\noutput: {dir: o}\n# " + "x" * 300_000 + "\n"
    )
    with pytest.raises(ManifestError) as large:
        load_manifest(huge)
    assert large.value.problems[0].render() == (
        f"{huge}: is {huge.stat().st_size:,} bytes, more than a manifest can be (256 KiB): check that this is "
        "the manifest file"
    )


def test_a_few_aliases_still_work_and_keep_their_lines() -> None:
    text = (
        "x-parts: &parts [vpm., resampler.]\n"
        "base: {repo: a/b@main}\n"
        "finetune: {path: f, tuned: *parts}\n"
        "output: {dir: o, dtype: fp8}\n"
    )
    with pytest.raises(ManifestError) as err:  # x-parts is unknown; the error keeps its line
        parse_manifest(text)
    assert [(p.line, p.key) for p in err.value.problems] == [(1, "x-parts"), (4, "output.dtype")]
    manifest = parse_manifest(
        "card: {tags: &parts [vpm., resampler.]}\n"
        "base: {repo: a/b@main}\n"
        "finetune: {path: f, tuned: *parts}\n"
        "output: {dir: o}\n"
    )
    assert manifest.finetune.tuned == ("vpm.", "resampler.") == manifest.card.tags


# ------------------------------------------------------------------------------------------------ 3. publish


def local_paths_in(folder: Path, tmp_path: Path) -> list[tuple[str, str]]:
    """(file, local path) for every file of `folder`, read as bytes, that names a local path of this test run:
    pytest's temporary folders (every fixture lives there), the Hugging Face cache, the checkout, the home."""
    places = (tmp_path.parent, Path(os.environ["HF_HOME"]).parent, Path(__file__).parent.parent, Path.home())
    roots = {str(p) for p in places if len(str(p)) > 1}
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [(path.name, r) for r in roots if r.encode() in data]
    return found


def test_a_base_with_several_weight_formats_publishes_only_the_rewritten_safetensors(
    tmp_path: Path, remote_base_dir: Path, remote_trainer_output: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from hubsync.plan import render
    from hubsync.record import load

    base = tmp_path / "base"
    shutil.copytree(remote_base_dir, base)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(base.glob("model-*.safetensors")):
        state.update(load_file(str(shard)))
    torch.save(state, base / "pytorch_model.bin")
    save_file(state, str(base / "consolidated.safetensors"))
    (base / "original").mkdir()
    torch.save(state, base / "original" / "consolidated.00.pth")
    (base / "original" / "params.json").write_text('{"dim": 64}\n')
    # Formats hubsync never opens, only recognises by name: placeholders stand in for real exports.
    for name in ("tf_model.h5", "flax_model.msgpack", "model-q4.gguf", "onnx/model.onnx"):
        (base / name).parent.mkdir(exist_ok=True)
        (base / name).write_bytes(b"stale weights of the base\n")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "base": {"path": "base"},
                "finetune": {"path": str(remote_trainer_output), "tuned": ["vpm.", "resampler."]},
                "output": {"dir": "out"},
                "verify": {"device": "cpu", "trust_remote_code": True},
            }
        )
    )
    stale = {
        "consolidated.safetensors": "original consolidated checkpoint",
        "flax_model.msgpack": "Flax",
        "model-q4.gguf": "GGUF/GGML",
        "onnx/model.onnx": "ONNX",
        "original/consolidated.00.pth": "original checkpoint format",
        "original/params.json": "original checkpoint format",
        "pytorch_model.bin": "PyTorch pickle",
        "tf_model.h5": "TensorFlow",
    }
    plan = prepare(manifest).plan
    assert {path: why for path, why in plan.dropped_base} == {
        path: f"another copy of the base's weights ({kind}): only the safetensors shards the build rewrote are "
        "published, so this copy would hold untuned weights"
        for path, kind in stale.items()
    }
    assert "base files left out\n  consolidated.safetensors: another copy" in render(plan)
    result = build(manifest, verify=True, record_last_build=False)
    report = result.report
    assert report is not None
    assert report.passed, [c.detail for c in report.failures]
    published = {p.relative_to(result.output).as_posix() for p in result.output.rglob("*") if p.is_file()}
    assert not published & set(stale), published & set(stale)
    assert not set(load(result.output).files) & set(stale)
    assert local_paths_in(result.output, tmp_path) == []


# ------------------------------------------------------------------------------------------------ 5. OS errors


def test_a_lock_that_cannot_be_created_says_why_not_that_a_build_is_running() -> None:
    """/sys refuses new files with EACCES, for root too: a real permission error on the lock file."""
    from hubsync.write import OutputLock

    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys (not Linux)")
    with pytest.raises(BuildError) as refused, OutputLock(Path("/sys/kernel/hubsync-test-output")):
        pass
    assert refused.value.message == (
        "cannot create the lock file /sys/kernel/.hubsync-test-output.hubsync.lock: permission denied: "
        "make the folder writable or choose another path"
    )


def test_folders_that_cannot_be_made_name_the_path_and_the_cause(tmp_path: Path) -> None:
    from hubsync import fsio

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BuildError) as not_a_folder:
        fsio.make_dir(tmp_path / "a-file" / "out", parents=True)
    assert not_a_folder.value.message == (
        f"cannot create {tmp_path / 'a-file' / 'out'}: a part of the path is a file, not a folder: "
        "choose another path"
    )
    if Path("/sys/kernel").is_dir():
        with pytest.raises(BuildError) as not_permitted:
            fsio.make_dir(Path("/sys/kernel/hubsync-test/out"), parents=True)
        assert not_permitted.value.message == (
            "cannot create /sys/kernel/hubsync-test: the operation is not permitted: make the folder writable "
            "or choose another path"
        )


def test_something_in_the_way_of_the_staging_folder_is_one_line(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="out")
    blocker = manifest.parent / f".out.hubsync-staging-{os.getpid()}"
    blocker.write_text("not a folder")
    with pytest.raises(BuildError) as refused:
        build(manifest, record_last_build=False)
    assert refused.value.message == (
        f"cannot create {blocker}: something is already there: remove it or choose another path"
    )
    assert not (manifest.parent / "out").exists()


@needs_private_mounts
@pytest.mark.parametrize(
    ("mount", "expected"),
    [
        (
            "mount -t tmpfs -o size=64k,ro tmpfs {parent}",
            (
                "error: cannot create the lock file {parent}/.out.hubsync.lock: the filesystem is read-only: "
                "choose a path on a writable filesystem"
            ),
        ),
        (
            "mount -t tmpfs -o size=100k tmpfs {parent}",
            "error: no space left on device writing {parent}/.out.hubsync-staging-",
        ),
    ],
    ids=["read-only", "full"],
)
def test_a_read_only_or_full_output_filesystem_is_one_line(
    mount: str,
    expected: str,
    tmp_path: Path,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> None:
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="disk/out")
    parent = manifest.parent / "disk"
    parent.mkdir()
    result = run_with_mount(
        mount.format(parent=parent), hubsync_command("-q", "build", "manifest.yaml"), cwd=manifest.parent
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result.stderr).startswith(expected.format(parent=parent)), result.stderr


@needs_private_mounts
@pytest.mark.parametrize(
    ("options", "cause"),
    [
        ("size=64k", "no space left on the device: free some space"),
        ("size=64k,ro", "the filesystem is read-only: choose a path on a writable filesystem"),
    ],
    ids=["full", "read-only"],
)
def test_a_full_or_read_only_hf_cache_is_not_a_network_error(
    options: str,
    cause: str,
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> None:
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="out")
    cache = tmp_path / "hf"
    cache.mkdir()
    result = run_with_mount(
        f"mount -t tmpfs -o {options} tmpfs {cache}",
        hubsync_command("plan", "manifest.yaml"),
        cwd=manifest.parent,
        env=hub.client_env(cache),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Cannot reach the Hub" not in result.stderr
    assert last_line(result.stderr) == (
        f"error: cannot write {cache / 'hub'}: {cause} (downloading "
        f"{published_remote_base.repo_id}@{published_remote_base.sha} into the Hugging Face cache; HF_HUB_CACHE or "
        "HF_HOME can move the cache)"
    )
