"""Every Hub call of `push` and `status` goes through `call`: bounded retries, then one line that names the step.

Retries. A 408, 429 (its Retry-After honoured, up to MAX_RETRY_AFTER_S), 5xx, or a refused, dropped or timed-out
connection is retried at most RETRIES times, 0.5, 1, 2, 4 and 8 s apart, and no retry starts once STEP_BUDGET_S
have passed since the step's first attempt. Steps that huggingface_hub already retries itself (preupload, the
LFS transfers, tree listings: 5 retries, 1 to 8 s apart) are called with `retry=False`, so that the two kinds
of retries never multiply.

Failures. Whatever the Hub or the network raises becomes a `HubFailure`: a PushError whose one line names the
step, the repo, the HTTP status (or what happened to the connection), the retries made and what to do. The cause
stays attached (`cause`, `status`) for the callers that treat some answers as facts (404: no such repo; 409: the
tag exists). Anything else, a bug, keeps its traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hubsync.errors import HubsyncError, PushError

log = logging.getLogger("hubsync")
R = TypeVar("R")

RETRIES = 5
CLIENT_RETRIES = 5  # what huggingface_hub's own backoff does on the steps it retries itself
STEP_BUDGET_S = 60.0
MAX_RETRY_AFTER_S = 30.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSPORT_ERRORS = frozenset({"TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError"})

# Which step a request belongs to, by its URL, for calls that make several kinds of request (create_commit
# validates the card, looks up and duplicates copy sources, then commits; preupload_lfs_files asks the upload
# modes, then transfers the LFS objects).
_STEPS_BY_URL = (
    ("/lfs-files/duplicate", "duplicate"),
    ("/paths-info/", "duplicate"),
    ("/api/validate-yaml", "card check"),
    ("/preupload/", "preupload"),
    ("/info/lfs/objects", "LFS upload"),
    ("/lfs-upload/", "LFS upload"),
    ("/commit/", "commit"),
)
STEPS_THAT_SPLIT = ("commit", "upload")


def hub_api() -> Any:
    from hubsync.resolve import offline

    if offline():
        raise PushError(
            "HF_HUB_OFFLINE=1 is set, and talking to the Hub needs the network: unset HF_HUB_OFFLINE"
        )
    from huggingface_hub import HfApi

    return HfApi()


class HubFailure(PushError):
    """A Hub call that failed for good; `step`, `status` and `cause` say how."""

    title = "hub call failed"

    def __init__(
        self, step: str, repo: str, cause: BaseException, *, retries: int, seconds: float, outcome: str = ""
    ) -> None:
        self.step = step
        self.repo = repo
        self.cause = cause
        self.retries = retries
        self.seconds = seconds
        self.outcome = outcome
        self.status = status_of(cause)
        retried = (
            f", after {retries} {'retry' if retries == 1 else 'retries'} in {seconds:.0f} s"
            if retries
            else ""
        )
        super().__init__(
            f"{step} failed for {repo} ({describe(cause)}{retried}){outcome}: {_what_to_do(cause, repo)}"
        )

    def with_outcome(self, outcome: str) -> HubFailure:
        """The same failure, saying what state it left the repo in ("; nothing was published")."""
        return HubFailure(
            self.step, self.repo, self.cause, retries=self.retries, seconds=self.seconds, outcome=outcome
        )


def call(
    step: str,
    repo: str,
    fn: Callable[[], R],
    *,
    retry: bool = True,
    recover: Callable[[BaseException], R | None] | None = None,
) -> R:
    """`fn()`, retried on transient failures. `recover(err)`, when given, runs before each retry and may return
    the result after all (a commit whose answer was lost, but which the Hub applied)."""
    started = time.monotonic()
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except HubsyncError:
            raise
        except Exception as err:
            cause = hub_cause(err)
            if cause is None:
                raise  # not the Hub's doing: a bug, with its traceback
            seconds = time.monotonic() - started
            delay = retry_delay(cause, attempt)
            if not retry or not is_transient(cause) or attempt == RETRIES or seconds + delay > STEP_BUDGET_S:
                retries = attempt if retry else (CLIENT_RETRIES if is_transient(cause) else 0)
                failed = step_of(cause, step)
                raise HubFailure(failed, repo, cause, retries=retries, seconds=seconds) from err
            if recover is not None:
                recovered = recover(cause)
                if recovered is not None:
                    return recovered
            log.warning("%s: %s; retrying in %.1f s", step, describe(cause), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def hub_cause(err: BaseException) -> BaseException | None:
    """The HTTP or network error behind `err` (huggingface_hub wraps a failed LFS transfer in a RuntimeError),
    or None when the Hub had no part in it."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if status_of(current) is not None or _is_transport_error(current):
            return current
        # `raise X from None` says the error before it is not the cause: do not look behind it either
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def _is_transport_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & _TRANSPORT_ERRORS) or isinstance(err, (ConnectionError, TimeoutError))


def status_of(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(err: BaseException) -> bool:
    status = status_of(err)
    return status in _TRANSIENT_STATUS if status is not None else _is_transport_error(err)


def url_of(err: BaseException) -> str:
    """The URL of the request that failed, or "" when the error does not carry it."""
    response = getattr(err, "response", None)
    request = getattr(response, "request", None) if response is not None else None
    if request is None:
        try:
            request = getattr(err, "request", None)
        except RuntimeError:  # httpx raises when an error was made without its request
            request = None
    return str(getattr(request, "url", "") or "")


def step_of(err: BaseException, default: str) -> str:
    """The step a failed request belongs to, for calls that make several kinds of request."""
    if default not in STEPS_THAT_SPLIT:
        return default
    url = url_of(err)
    return next((step for part, step in _STEPS_BY_URL if part in url), default)


def describe(err: BaseException) -> str:
    """What went wrong, in a few words: "HTTP 503", "HTTP 403: <the Hub's message>", "connection refused"."""
    status = status_of(err)
    if status is not None:
        message = " ".join(str(getattr(err, "server_message", "") or "").split())
        return f"HTTP {status}: {message[:160]}" if message and status < 500 else f"HTTP {status}"
    names = {cls.__name__ for cls in type(err).__mro__}
    if _cannot_connect(err):
        url = url_of(err)
        return f"cannot connect to {'/'.join(url.split('/')[:3])}" if url else "cannot connect"
    if "TimeoutException" in names or isinstance(err, TimeoutError):
        return "timed out"
    if names & {"RemoteProtocolError", "ReadError", "WriteError"} or isinstance(err, ConnectionError):
        return "connection dropped"
    return type(err).__name__


def _cannot_connect(err: BaseException) -> bool:
    return "ConnectError" in {cls.__name__ for cls in type(err).__mro__} or isinstance(
        err, ConnectionRefusedError
    )


def retry_delay(err: BaseException, attempt: int) -> float:
    backoff = min(0.5 * 2**attempt, 8.0)
    response = getattr(err, "response", None)
    header = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return min(float(header), MAX_RETRY_AFTER_S) if header is not None else backoff
    except ValueError:
        return backoff


def _what_to_do(err: BaseException, repo: str) -> str:
    status = status_of(err)
    if status == 401:
        return "set HF_TOKEN to a valid write token"
    if status == 403:
        return f"use a token that can write to {repo.split('/')[0]}"
    if status == 404:
        return f"check the repo id {repo} and that your token can see it"
    if status is not None and status < 500 and status not in _TRANSIENT_STATUS:
        return "fix what the Hub says, then run the command again"
    if _cannot_connect(err):
        return "check HF_ENDPOINT and the network, then run the command again"
    return "the Hub may be down or overloaded; run the command again later (it is safe to rerun)"
