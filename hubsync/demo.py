"""`hubsync demo`: the whole story, offline, in seconds, on an embedded local Hub with a tiny model.

Publish a tiny MiniCPM-V look-alike (remote code) as the base, make the broken output a vision-only
fine-tune leaves behind, show the error its users meet, then build, verify, push, show the card, and load a
fresh download. No network and no account: the Hub is `hubsync.testing.hub.LocalHub` on loopback.

It ends with the exact commands to go on from there (a bare `hubsync push` works: the build is recorded in the
demo's folder), and with `--serve` it keeps its Hub running for them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click

from hubsync.errors import HubsyncError

if TYPE_CHECKING:
    from hubsync.testing.hub import LocalHub

MARKER = ".hubsync-demo"
BASE_REPO = "my-org/tiny-minicpmv"
TARGET_REPO = "my-org/tiny-minicpmv-vision-ft"
# How MiniCPM-V's users report the error (MiniCPM-V #601, #372): the words transformers 4.x prints.
USERS_ERROR = "AttributeError: 'MiniCPMVTokenizerFast' object has no attribute 'tokenizer'"
# The start of transformers' warning after it fetched a model's code from a repo (dynamic_module_utils).
_FETCHED_CODE = "A new version of the following files was downloaded from"


@dataclass(frozen=True)
class Story:
    """What the demo made, for the next steps it prints."""

    manifest: Path
    output: Path
    base_sha: str
    commit: str


def _step(n: int, text: str) -> None:
    click.secho(f"\n[{n}] {text}", bold=True)


def _prepare_workdir(workdir: Path) -> Path:
    workdir = workdir.resolve()
    if workdir.exists():
        if not (workdir / MARKER).is_file():
            raise HubsyncError(f"{workdir} exists and is not a hubsync demo folder: pass another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `hubsync demo`; safe to delete\n")
    return workdir


def run_demo(
    workdir: Path, *, serve: bool = False, on_ready: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """The demo; `on_ready` gets its data (what `--json` prints) once the next steps are printed, and with
    `serve` the local Hub keeps running until Ctrl-C or SIGTERM."""
    started = time.perf_counter()
    workdir = _prepare_workdir(workdir)
    from hubsync.testing.hub import LocalHub

    # LFS-only files, as the Hub serves repos uploaded before the Xet migration: the push uploads the base's
    # shards instead of copying them server-side, and says so
    hub = LocalHub(workdir / "hub").start()
    try:
        # huggingface_hub reads these once, at import: set them before anything imports it.
        os.environ.update(hub.client_env(workdir / "hf-home"))
        story = _run(workdir, hub.endpoint)
        click.secho(
            f"\ndone in {time.perf_counter() - started:.1f}s; everything is under {workdir}", fg="green"
        )
        commands = next_steps(workdir, hub, serving=serve)
        if on_ready is not None:
            on_ready(_data(workdir, hub, story, commands, serving=serve))
        if serve:
            _serve_until_stopped(hub)
    finally:
        hub.stop()


def _run(workdir: Path, endpoint: str) -> Story:
    from hubsync.testing.models import make_remote_code_vlm, make_trainer_output, publish_model

    _step(1, f"A local Hub at {endpoint}; publishing the tiny remote-code base {BASE_REPO}")
    base_dir = make_remote_code_vlm(workdir / "base-src")
    base = publish_model(base_dir, BASE_REPO, endpoint=endpoint)
    click.echo(f"    {BASE_REPO}@{base.sha[:12]}: {', '.join(sorted(p.name for p in base_dir.iterdir()))}")

    _step(2, "A vision-only fine-tune, saved the way trainers save it")
    finetune = make_trainer_output(base_dir, workdir / "output" / "checkpoint-3", base_repo_id=BASE_REPO)
    click.echo(f"    {finetune}: {', '.join(sorted(p.name for p in finetune.iterdir()))}")
    click.echo(
        "    fp32 weights, no processor config, no .py files, auto_map -> "
        f"'{BASE_REPO}--modeling_minicpmv.MiniCPMV' (whatever code the base repo has today)"
    )

    _step(3, "Loading it as people do, and calling chat()")
    _show_seed_error(finetune)

    _step(4, "hubsync build manifest.yaml (plan, write, then verify)")
    manifest = _write_manifest(workdir, base.sha)
    output = _build(manifest, workdir)

    _step(5, f"hubsync push -> {TARGET_REPO}")
    commit = _push(manifest)

    _step(6, "The model card (front matter)")
    card = (output / "README.md").read_text()
    click.echo("    " + card.split("\n---", 1)[0].replace("\n", "\n    "))

    _step(7, "A fresh download of the published repo loads and chats")
    _chat_with_fresh_download(workdir, commit)
    return Story(manifest, output, base.sha, commit)


def _write_manifest(workdir: Path, base_sha: str) -> Path:
    manifest = workdir / "manifest.yaml"
    manifest.write_text(
        f"base:\n  repo: {BASE_REPO}\n  revision: {base_sha}\n"
        'finetune:\n  path: output/checkpoint-3\n  tuned: ["vpm.", "resampler."]\n'
        "output:\n  dir: build/tiny-minicpmv-vision-ft\n"
        "verify:\n  device: auto\n  trust_remote_code: true\n"
        f"push:\n  repo: {TARGET_REPO}\n  private: true\n"
        'card:\n  description: "A vision fine-tune of a tiny MiniCPM-V look-alike, made by `hubsync demo`."\n'
        "  tags: [vision]\n"
    )
    click.echo("    " + manifest.read_text().replace("\n", "\n    ").rstrip())
    return manifest


def _build(manifest: Path, workdir: Path) -> Path:
    from hubsync.build import build
    from hubsync.plan import render
    from hubsync.record import remember_last_build
    from hubsync.verify import render_report

    result = build(manifest, verify=True, record_last_build=False)
    click.echo("    " + render(result.plan).replace("\n", "\n    "))
    report = result.report
    assert report is not None
    click.echo("    " + render_report(report).replace("\n", "\n    "))
    if not report.passed:
        raise HubsyncError("the demo build failed verification: this is a bug in hubsync, please report it")
    # recorded in the demo's folder, where the next steps run: a bare `hubsync push` there finds this build
    warning = remember_last_build(manifest, result.output, cwd=workdir)
    if warning:
        click.echo(f"    {warning}")
    return result.output


def _push(manifest: Path) -> str:
    from hubsync.push import push

    pushed = push(manifest)
    click.echo(f"    commit {pushed.commit_url}")
    click.echo(
        f"    {len(pushed.uploaded)} file(s) uploaded ({pushed.bytes_uploaded:,} bytes); "
        f"{len(pushed.copied)} shard(s) copied server-side from the base ({pushed.bytes_copied:,} bytes) "
        f"of {pushed.bytes_in_build:,} bytes"
    )
    for note in pushed.notes:
        click.echo(f"    note: {note}")
    again = push(manifest)
    click.echo(
        f"    pushing again: {'already up to date' if again.up_to_date else 'pushed again (unexpected)'}"
    )
    return str(pushed.commit_sha)


def _chat_with_fresh_download(workdir: Path, commit: str) -> None:
    from huggingface_hub import snapshot_download
    from transformers import AutoModel, AutoTokenizer

    from hubsync.testing.models import make_test_image

    fresh = Path(snapshot_download(TARGET_REPO, revision=commit, cache_dir=workdir / "fresh-cache"))
    model = AutoModel.from_pretrained(str(fresh), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(fresh), trust_remote_code=True)
    answer = model.chat(
        image=make_test_image(),
        msgs=[{"role": "user", "content": "Describe the image."}],
        tokenizer=tokenizer,
    )
    click.echo(f"    chat() answered {answer!r} (a tiny random model: the point is that it runs)")


# ------------------------------------------------------------------------------------------- the seed error


@contextmanager
def _code_fetches() -> Iterator[list[str]]:
    """The files transformers fetched from a repo's code while inside, with its warning about them held back:
    it names https://huggingface.co even when the Hub is this demo's, on 127.0.0.1; the demo explains it."""
    fetched: list[str] = []

    def hold(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_FETCHED_CODE):
            return True
        fetched.extend(line[2:].strip() for line in message.splitlines() if line.startswith("- "))
        return False

    logger = logging.getLogger("transformers.dynamic_module_utils")
    logger.addFilter(hold)
    try:
        yield fetched
    finally:
        logger.removeFilter(hold)


def _show_seed_error(folder: Path) -> None:
    import transformers

    with _code_fetches() as fetched:
        error = _seed_error(folder)
    if fetched:
        click.echo(
            f"    transformers fetched this code from {BASE_REPO} on the local Hub, because the fine-tune's "
            f"auto_map names '{BASE_REPO}--...':\n      {', '.join(sorted(set(fetched)))}\n"
            '    transformers warns about it ("A new version of the following files was downloaded ... Make sure '
            'to double-check they do not contain any added malicious code"): the checkpoint runs whatever code '
            "that repo has today, not the code it was trained with. That is the hazard hubsync removes: a "
            "build ships the pinned base's own .py files, and its auto_map points at them."
        )
    if error is None:
        click.echo("    chat() worked (unexpected: the error did not reproduce)")
        return
    words = (
        "as transformers 4.x prints it"
        if error == USERS_ERROR
        else f"in transformers 4.x's words; transformers {transformers.__version__}, running here, says: {error}"
    )
    click.echo(
        f"\n    chat() fails with the error MiniCPM-V users report (MiniCPM-V #601, #372):\n"
        f"      {USERS_ERROR}\n"
        f"    ({words})\n"
        "    why: without preprocessor_config.json, AutoProcessor falls back to the bare tokenizer, and chat() "
        "asks it for its .tokenizer"
    )


def _seed_error(folder: Path) -> str | None:
    from transformers import AutoModel, AutoTokenizer

    from hubsync.testing.models import make_test_image

    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    try:
        model.chat(
            image=make_test_image(),
            msgs=[{"role": "user", "content": "Describe the image."}],
            tokenizer=tokenizer,
        )
    except AttributeError as err:
        return f"AttributeError: {err}"
    return None


# ------------------------------------------------------------------------------------------- what comes next


def client_exports(hub: LocalHub, workdir: Path) -> dict[str, str]:
    """What a shell needs to use the demo's Hub and its cache (set before anything imports huggingface_hub)."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",  # uploads would go to Xet, which the local Hub does not speak
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": str(os.environ.get("HF_TOKEN", "")),
        "HF_HOME": str(workdir / "hf-home"),  # the demo's cache: the base is already in it
    }


def serve_command(hub: LocalHub) -> str:
    """The emulator's own command that brings this Hub back, same ports and repos (docs/cli.md)."""
    port, cdn_port = urlsplit(hub.endpoint).port, urlsplit(hub.cdn_endpoint).port
    return f"python -m hubsync.testing.hub serve --root {hub.root} --port {port} --cdn-port {cdn_port} --xet"


def next_steps(workdir: Path, hub: LocalHub, *, serving: bool) -> list[str]:
    """Print the commands that take a newcomer from here to a second push of their own edit; return them."""
    exports = " ".join(f"{k}={v}" for k, v in client_exports(hub, workdir).items())
    steps = [
        ("", f"cd {workdir}"),
        ("", f"export {exports}"),
        (
            "the demo's build is recorded in this folder, so a bare push finds it (already up to date)",
            "hubsync push",
        ),
        (
            "make it yours: edit manifest.yaml (card.description, or finetune.path to another checkpoint), then",
            "hubsync build manifest.yaml",
        ),
        ("a second commit, with only the files that changed", "hubsync push"),
        ("the base still pinned, the Hub in sync with the build", "hubsync status manifest.yaml"),
    ]
    if serving:
        _step(8, "Your turn. The local Hub keeps running here (Ctrl-C stops it); in another terminal:")
    else:
        _step(8, "Your turn. The local Hub stopped with the demo; bring it back in another terminal:")
        click.echo(f"    $ {serve_command(hub)}\n  (or run `hubsync demo --serve`), then, in this one:")
    for comment, command in steps:
        if comment:
            click.echo(f"    # {comment}")
        click.echo(f"    $ {command}")
    if serving:
        click.echo(f"  Later, `{serve_command(hub)}` brings this Hub back with the same repos.")
    return [command for _, command in steps]


def _data(
    workdir: Path, hub: LocalHub, story: Story, commands: list[str], *, serving: bool
) -> dict[str, Any]:
    return {
        "workdir": str(workdir),
        "hub": {"endpoint": hub.endpoint, "serving": serving, "serve_command": serve_command(hub)},
        "env": client_exports(hub, workdir),
        "base": {"repo": BASE_REPO, "sha": story.base_sha},
        "repo": TARGET_REPO,
        "commit": story.commit,
        "manifest": str(story.manifest),
        "output": str(story.output),
        "next": commands,
    }


def _serve_until_stopped(hub: LocalHub) -> None:
    """Block until Ctrl-C or SIGTERM; either is the normal way to end `--serve`."""
    stop = threading.Event()
    sys.stdout.flush()  # the next steps must reach a pipe now, not when the Hub stops
    if threading.current_thread() is threading.main_thread():
        # SIGINT too, explicitly: a process started with SIGINT ignored (a background job of a script, a test
        # runner's worker) inherits that, and Ctrl-C would then never stop it
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: stop.set())
    click.echo(f"\nthe local Hub is serving on {hub.endpoint}: Ctrl-C stops it", err=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    click.echo("the local Hub stopped", err=True)
