"""The `hubsync` command line: a thin layer over the library.

Each command parses its arguments, calls one library function and prints the result. `main()` is the only
place where errors become messages and exit codes: a `HubsyncError` is a user's mistake and prints one line
(traceback only with HUBSYNC_DEBUG=1); anything else is a bug and keeps its traceback.
Nothing heavy (torch, transformers, huggingface_hub) is imported at module level, so `--help` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from hubsync import __version__, ci
from hubsync.errors import HubsyncError, ManifestError

log = logging.getLogger("hubsync")

MANIFEST = click.argument("manifest", type=click.Path(path_type=Path), metavar="MANIFEST")
JSON_FLAG = click.option(
    "--json", "as_json", is_flag=True, help="Print a machine-readable JSON result on stdout."
)


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("hubsync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if verbosity < 0:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="hubsync")
@click.option("-v", "--verbose", count=True, help="More output (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Rebuild, verify and publish a fine-tuned model repo from a pinned base and the tuned tensors.

    \b
    Typical use:
      hubsync validate manifest.yaml   # check the manifest
      hubsync plan manifest.yaml       # what the build will do, without doing it
      hubsync build manifest.yaml      # write + verify the output folder
      hubsync push                     # publish the last build

    Set HUBSYNC_DEBUG=1 to see tracebacks.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = -1 if quiet else verbose
    _configure_logging(ctx.obj["verbosity"])


@cli.command()
@MANIFEST
@JSON_FLAG
def validate(manifest: Path, as_json: bool) -> None:
    """Check a manifest and report every mistake at once, each with its file:line."""
    from hubsync.manifest import load_manifest
    from hubsync.safety import check_manifest_output

    try:
        loaded = load_manifest(manifest)
        check_manifest_output(loaded, manifest)  # the output-safety rule, at output.dir's line
    except ManifestError as err:
        if as_json:
            _echo_json({"valid": False, "problems": [p.to_dict() for p in err.problems]})
        raise err.listing_all() from None
    ci.after_validate(loaded)
    if as_json:
        _echo_json({"valid": True, "manifest": loaded.to_record()})
    else:
        click.echo(f"{manifest}: valid")


@cli.command()
@MANIFEST
@JSON_FLAG
@click.option(
    "--allow-untuned-changes",
    is_flag=True,
    help="Accept changes outside `finetune.tuned` (taken from the base).",
)
def plan(manifest: Path, as_json: bool, allow_untuned_changes: bool) -> None:
    """Show what a build would write and where each file and tensor comes from, without writing anything."""
    from hubsync.build import prepare
    from hubsync.plan import render

    prepared = prepare(manifest, allow_untuned_changes=allow_untuned_changes)
    if as_json:
        _echo_json(prepared.plan.to_dict())
    else:
        click.echo(render(prepared.plan))
    prepared.plan.raise_for_problems()


@cli.command()
@MANIFEST
@JSON_FLAG
@click.option("--no-verify", is_flag=True, help="Skip the verification that normally ends a build.")
@click.option(
    "--allow-untuned-changes",
    is_flag=True,
    help="Accept changes outside `finetune.tuned` (taken from the base).",
)
def build(manifest: Path, as_json: bool, no_verify: bool, allow_untuned_changes: bool) -> None:
    """Build a complete, loadable repo folder from the pinned base plus the tuned tensors, and verify it.

    The new folder replaces the previous output only when it verified (or with --no-verify).
    """
    from hubsync.build import build as run_build
    from hubsync.build import failed_verification
    from hubsync.plan import render
    from hubsync.verify import render_report

    with ci.group("hubsync build: resolve, plan, write, verify"):
        result = run_build(manifest, verify=not no_verify, allow_untuned_changes=allow_untuned_changes)
    report = result.report
    ci.after_build(manifest, result, report)
    if as_json:
        _echo_json(
            {
                "output": str(result.output),
                "plan": result.plan.to_dict(),
                "verification": None if report is None else report.to_json(),
            }
        )
    else:
        click.echo(render(result.plan))
        if result.failed_output is None:
            click.echo(f"\nbuilt {result.output}")
        if report is not None:
            click.echo(render_report(report))
    if report is not None and not report.passed:
        raise failed_verification(result)


@cli.command()
@click.argument("target", type=click.Path(path_type=Path), metavar="PATH_OR_MANIFEST")
@JSON_FLAG
@click.option(
    "--trust-remote-code/--no-trust-remote-code",
    default=None,
    help="Allow the pinned base's own code to run (default: the manifest's verify.trust_remote_code; "
    "never the folder's own record).",
)
@click.option(
    "--python",
    "python",
    type=click.Path(path_type=Path),
    default=None,
    help="Run the model with this interpreter (an environment with its torch and transformers); default: "
    "the manifest's verify.python / verify.requirements, else the runtime the folder was last verified with.",
)
def verify(target: Path, as_json: bool, trust_remote_code: bool | None, python: Path | None) -> None:
    """Prove that a build loads and runs, in the model's own runtime (on a GPU when there is one)."""
    from hubsync.errors import VerifyError
    from hubsync.verify import render_report, summary_line
    from hubsync.verify import verify as run_verify

    with ci.group("hubsync verify"):
        report = run_verify(target, trust_remote_code=trust_remote_code, python=python)
    ci.after_verify(report)
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(render_report(report))
    if not report.passed:
        raise VerifyError(f"verification failed: {summary_line(report)}")


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path), metavar="[MANIFEST]", required=False)
@JSON_FLAG
@click.option(
    "--skip-verify-check",
    is_flag=True,
    help="Push even if the verification is missing, failed or stale (the card says so).",
)
@click.pass_context
def push(ctx: click.Context, manifest: Path | None, as_json: bool, skip_verify_check: bool) -> None:
    """Publish a verified build as one commit, uploading only what changed.

    Without MANIFEST, pushes the last build made from this directory. The token comes from HF_TOKEN
    (or `hf auth login`); HF_ENDPOINT selects another Hub.
    """
    from hubsync.push import push as run_push

    with ci.group("hubsync push"):
        result = run_push(manifest, skip_verify_check=skip_verify_check, quiet=ctx.obj["verbosity"] < 0)
    ci.after_push(result)
    if as_json:
        _echo_json(result.to_dict())
    elif result.up_to_date:
        click.echo(
            f"{result.repo_id}@{result.revision} is already up to date ({(result.commit_sha or '')[:12]})"
        )
    else:
        click.echo(f"pushed {result.repo_id}@{result.revision}: {result.commit_url or result.pr_url}")
        click.echo(
            f"  {len(result.uploaded)} file(s) uploaded ({result.bytes_uploaded:,} bytes), "
            f"{len(result.copied)} copied server-side from the base ({result.bytes_copied:,} bytes), "
            f"{len(result.unchanged)} unchanged, {len(result.deleted)} deleted; "
            f"{result.bytes_in_build:,} bytes in the build"
        )
        if result.pr_url:
            click.echo(f"  pull request: {result.pr_url}")
        if result.tag:
            click.echo(f"  tagged {result.tag}")


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path), metavar="[MANIFEST]", required=False)
@JSON_FLAG
def status(manifest: Path | None, as_json: bool) -> None:
    """Has the base moved? Does the local build differ from the published repo?"""
    from hubsync.push import render_status
    from hubsync.push import status as run_status

    data = run_status(manifest)
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else render_status(data))


@cli.command()
@click.argument("finetune_dir", type=click.Path(path_type=Path), metavar="FINETUNE_DIR")
@click.option(
    "--base", "base", required=True, metavar="REPO[@REV]", help="The base model the fine-tune started from."
)
def doctor(finetune_dir: Path, base: str) -> None:
    """Diagnose a trainer output against its base and print a manifest that fixes it."""
    from hubsync.doctor import diagnose

    result = diagnose(finetune_dir, base)
    click.echo(f"{finetune_dir} against {base}:", err=True)
    for finding in result.findings:
        click.echo(f"  - {finding}", err=True)
    for problem in result.problems:
        click.echo(f"  ! {problem}", err=True)
    click.echo("\nA manifest for `hubsync build` (save it as manifest.yaml):\n", err=True)
    click.echo(result.manifest_text, nl=False)


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("hubsync-demo"),
    show_default=True,
    help="Folder for the demo's local Hub, fine-tune and build.",
)
def demo(workdir: Path) -> None:
    """Run the whole story offline on an embedded local Hub with a tiny model."""
    from hubsync.demo import run_demo

    run_demo(workdir)


def _echo_error(err: HubsyncError) -> None:
    if isinstance(err, ManifestError) and err.list_all:
        for problem in err.problems:
            click.echo(problem.render(), err=True)
    else:
        click.echo(f"error: {err.one_line()}", err=True)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: the one error boundary of hubsync."""
    debug = os.environ.get("HUBSYNC_DEBUG", "") not in ("", "0")
    try:
        cli.main(args=argv, prog_name="hubsync", standalone_mode=False)
    except HubsyncError as err:
        ci.report_error(err)
        if debug:
            raise
        _echo_error(err)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        ci.report_error(err)
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing half-written was left behind", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    except Exception as err:  # a bug: annotated in CI, and it keeps its traceback
        ci.report_error(err)
        raise
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
