"""One exception root for every mistake a user can make.

Each message is one line in one style: it starts lower-case and says what is wrong, then, after a colon, what to
do ("base folder /x does not exist: check `base.path`"). `title` names the kind of failure (CI annotations use
it). `cli.main` is the only place where these become output and exit codes; anything that is not a
`HubsyncError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class HubsyncError(Exception):
    """Root of every error hubsync reports to a user. `exit_code` is what the CLI exits with."""

    exit_code: int = 1
    title: str = "hubsync failed"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def one_line(self) -> str:
        return " ".join(self.message.split())


class ManifestError(HubsyncError):
    """The manifest cannot be read or is invalid. Carries every problem found, each with its location."""

    exit_code = 2
    title = "invalid manifest"

    def __init__(self, problems: list["ManifestProblem"], path: str, *, list_all: bool = False) -> None:
        self.problems = problems
        self.path = path
        self.list_all = list_all  # print every problem on its own line (`hubsync validate`)
        first = problems[0].render() if problems else f"{path}: invalid manifest"
        more = f" (and {len(problems) - 1} more: run `hubsync validate {path}`)" if len(problems) > 1 else ""
        super().__init__(first + more)


    def listing_all(self) -> ManifestError:
        """The same error, reported with every problem on its own line."""
        return ManifestError(self.problems, self.path, list_all=True)


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

    title = "base model unavailable"


class FinetuneError(HubsyncError):
    """The fine-tune folder cannot be read or does not map onto the base."""

    title = "fine-tune unreadable"


class PlanError(HubsyncError):
    """The plan breaks a rule (untuned change, vanished change, NaN, undeclared tuned parts)."""

    title = "plan refused"


class BuildError(HubsyncError):
    """Writing the output failed or was refused (locked, no space)."""

    title = "build failed"


class VerifyError(HubsyncError):
    """Verification could not run or failed."""

    title = "verification failed"


class PushError(HubsyncError):
    """Publishing failed; the remote repo is left as it was."""

    title = "push failed"


class RecordError(HubsyncError):
    """A build folder's record (hubsync.json) or hubsync's own bookkeeping is missing or damaged."""

    title = "build record unreadable"
