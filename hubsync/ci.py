"""GitHub Actions integration: annotations, folded phases, the job summary and step outputs.

Everything here is a no-op unless `GITHUB_ACTIONS=true`, so the CLI can call it unconditionally. Other CI
systems use `--json` instead. Workflow commands (`::error ...::`, `::group::`) are written to stderr: the
runner parses commands on both streams (actions/runner `ScriptHandler` feeds stdout and stderr to the same
command manager), stderr is where hubsync's logging goes, so a fold keeps the log lines it wraps in order,
and stdout stays clean for `--json`. Outputs go to the `$GITHUB_OUTPUT` file and the Markdown summary to
`$GITHUB_STEP_SUMMARY`; both are appended to, as the runner expects.

Stdlib only, and nothing from hubsync beyond duck typing, so importing it costs nothing on `hubsync --help`.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from hubsync.build import BuildResult
    from hubsync.manifest import Manifest
    from hubsync.plan import Plan
    from hubsync.push import PushResult
    from hubsync.verify import Report

_MARK = {True: "✅ pass", False: "❌ FAIL", None: "➖ skip"}


def active() -> bool:
    """True inside a GitHub Actions step (the runner sets GITHUB_ACTIONS=true)."""
    return os.environ.get("GITHUB_ACTIONS") == "true"


# --------------------------------------------------------------------------------------- workflow commands


def escape_data(text: str) -> str:
    """Escape a command's message (the part after `::`), as the Actions toolkit does."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a command property value: like data, plus `:` and `,`, which delimit properties."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str = "", **properties: object) -> str:
    """One workflow command line: `::name key=value,...::message`; None-valued properties are left out."""
    props = ",".join(f"{k}={escape_property(str(v))}" for k, v in properties.items() if v is not None)
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


def _emit(line: str) -> None:
    # Flush stdout first, so that a command never overtakes text printed before it.
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _workspace_path(file: str) -> str:
    """Annotations name files relative to the repository root; make an absolute path in the workspace so."""
    workspace = os.environ.get("GITHUB_WORKSPACE")
    path = Path(file)
    if workspace and path.is_absolute():
        try:
            return path.resolve().relative_to(Path(workspace).resolve()).as_posix()
        except ValueError:
            return file
    return path.as_posix()


def annotate(
    message: str,
    *,
    level: str = "error",
    file: str | None = None,
    line: int | None = None,
    title: str | None = None,
) -> None:
    """An `::error` / `::warning` / `::notice` annotation, attached to `file`:`line` when given."""
    if not active():
        return
    _emit(command(level, message, file=_workspace_path(file) if file else None, line=line, title=title))


@contextmanager
def group(title: str) -> Iterator[None]:
    """Fold everything logged inside into one collapsible section of the step log."""
    if not active():
        yield
        return
    _emit(command("group", title))
    try:
        yield
    finally:
        _emit("::endgroup::")


# --------------------------------------------------------------------------------------- files the runner reads


def format_output(name: str, value: object) -> str:
    """One `$GITHUB_OUTPUT` entry: `name=value`, or the heredoc form for a value that spans lines."""
    text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if "\n" not in text and "\r" not in text:
        return f"{name}={text}\n"
    delimiter = f"ghadelimiter_{uuid.uuid4()}"  # a fresh random delimiter can never occur in the value
    return f"{name}<<{delimiter}\n{text}\n{delimiter}\n"


def set_outputs(values: Mapping[str, object]) -> None:
    """Append step outputs to `$GITHUB_OUTPUT` (booleans as true/false, None as empty)."""
    path = os.environ.get("GITHUB_OUTPUT")
    if not active() or not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(format_output(k, v) for k, v in values.items()))


def append_summary(markdown: str) -> None:
    """Append Markdown to the job summary (`$GITHUB_STEP_SUMMARY`)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not active() or not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown.rstrip("\n") + "\n\n")


# --------------------------------------------------------------------------------------- Markdown, pure


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _cell(text: object) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def plan_markdown(plan: Plan) -> str:
    """What the build is made of: where the files come from, the tensors, the tuned prefixes."""
    actions: dict[str, int] = {}
    for f in plan.files:
        actions[f.action] = actions.get(f.action, 0) + 1
    tuned = len(plan.tuned_tensors)
    lines = [
        f"**Base** `{plan.base_label}` · **output** `{plan.output_dir}`",
        "",
        f"- **{len(plan.files)} files**: " + ", ".join(f"{n} {a}" for a, n in sorted(actions.items())),
        (
            f"- **{len(plan.tensors)} tensors**: {tuned} from the fine-tune, {len(plan.tensors) - tuned} "
            "byte-identical from the base"
        ),
    ]
    if plan.prefixes:
        lines += [
            "",
            "| tuned prefix | changed | params changed | max \\|Δ\\| | rel Δ |",
            "|---|---:|---:|---:|---:|",
        ]
        for p in plan.prefixes:
            lines.append(
                f"| `{_cell(p.prefix)}` | {p.changed}/{p.tensors} | {p.params_changed:,} | {p.max_abs:.3g} | {p.rel:.3g} |"
            )
    if plan.notes:
        lines += ["", f"<details><summary>{len(plan.notes)} note(s)</summary>", ""]
        lines += [f"- {_cell(n)}" for n in plan.notes]
        lines += ["", "</details>"]
    if plan.problems:
        lines += ["", "**Problems (the build stops):**", ""] + [f"- {_cell(p)}" for p in plan.problems]
    return "\n".join(lines)


def report_markdown(report: Report) -> str:
    """The verification as a table: one row per check."""
    verdict = "✅ passed" if report.passed else f"❌ failed ({len(report.failures)} check(s))"
    device = report.device + (" (device_map=auto)" if report.device_map else "")
    lines = [
        f"**Verification {verdict}** on `{_cell(device)}`",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for c in report.checks:
        lines.append(f"| {_cell(c.name)} | {_MARK[c.ok]} | {_cell(c.detail)} |")
    total = report.timings.get("total")
    if total is not None:
        lines += ["", f"Verified in {total:.1f} s."]
    return "\n".join(lines)


def push_markdown(result: PushResult) -> str:
    """The published commit with its links, and what was sent against what the build holds."""
    target = f"`{result.repo_id}@{result.revision}`"
    repo = f"[{result.repo_id}]({result.repo_url})" if result.repo_url else f"`{result.repo_id}`"
    if result.up_to_date:
        sha = (result.commit_sha or "")[:12]
        lines = [
            f"**{target} is already up to date** at `{sha}`: nothing was uploaded.",
            "",
            f"- repo: {repo}",
        ]
    else:
        lines = [f"**Published {target}**", "", f"- repo: {repo}"]
        if result.commit_url:
            lines.append(f"- commit: [{(result.commit_sha or '')[:12]}]({result.commit_url})")
        if result.pr_url:
            lines.append(f"- pull request: {result.pr_url}")
    if result.tag:
        lines.append(f"- tag: `{result.tag}`")
    if result.created_repo:
        lines.append("- the repo was created by this push")
    lines += [f"- note: {_cell(note)}" for note in getattr(result, "notes", ())]
    if not result.up_to_date:
        share = f" ({result.bytes_uploaded / result.bytes_in_build:.0%})" if result.bytes_in_build else ""
        lines += [
            "",
            "| | files | bytes |",
            "|---|---:|---:|",
            f"| uploaded | {len(result.uploaded)} | {human_bytes(result.bytes_uploaded)} |",
            f"| copied server-side from the base | {len(result.copied)} | {human_bytes(result.bytes_copied)} |",
            f"| unchanged | {len(result.unchanged)} | |",
            f"| deleted | {len(result.deleted)} | |",
            "",
            (
                f"Uploaded {human_bytes(result.bytes_uploaded)} of the {human_bytes(result.bytes_in_build)} "
                f"in the build{share}."
            ),
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- what the CLI calls


def _failed_checks(report: Report) -> None:
    for check in report.failures:
        annotate(check.detail, title=f"hubsync: verification failed: {check.name}")


def after_validate(manifest: Manifest) -> None:
    """Outputs of `hubsync validate`: where the manifest publishes."""
    if not active():
        return
    push = manifest.push
    set_outputs(
        {
            "valid": True,
            "repo": push.repo if push else "",
            "revision": push.revision if push else "",
            "create-pr": bool(push and push.create_pr),
            "output-dir": str(manifest.output.dir),
        }
    )


def after_build(manifest_path: Path, result: BuildResult, report: Report | None) -> None:
    """Summary, outputs and failed-check annotations for `hubsync build`."""
    if not active():
        return
    parts = [f"## hubsync build `{manifest_path}`", "", plan_markdown(result.plan)]
    if report is not None:
        parts += ["", report_markdown(report)]
        _failed_checks(report)
    else:
        parts += ["", "**Not verified** (`--no-verify`): `hubsync push` refuses an unverified build."]
    append_summary("\n".join(parts))
    set_outputs(
        {
            "output-dir": str(result.output),
            "verified": bool(report is not None and report.passed),
            "files": len(result.files),
            "tuned-tensors": len(result.plan.tuned_tensors),
        }
    )


def after_verify(report: Report) -> None:
    """Summary, outputs and failed-check annotations for `hubsync verify`."""
    if not active():
        return
    _failed_checks(report)
    append_summary(f"## hubsync verify `{report.folder}`\n\n{report_markdown(report)}")
    set_outputs({"verified": report.passed, "output-dir": str(report.folder)})


def after_push(result: PushResult) -> None:
    """Summary and outputs for `hubsync push`."""
    if not active():
        return
    append_summary(f"## hubsync push\n\n{push_markdown(result)}")
    # the same values as `hubsync push --json`: PushResult is the one source of both
    set_outputs(
        {
            "commit-url": result.commit_url or "",
            "commit-sha": result.commit_sha or "",
            "repo-url": result.repo_url or "",
            "revision": result.revision,
            "pr-url": result.pr_url or "",
            "bytes-uploaded": result.bytes_uploaded,
            "bytes-in-build": result.bytes_in_build,
            "up-to-date": result.up_to_date,
        }
    )


def _title(err: BaseException) -> str:
    """The error class's own title (HubsyncError.title, read by duck typing: no import here), or its name."""
    return str(getattr(err, "title", None) or type(err).__name__)


def report_error(err: BaseException) -> None:
    """Turn the error that ends a command into annotations and a summary section.

    A manifest error gives one annotation per problem, at the manifest's file and line; anything else one
    annotation without a location. Called by `cli.main`, the CLI's one error boundary.
    """
    if not active():
        return
    problems = getattr(err, "problems", None)
    name = type(err).__name__
    if problems:
        for p in problems:
            annotate(f"{p.key}: {p.message}" if p.key else p.message, file=p.file, line=p.line)
        lines = [
            f"- `{_cell(p.file)}{':' + str(p.line) if p.line else ''}` {_cell(p.key)}: {_cell(p.message)}"
            for p in problems
        ]
    else:
        one_line = getattr(err, "one_line", None)
        fmt = getattr(err, "format_message", None)  # click's usage errors
        if callable(one_line):
            message = one_line()
        elif callable(fmt):
            message = fmt()
        else:
            message = f"{name}: {err} (a bug in hubsync: please report it, with HUBSYNC_DEBUG=1 output)"
        annotate(message, title=f"hubsync: {_title(err)}")
        lines = [f"- {_cell(message)}"]
    append_summary(
        "\n".join([f"## ❌ hubsync failed: {_title(err)}", "", *lines])
    )
