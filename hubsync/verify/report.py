"""The verification report: the checks as they come in, their rendering, and the record they become."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubsync import progress
from hubsync.record import CheckResult, Verification

log = logging.getLogger("hubsync")
_MARK = {True: "pass", False: "FAIL", None: "skip"}


@dataclass
class Report:
    """Checks in the order they ran, plus what stays local (timings, peak memory)."""

    folder: Path
    device: str = "cpu"
    device_map: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    local_runtime: dict[str, Any] | None = None  # the runtime with its interpreter path: kept on this machine

    @property
    def passed(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.ok is False]

    def add(
        self,
        name: str,
        ok: bool | None,
        detail: str,
        evidence: list[str] | None = None,
        **figures: Any,
    ) -> CheckResult:
        check = CheckResult(name, ok, detail, tuple(evidence or ()), figures)
        self.checks.append(check)
        log.debug("%s %s: %s", _MARK[ok], name, detail)
        return check

    def check(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name), None)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with progress.stage(f"verify: {step}", unit="step"):
                yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - start

    def verification(self, files_sha256: Mapping[str, str]) -> Verification:
        """The part of the report that is published: results, never timings."""
        return Verification(
            passed=self.passed,
            device=self.device,
            device_map=self.device_map,
            runtime=dict(self.runtime),
            versions=dict(self.versions),
            checks=tuple(self.checks),
            files_sha256=dict(files_sha256),
        )

    def to_json(self, files_sha256: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The report for `--json`: the published verification plus this run's timings and memory."""
        data = self.verification(files_sha256 or {}).to_json()
        data["timings_s"] = {k: round(v, 3) for k, v in self.timings.items()}
        data["peak_memory_bytes"] = dict(self.memory)
        return data


def render_report(report: Report) -> str:
    lines = [
        f"verify {report.folder} on {report.device}"
        + (f" ({report.device_map})" if report.device_map else "")
    ]
    for c in report.checks:
        lines.append(f"  {_MARK[c.ok]}  {c.name}: {c.detail}")
        if c.ok is False:
            lines += [f"          {e}" for e in c.evidence[:5]]
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    if report.memory:
        lines.append("peak memory: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in report.memory.items()))
    lines.append("PASSED" if report.passed else f"FAILED: {summary_line(report)}")
    return "\n".join(lines)


def summary_line(report: Report) -> str:
    failures = report.failures
    return "verification passed" if not failures else f"{failures[0].name}: {failures[0].detail}"
