"""One exception root for every mistake a user can make.

Each message is one line that says what is wrong and what to do. `cli.main` is the only place where these
become output and exit codes; anything that is not a `HubsyncError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class HubsyncError(Exception):
    """Root of every error hubsync reports to a user. `exit_code` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")

    def one_line(self) -> str:
        text = self.message if self.hint is None else f"{self.message} {self.hint}"
        return " ".join(text.split())


class ManifestError(HubsyncError):
    """The manifest cannot be read or is invalid. Carries every problem found, each with its location."""

    exit_code = 2

    def __init__(self, problems: list["ManifestProblem"], path: str) -> None:
        self.problems = problems
        self.path = path
        first = problems[0].render() if problems else f"{path}: invalid manifest"
        more = f" (and {len(problems) - 1} more: run `hubsync validate {path}`)" if len(problems) > 1 else ""
        super().__init__(first + more)


class ManifestProblem:
    """One mistake in a manifest: where it is (file, line, key path) and what to do about it."""

    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "key": self.key, "message": self.message}


class BaseResolutionError(HubsyncError):
    """The base model cannot be found or fetched (unknown repo or revision, gated, offline)."""


class FinetuneError(HubsyncError):
    """The fine-tune folder cannot be read or does not map onto the base."""


class PlanError(HubsyncError):
    """The plan breaks a rule (untuned change, vanished change, NaN, undeclared tuned parts)."""


class BuildError(HubsyncError):
    """Writing the output failed or was refused (locked, no space)."""


class VerifyError(HubsyncError):
    """Verification could not run or failed."""


class PushError(HubsyncError):
    """Publishing failed; the remote repo is left as it was."""
