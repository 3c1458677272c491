"""The `hubsync` command line: a thin layer over the library.

Each command parses its arguments, calls one library function and prints the result. `main()` is the only
place where errors become messages and exit codes: a `HubsyncError` is a user's mistake and prints one line
(traceback only with HUBSYNC_DEBUG=1); anything else is a bug and keeps its traceback.

With `--json`, `main()` also keeps the JSON contract: exactly one JSON document on stdout, on success
(`{"ok": true, ...the command's data}`) and on error (`{"ok": false, "error": {kind, message, file, line,
exit_code}, ...whatever data the command had}`). Commands hand their data over with `_result()`; while a
command runs, anything written to stdout (by hubsync, a library or a child process) goes to stderr instead.

Nothing heavy (torch, transformers, huggingface_hub) is imported at module level, so `--help` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from hubsync import __version__, ci
from hubsync.errors import HubsyncError, ManifestError

log = logging.getLogger("hubsync")

MANIFEST = click.argument("manifest", type=click.Path(path_type=Path), metavar="MANIFEST")
JSON_FLAG = click.option(
    "--json", "as_json", is_flag=True, help="Print a machine-readable JSON result on stdout."
)


F = TypeVar("F", bound=Callable[..., Any])


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


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def _result(data: dict[str, Any]) -> None:
    """The command's data: what `--json` prints (main adds `ok`), also when the command then fails."""
    click.get_current_context().obj["data"] = data


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    # -q / -v given after the subcommand: the same effect as before it
    if not value:
        return
    obj = ctx.ensure_object(dict)
    if param.name == "quiet":
        obj["verbosity"] = -1
    elif obj.get("verbosity", 0) >= 0:
        obj["verbosity"] = obj.get("verbosity", 0) + int(value)
    _configure_logging(obj["verbosity"])


def _verbosity_options(command: F) -> F:
    """`-q` and `-v` on every subcommand too: `hubsync build -q m.yaml` means `hubsync -q build m.yaml`."""
    quiet = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=_set_verbosity,
        help="Only warnings and errors.",
    )
    verbose = click.option(
        "-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity, help="More output."
    )
    return quiet(verbose(command))


class _Group(click.Group):
    """Every subcommand also takes -q/-v (see `_verbosity_options`)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(_verbosity_options(cmd), name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.option(
    "--deep",
    is_flag=True,
    help="Also check the inputs: the fine-tune, keep_files, the base's files and headers (no weights are "
    "downloaded), and every plan rule that needs no tensor data.",
)
def validate(manifest: Path, as_json: bool, deep: bool) -> None:
    """Check a manifest and report every mistake at once, each with its file:line."""
    from hubsync.manifest import load_manifest
    from hubsync.safety import check_manifest_output

    _result({"valid": False})
    try:
        loaded = load_manifest(manifest)
        check_manifest_output(loaded, manifest)  # the output-safety rule, at output.dir's line
    except ManifestError as err:
        raise err.listing_all() from None
    ci.after_validate(loaded)
    _result({"valid": True, "manifest": loaded.to_record()})
    if not as_json:
        click.echo(f"{manifest}: valid")
    if deep:
        _validate_inputs(manifest, as_json)


def _validate_inputs(manifest: Path, as_json: bool) -> None:
    from hubsync.build import prepare

    prepared = prepare(manifest, weights="headers")
    plan = prepared.plan
    data = click.get_current_context().obj["data"]
    data["inputs"] = {
        "base": plan.base_label,
        "base_weights": prepared.base.weights,
        "finetune": plan.finetune_folder,
        "problems": list(plan.problems),
        "unchecked": list(plan.unchecked),
    }
    if not as_json:
        for problem in plan.problems:
            click.echo(f"{manifest}: {problem}", err=True)
        if plan.unchecked:
            click.echo(
                f"{manifest}: not checked without the base's weights (`hubsync build` checks them):", err=True
            )
            for rule in plan.unchecked:
                click.echo(f"  - {rule}", err=True)
        if plan.ok:
            click.echo(
                f"{manifest}: inputs ok ({plan.base_label}, {len(plan.tuned_tensors)} tuned tensor(s))"
            )
    plan.raise_for_problems()


@cli.command()
@MANIFEST
@JSON_FLAG
@click.option(
    "--allow-untuned-changes",
    is_flag=True,
    help="Accept changes outside `finetune.tuned` (taken from the base).",
)
def plan(manifest: Path, as_json: bool, allow_untuned_changes: bool) -> None:
    """Show what a build would write and where each file and tensor comes from, without writing anything.

    Downloads only the base's non-weight files and reads its safetensors headers over HTTP; the tensor
    comparison runs when the base's weights are already in the cache (see docs/cli.md).
    """
    from hubsync.build import prepare
    from hubsync.plan import render

    prepared = prepare(manifest, allow_untuned_changes=allow_untuned_changes, weights="headers")
    _result(prepared.plan.to_dict())
    if not as_json:
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
@click.option(
    "--verify-python",
    type=click.Path(path_type=Path),
    default=None,
    help="Verify with this interpreter instead of the manifest's verify.python / verify.requirements "
    "(e.g. the training env's python on a GPU runner).",
)
@click.option(
    "--verify-requirement",
    "verify_requirements",
    multiple=True,
    metavar="REQ",
    help="Verify in a venv with these pip requirements instead of the manifest's (repeat the option).",
)
def build(
    manifest: Path,
    as_json: bool,
    no_verify: bool,
    allow_untuned_changes: bool,
    verify_python: Path | None,
    verify_requirements: tuple[str, ...],
) -> None:
    """Build a complete, loadable repo folder from the pinned base plus the tuned tensors, and verify it.

    The new folder replaces the previous output only when it verified (or with --no-verify).
    """
    from hubsync.build import build as run_build
    from hubsync.build import failed_verification
    from hubsync.plan import render
    from hubsync.verify import render_report

    if verify_python is not None and verify_requirements:
        raise click.UsageError("give --verify-python or --verify-requirement, not both")
    runtime = (
        {"python": str(verify_python.absolute())}
        if verify_python is not None
        else {"requirements": list(verify_requirements)}
        if verify_requirements
        else None
    )
    with ci.group("hubsync build: resolve, plan, write, verify"):
        result = run_build(
            manifest, verify=not no_verify, allow_untuned_changes=allow_untuned_changes, runtime=runtime
        )
    report = result.report
    ci.after_build(manifest, result, report)
    _result(
        {
            "output": str(result.output),
            "failed_output": None if result.failed_output is None else str(result.failed_output),
            "plan": result.plan.to_dict(),
            "verification": None if report is None else report.to_json(),
        }
    )
    if not as_json:
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
    _result(report.to_json())
    if not as_json:
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
    _result(result.to_dict())
    if not as_json:
        _echo_push(result)


def _echo_push(result: Any) -> None:
    if result.up_to_date:
        click.echo(
            f"{result.repo_id}@{result.revision} is already up to date ({(result.commit_sha or '')[:12]})"
        )
        return
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
    _result(data)
    if not as_json:
        click.echo(render_status(data))


@cli.command()
@click.argument("finetune_dir", type=click.Path(path_type=Path), metavar="FINETUNE_DIR")
@click.option(
    "--base", "base", required=True, metavar="REPO[@REV]", help="The base model the fine-tune started from."
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow loading the base's own code in the verification worker, to see whether it runs here.",
)
@JSON_FLAG
def doctor(finetune_dir: Path, base: str, trust_remote_code: bool, as_json: bool) -> None:
    """Diagnose a trainer output against its base and print a manifest that fixes it.

    Reads the base's headers and a small sample of its weights over HTTP, unless they are in the cache
    (see docs/cli.md). Exits 1 when it finds problems that stop a build even with that manifest.
    """
    from hubsync.doctor import diagnose
    from hubsync.errors import PlanError

    result = diagnose(finetune_dir, base, trust_remote_code=trust_remote_code)
    _result(
        {
            "findings": list(result.findings),
            "problems": list(result.problems),
            "manifest": result.manifest_text,
        }
    )
    if not as_json:
        click.echo(f"{finetune_dir} against {base}:", err=True)
        for finding in result.findings:
            click.echo(f"  - {finding}", err=True)
        for problem in result.problems:
            click.echo(f"  ! {problem}", err=True)
        click.echo("\nA manifest for `hubsync build` (save it as manifest.yaml):\n", err=True)
        click.echo(result.manifest_text, nl=False)
    if result.problems:
        raise PlanError(
            f"{len(result.problems)} problem(s) stop a build even with this manifest (marked `!`): "
            "fix them in the fine-tune, then run `hubsync doctor` again"
        )


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("hubsync-demo"),
    show_default=True,
    help="Folder for the demo's local Hub, fine-tune and build.",
)
@click.option(
    "--serve",
    is_flag=True,
    help="Keep the demo's local Hub running afterwards (until Ctrl-C), to follow the next steps it prints.",
)
@JSON_FLAG
@click.pass_context
def demo(ctx: click.Context, workdir: Path, serve: bool, as_json: bool) -> None:
    """Run the whole story offline on an embedded local Hub with a tiny model."""
    from hubsync.demo import run_demo

    def ready(data: dict[str, Any]) -> None:
        _result(data)
        if as_json:  # `--serve`: the document comes now, while the Hub runs, not after Ctrl-C
            ctx.obj["send"]()

    run_demo(workdir, serve=serve, on_ready=ready)


# ------------------------------------------------------------------------------------------ the one boundary


def _echo_error(err: HubsyncError) -> None:
    if isinstance(err, ManifestError) and err.list_all:
        for problem in err.problems:
            click.echo(problem.render(), err=True)
    else:
        click.echo(f"error: {err.one_line()}", err=True)


def _error_document(err: BaseException, exit_code: int) -> dict[str, Any]:
    """The `error` object of the JSON contract."""
    file = line = None
    if isinstance(err, HubsyncError):
        message = err.one_line()
    elif isinstance(err, click.ClickException):
        message = err.format_message()
    elif isinstance(err, (KeyboardInterrupt, click.exceptions.Abort)):
        message = "interrupted: nothing half-written was left behind"
    else:
        message = (
            f"{type(err).__name__}: {err} (a bug in hubsync: please report it, with HUBSYNC_DEBUG=1 output)"
        )
    error: dict[str, Any] = {
        "kind": "UsageError" if isinstance(err, click.UsageError) else type(err).__name__,
        "message": message,
        "file": file,
        "line": line,
        "exit_code": exit_code,
    }
    if isinstance(err, ManifestError):
        first = err.problems[0] if err.problems else None
        error["file"] = first.file if first else err.path
        error["line"] = first.line if first else None
        error["problems"] = [p.to_dict() for p in err.problems]
    return error


class _JsonOutput:
    """While a `--json` command runs, file descriptor 1 points at stderr (so that nothing but the document
    reaches stdout, whoever writes); `send` writes the one document on the real stdout."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.sent = False
        self._stdout_fd: int | None = None

    def __enter__(self) -> _JsonOutput:
        sys.stdout.flush()
        self._stdout_fd = os.dup(1)
        os.dup2(2, 1)
        self.state["send"] = self.send
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        if self._stdout_fd is not None:
            os.dup2(self._stdout_fd, 1)
            os.close(self._stdout_fd)
            self._stdout_fd = None

    def send(self, error: dict[str, Any] | None = None) -> None:
        if self.sent:
            return
        self.sent = True
        document = {"ok": error is None, **self.state.get("data", {})}
        if error is not None:
            document["error"] = error
        sys.stdout.flush()
        text = (_dumps(document) + "\n").encode("utf-8")
        fd = self._stdout_fd if self._stdout_fd is not None else 1
        while text:
            text = text[os.write(fd, text) :]


def _wants_json(argv: list[str]) -> bool:
    """`--json` anywhere before a `--` (so even a usage error in that command line answers in JSON)."""
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def _run(argv: list[str], state: dict[str, Any], out: _JsonOutput | None) -> int:
    """The command, with every way it can end turned into an exit code (and, with --json, a document)."""
    debug = os.environ.get("HUBSYNC_DEBUG", "") not in ("", "0")
    code = 0
    failure: BaseException | None = None
    try:
        cli.main(args=argv, prog_name="hubsync", standalone_mode=False, obj=state)
    except HubsyncError as err:
        ci.report_error(err)
        failure, code = err, err.exit_code
        if out is not None:
            out.send(_error_document(err, code))
        if debug:
            raise
        _echo_error(err)
    except click.exceptions.Abort as err:
        failure, code = err, 130
        click.echo("error: aborted", err=True)
    except click.ClickException as err:
        ci.report_error(err)
        failure, code = err, err.exit_code
        err.show()
    except KeyboardInterrupt as err:
        failure, code = err, 130
        click.echo("error: interrupted; nothing half-written was left behind", err=True)
    except BrokenPipeError:
        return 141
    except Exception as err:  # a bug: annotated in CI, and it keeps its traceback
        ci.report_error(err)
        if out is not None:
            out.send(_error_document(err, 1))
        raise
    if out is not None:
        out.send(None if failure is None else _error_document(failure, code))
    return code


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: the one error boundary of hubsync."""
    args = list(sys.argv[1:] if argv is None else argv)
    state: dict[str, Any] = {}
    if not _wants_json(args) or any(a in ("-h", "--help", "--version") for a in args):
        sys.exit(_run(args, state, None))
    with _JsonOutput(state) as out:
        code = _run(args, state, out)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
