"""Tuned prefixes: what a `finetune.tuned` entry matches, whether it was written as meant, and which prefixes to
propose when none are declared.

An entry is a prefix of base tensor names that ends at a name boundary (`vpm.`, `resampler.`, or a whole tensor
name such as `image_newline`), or, written `re:<pattern>`, a Python regular expression matched at the start of
the name (`re.match`): `re:vision_tower\\.vision_model\\.encoder\\.layers\\.(2[0-3])\\.`. A plain entry that stops
inside a name (`v` for `vpm.`) is a mistake, not a pattern: the plan refuses it and names the module meant.
Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

REGEX_MARK = "re:"
# A proposed module may hold tensors that did not move (bf16 LayerNorm weights at a small learning rate), but
# not much of itself: above this share of its parameters unmoved, the proposal goes one level down.
MAX_UNMOVED_SHARE = 0.25


def is_regex(prefix: str) -> bool:
    return prefix.startswith(REGEX_MARK)


def matches(prefix: str, name: str) -> bool:
    """Whether the tuned entry `prefix` covers the tensor `name`."""
    if is_regex(prefix):
        return re.match(prefix[len(REGEX_MARK) :], name) is not None
    return name.startswith(prefix)


def first_match(name: str, prefixes: Iterable[str]) -> str | None:
    return next((p for p in prefixes if matches(p, name)), None)


def regex_error(prefix: str) -> str | None:
    """Why a `re:` entry is not a usable pattern, or None (for the manifest's validation)."""
    if not is_regex(prefix):
        return None
    try:
        re.compile(prefix[len(REGEX_MARK) :])
    except re.error as err:
        return f"'{prefix}' is not a valid regular expression ({err})"
    return None


# --------------------------------------------------------------------------------------------------------------
# Hygiene: a plain prefix must end at a name boundary


def _at_boundary(prefix: str, name: str) -> bool:
    return prefix.endswith(".") or name == prefix or name[len(prefix)] == "."


def _completed(prefix: str, name: str) -> str:
    """The module (or tensor) name that `prefix` stops inside: `v` in `vpm.embeddings.x` -> `vpm.`."""
    end = name.find(".", len(prefix))
    return name if end < 0 else name[: end + 1]


def boundary_problems(tuned: Iterable[str], base_names: Iterable[str]) -> list[str]:
    """One problem per plain tuned prefix that matches base names only part-way through a name segment."""
    names = list(base_names)
    problems = []
    for prefix in tuned:
        if is_regex(prefix):
            continue
        inside = sorted(
            {_completed(prefix, n) for n in names if n.startswith(prefix) and not _at_boundary(prefix, n)}
        )
        if inside:
            meant = " or ".join(f"`{m}`" for m in inside[:3]) + (" (...)" if len(inside) > 3 else "")
            problems.append(
                f"tuned prefix '{prefix}' stops inside a name ({', '.join(inside[:3])}): did you mean {meant}? "
                f"A prefix ends at a dot or is a whole tensor name; write `{REGEX_MARK}<pattern>` for a regex"
            )
    return problems


# --------------------------------------------------------------------------------------------------------------
# Proposals: modules, not tensors


def propose_modules(changed: Iterable[str], sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The `tuned` prefixes for a fine-tune whose changed tensors are `changed`, given every base tensor's size.

    Top-down: a module with changed tensors is proposed whole when at most `MAX_UNMOVED_SHARE` of its parameters
    did not move (bf16 LayerNorm weights that a small learning rate never moves stay inside it); otherwise its
    sub-modules are considered, and a changed tensor held directly is proposed by its own name."""
    moved = set(changed)
    proposals: list[str] = []
    _propose("", moved, sizes, proposals)
    return tuple(sorted(proposals))


def _propose(prefix: str, moved: set[str], sizes: Mapping[str, int], out: list[str]) -> None:
    children: dict[str, list[str]] = {}
    for name in sizes:
        if name.startswith(prefix):
            head, dot, _ = name[len(prefix) :].partition(".")
            children.setdefault(prefix + head + dot, []).append(name)
    for child, names in sorted(children.items()):
        if not any(n in moved for n in names):
            continue
        if not child.endswith("."):  # a tensor held directly by the module
            out.append(child)
            continue
        total = sum(sizes[n] for n in names)
        unmoved = sum(sizes[n] for n in names if n not in moved)
        if unmoved <= MAX_UNMOVED_SHARE * total:
            out.append(child)
        else:
            _propose(child, moved, sizes, out)


def unmoved_under(
    prefixes: Iterable[str], changed: Iterable[str], names: Iterable[str]
) -> dict[str, list[str]]:
    """For each proposed prefix, the tensors under it that did not move (for a note: kept from the base)."""
    moved, every = set(changed), list(names)
    found: dict[str, list[str]] = {}
    for prefix in prefixes:
        still = sorted(n for n in every if matches(prefix, n) and n not in moved)
        if still:
            found[prefix] = still
    return found
