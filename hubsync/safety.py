"""Where a build may write, and what it may read: the rules that keep hubsync from destroying an input.

A build replaces its `output.dir` as a whole (a staging folder is swapped in), and writes beside it (the
staging folder, `OUTPUT.failed`, a lock file, a local sidecar). So before anything is downloaded or written,
the output is compared with everything the build reads or that must survive it, all paths resolved (symlinks
and `..`) first:

- it may not be, contain, or sit inside an input: the fine-tune folder, a local `base.path`, `verify.image`,
  or the Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_ASSETS_CACHE, HF_XET_CACHE as huggingface_hub resolves
  them, and any folder laid out as a cache: `models--*/snapshots/...`);
- it may not be or contain the manifest's folder, the home folder, or a filesystem root (a folder *inside* the
  project, such as `build/x` next to the manifest, is the normal case);
- an existing output (and `OUTPUT.failed`) is replaced only when hubsync wrote it (a hubsync.json it
  recognises) or it is empty; a mount point is refused, because a folder cannot be renamed onto it.

`hubsync validate` reports these at output.dir's line, `plan` and `build` refuse with one line, and
`hubsync verify` applies the same rules before it records into a folder. Inputs are read, never followed out of
their folder: a file of the fine-tune that is a symlink to somewhere outside the fine-tune folder is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hubsync.errors import BuildError, FinetuneError, HubsyncError, ManifestError, ManifestProblem
from hubsync.manifest import Manifest, line_of

_CACHE_REPO_DIR = re.compile(r"^(models|datasets|spaces)--.+")


@dataclass(frozen=True)
class Guarded:
    """A path the output must keep clear of. `inside_ok`: the output may sit inside it (a project folder),
    but may still not be it or contain it."""

    path: Path  # resolved
    name: str  # how the message names it, e.g. "the fine-tune folder (finetune.path)"
    inside_ok: bool = False
    cache: bool = False  # a Hugging Face cache folder


def resolved(path: Path) -> Path:
    """`path` with `~`, symlinks and `..` resolved (also for parts that do not exist yet)."""
    return Path(os.path.abspath(path.expanduser())).resolve()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


# ------------------------------------------------------------------------------------------------ guarded


def hf_cache_folders() -> list[Guarded]:
    """The Hugging Face folders, resolved exactly as huggingface_hub resolved them at import."""
    from huggingface_hub import constants

    found = []
    for variable in ("HF_HOME", "HF_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE"):
        value = getattr(constants, variable, None)
        if value:
            found.append(Guarded(resolved(Path(value)), f"the Hugging Face cache ({variable})", cache=True))
    return found


def cache_layout_root(path: Path) -> Path | None:
    """The cache folder that holds `path`, recognised by its layout (`models--owner--name/` with `snapshots/`
    or `blobs/`), for caches named by `cache_dir=` rather than by the environment."""
    for folder in (path, *path.parents):
        if _CACHE_REPO_DIR.match(folder.name) and any(
            (folder / sub).is_dir() for sub in ("snapshots", "blobs")
        ):
            return folder.parent
    return None


def guarded_paths(manifest: Manifest, manifest_path: Path) -> list[Guarded]:
    """Everything a build of `manifest` reads or must leave standing."""
    guarded = [Guarded(resolved(manifest.finetune.path), "the fine-tune folder (finetune.path)")]
    if manifest.base.path is not None:
        guarded.append(Guarded(resolved(manifest.base.path), "the local base folder (base.path)"))
    if manifest.verify.image is not None:
        guarded.append(Guarded(resolved(manifest.verify.image), "the smoke-test image (verify.image)"))
    guarded += hf_cache_folders()
    guarded.append(Guarded(resolved(manifest_path).parent, "the manifest's folder", inside_ok=True))
    return guarded + _places()


def _places() -> list[Guarded]:
    """Folders no tool may ever replace, whatever the manifest says."""
    return [Guarded(resolved(Path.home()), "your home folder", inside_ok=True)]


# ------------------------------------------------------------------------------------------------ rules


def overlap_problem(target: Path, guarded: Guarded) -> str | None:
    """Why `target` (resolved) may not be written as a whole, given one guarded path; None when it may."""
    where = guarded.path
    if target == where:
        return (
            f"{target} is {guarded.name}: hubsync replaces the folder it writes as a whole and would destroy "
            "it; choose a folder of its own, e.g. build/<name> next to the manifest"
        )
    if where.is_relative_to(target):
        return (
            f"{target} contains {guarded.name} ({where}): hubsync replaces the folder it writes as a whole and "
            "would delete it; choose a folder that holds none of the build's inputs"
        )
    if target.is_relative_to(where) and not guarded.inside_ok:
        return (
            f"{target} is inside {guarded.name} ({where}): hubsync never writes into its inputs; "
            "choose a folder outside it"
        )
    return None


def location_problems(target: Path, guarded: Sequence[Guarded]) -> list[str]:
    """The rules that depend only on where `target` is (not on what is there now)."""
    target = resolved(target)
    if target.parent == target:
        return [f"{target} is a filesystem root: choose a folder of its own, e.g. build/<name>"]
    exact = [g for g in guarded if g.path == target]  # "is the fine-tune folder" says more than "contains"
    ordered = exact + [g for g in guarded if g not in exact]
    problems: list[str] = []
    cache_found = False
    for g in ordered:
        problem = overlap_problem(target, g)
        if problem is not None and not (g.cache and cache_found):  # HF_HOME holds the others: say it once
            problems.append(problem)
            cache_found = cache_found or g.cache
    cache = cache_layout_root(target)
    if cache is not None and not any(_within(target, g.path) for g in guarded if g.cache):
        problems.append(
            f"{target} is inside a Hugging Face cache ({cache}): writing there would change what every later "
            "load of that model returns; choose a folder outside the cache"
        )
    file_above = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if file_above is not None:
        problems.append(f"{target} is under {file_above}, which is a file, not a folder: choose another path")
    return problems


def replace_problem(folder: Path) -> str | None:
    """Why the existing `folder` may not be replaced as a whole; None when it may (absent, empty, or a build
    folder hubsync recognises), never following a symlink."""
    from hubsync.record import is_build_folder

    if not os.path.lexists(folder):
        return None
    if folder.is_symlink():
        return f"{folder} is a symbolic link: hubsync replaces folders, never links; name the real folder"
    if not folder.is_dir():
        return f"{folder} exists and is not a folder: remove it or choose another path"
    if is_mount_point(folder):
        return (
            f"{folder} is a mount point: hubsync swaps a finished folder in with one rename, which cannot "
            f"replace a mount point; use a folder inside it, e.g. {folder / 'model'}"
        )
    if is_build_folder(folder) or not any(folder.iterdir()):
        return None
    return (
        f"{folder} already exists and was not written by hubsync (no hubsync.json it recognises, not empty): "
        "a build replaces it as a whole; move its files away, or choose another output.dir"
    )


def output_problems(manifest: Manifest, manifest_path: Path) -> list[str]:
    """Every reason why a build of `manifest` may not write its output.dir (each message starts with a path)."""
    output = resolved(manifest.output.dir)
    problems = location_problems(output, guarded_paths(manifest, manifest_path))
    if output.parent == output:  # a root: nothing more to say, and it has no name to put `.failed` after
        return problems
    for folder in (output, failed_folder(output)):
        problem = replace_problem(folder)
        if problem is not None:
            problems.append(problem)
    return problems


def failed_folder(output: Path) -> Path:
    """Where a build that failed verification is kept for inspection."""
    return output.with_name(f"{output.name}.failed")


def check_output(manifest: Manifest, manifest_path: Path) -> None:
    """The output-safety rule as one line (BuildError), before anything is downloaded or written."""
    found = [f"output.dir {p}" for p in output_problems(manifest, manifest_path)]
    _raise_first(found, BuildError, more=" (and {n} more: run `hubsync validate` to see all)")


def check_manifest_output(manifest: Manifest, manifest_path: Path) -> None:
    """The output-safety rule as manifest problems at output.dir's line (`hubsync validate`)."""
    found = output_problems(manifest, manifest_path)
    if found:
        line = line_of(manifest_path, ("output", "dir"))
        file = str(manifest_path)
        raise ManifestError([ManifestProblem(file, line, "output.dir", p) for p in found], file)


def check_replace(folder: Path, *, what: str, error: type[HubsyncError] = BuildError) -> None:
    """What every writer checks right before it replaces `folder` as a whole (a build's swap, `OUTPUT.failed`,
    the verify record): it is not a protected place, and it is not someone else's folder."""
    guarded = [*hf_cache_folders(), *_places()]
    problems = location_problems(folder, guarded)
    problem = None if problems else replace_problem(folder)
    _raise_first([f"{what} {p}" for p in [*problems, *([problem] if problem else [])]], error)


def _raise_first(found: list[str], error: type[HubsyncError], *, more: str = "") -> None:
    if found:
        raise error(found[0] + (more.format(n=len(found) - 1) if len(found) > 1 else ""))


# ------------------------------------------------------------------------------------------------ mounts


def _unescape_mount(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> set[str]:
    """Every mount point of this process (Linux), bind mounts of a folder of the same filesystem included."""
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {_unescape_mount(line.split()[4]) for line in text.splitlines() if len(line.split()) > 4}


def is_mount_point(path: Path) -> bool:
    """True when `path` is where a filesystem is mounted (renaming onto it fails with EBUSY or EXDEV)."""
    return os.path.ismount(path) or str(resolved(path)) in mount_points()


# ------------------------------------------------------------------------------------------------ inputs


def links_out(root: Path, folder: Path, files: Iterable[str]) -> Iterator[tuple[str, Path]]:
    """(file, where it leads) for every file of `folder` that resolves to somewhere outside `root`."""
    root = resolved(root)
    for rel in files:
        target = (folder / rel).resolve()
        if not _within(target, root):
            yield rel, target


def check_inputs_stay_inside(root: Path, folder: Path, files: Iterable[str], *, what: str) -> None:
    """Refuse a fine-tune whose weights folder or files lead out of it (a symlink to another folder)."""
    if not _within(folder.resolve(), resolved(root)):
        raise FinetuneError(
            f"{folder} leads out of {what} {resolved(root)} (to {folder.resolve()}): hubsync reads inputs only "
            "inside their folder; point the manifest at the real folder"
        )
    for rel, target in links_out(root, folder, files):
        raise FinetuneError(
            f"{folder / rel} is a link to {target}, outside {what} {resolved(root)}: hubsync reads inputs only "
            "inside their folder; copy the file in, or point the manifest at the folder that holds it"
        )
