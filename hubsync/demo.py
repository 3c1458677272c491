"""`hubsync demo`: the whole story, offline, in seconds, on an embedded local Hub with a tiny model.

Publish a tiny MiniCPM-V look-alike (remote code) as the base, make the broken output a vision-only
fine-tune leaves behind, show the seed error, then build, verify, push, show the card, and load a fresh
download. No network and no account: the Hub is `hubsync.testing.hub.LocalHub` on loopback.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import click

from hubsync.errors import HubsyncError

MARKER = ".hubsync-demo"
BASE_REPO = "my-org/tiny-minicpmv"
TARGET_REPO = "my-org/tiny-minicpmv-vision-ft"


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


def run_demo(workdir: Path) -> None:
    started = time.perf_counter()
    workdir = _prepare_workdir(workdir)
    from hubsync.testing.hub import LocalHub

    # LFS-only files, as the Hub serves repos uploaded before the Xet migration: the push uploads the base's
    # shards instead of copying them server-side, and says so
    hub = LocalHub(workdir / "hub").start()
    try:
        # huggingface_hub reads these once, at import: set them before anything imports it.
        os.environ.update(hub.client_env(workdir / "hf-home"))
        _run(workdir, hub.endpoint)
    finally:
        hub.stop()
    click.secho(f"\ndone in {time.perf_counter() - started:.1f}s; everything is under {workdir}", fg="green")


def _run(workdir: Path, endpoint: str) -> None:
    from hubsync.build import build
    from hubsync.plan import render
    from hubsync.push import push
    from hubsync.testing.models import (
        make_remote_code_vlm,
        make_test_image,
        make_trainer_output,
        publish_model,
    )
    from hubsync.verify import render_report

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
    click.echo(f"    {_seed_error(finetune)}")

    _step(4, "hubsync build manifest.yaml (plan, write, then verify)")
    manifest = workdir / "manifest.yaml"
    manifest.write_text(
        f"base:\n  repo: {BASE_REPO}\n  revision: {base.sha}\n"
        'finetune:\n  path: output/checkpoint-3\n  tuned: ["vpm.", "resampler."]\n'
        "output:\n  dir: build/tiny-minicpmv-vision-ft\n"
        "verify:\n  device: auto\n  trust_remote_code: true\n"
        f"push:\n  repo: {TARGET_REPO}\n  private: true\n  tag: v1\n"
        'card:\n  description: "A vision fine-tune of a tiny MiniCPM-V look-alike, made by `hubsync demo`."\n'
        "  tags: [vision]\n"
    )
    click.echo("    " + manifest.read_text().replace("\n", "\n    ").rstrip())
    result = build(manifest, verify=True, record_last_build=False)
    click.echo("    " + render(result.plan).replace("\n", "\n    "))
    report = result.report
    assert report is not None
    click.echo("    " + render_report(report).replace("\n", "\n    "))
    if not report.passed:
        raise HubsyncError("the demo build failed verification: this is a bug in hubsync, please report it")

    _step(5, f"hubsync push -> {TARGET_REPO}")
    pushed = push(manifest)
    click.echo(f"    commit {pushed.commit_url}")
    click.echo(
        f"    {len(pushed.uploaded)} file(s) uploaded ({pushed.bytes_uploaded:,} bytes); "
        f"{len(pushed.copied)} shard(s) copied server-side from the base ({pushed.bytes_copied:,} bytes) "
        f"of {pushed.bytes_in_build:,} bytes; tag {pushed.tag}"
    )
    for note in pushed.notes:
        click.echo(f"    note: {note}")
    again = push(manifest)
    click.echo(
        f"    pushing again: {'already up to date' if again.up_to_date else 'pushed again (unexpected)'}"
    )

    _step(6, "The model card (front matter)")
    card = (result.output / "README.md").read_text()
    click.echo("    " + card.split("\n---", 1)[0].replace("\n", "\n    "))

    _step(7, "A fresh download of the published repo loads and chats")
    from huggingface_hub import snapshot_download
    from transformers import AutoModel, AutoTokenizer

    fresh = Path(snapshot_download(TARGET_REPO, revision="v1", cache_dir=workdir / "fresh-cache"))
    model = AutoModel.from_pretrained(str(fresh), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(fresh), trust_remote_code=True)
    answer = model.chat(
        image=make_test_image(),
        msgs=[{"role": "user", "content": "Describe the image."}],
        tokenizer=tokenizer,
    )
    click.echo(f"    chat() answered {answer!r} (a tiny random model: the point is that it runs)")


def _seed_error(folder: Path) -> str:
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
        return f"AttributeError: {err}   <- the seed error"
    return "chat() worked (unexpected: the seed error did not reproduce)"
