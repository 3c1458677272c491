"""YAML read with bounds: a manifest is a few hundred bytes, so a file far larger than that, aliases that expand
into millions of nodes (a "billion laughs" of 700 bytes), a recursive alias or nesting deep enough to exhaust
the stack is refused with one line before anything walks or validates the document.

PyYAML's composer keeps an alias as a second reference to the same node, so composing is cheap; it is every
walk over the result (the loader's objects, the schema validation, the line map) that would expand it. The
document's size *as if expanded* is therefore measured on the node graph first, each node counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

MAX_MANIFEST_BYTES = 256 * 1024
MAX_EXPANDED_NODES = 10_000  # a real manifest has well under a hundred


@dataclass
class YamlLimitError(Exception):
    """The document breaks a bound; `line` is where (1-based), when known."""

    message: str
    line: int | None = None


def compose_bounded(text: str) -> yaml.Node | None:
    """Compose `text` with the safe loader and check its expanded size. Raises yaml.YAMLError for invalid
    YAML and YamlLimitError for a document that breaks a bound."""
    if len(text.encode("utf-8")) > MAX_MANIFEST_BYTES:
        raise YamlLimitError(_too_large(len(text.encode("utf-8"))))
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise YamlLimitError("nests too deeply to be a manifest: flatten it") from None
    if node is not None:
        _Expansion().size(node)
    return node


def _too_large(size: int) -> str:
    return (
        f"is {size:,} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES // 1024} KiB): "
        "check that this is the manifest file"
    )


def check_file_size(size: int) -> None:
    """Refuse a manifest file by its size, before reading it."""
    if size > MAX_MANIFEST_BYTES:
        raise YamlLimitError(_too_large(size))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


class _Expansion:
    """The number of nodes a document would have with every alias expanded, computed without expanding:
    each node's size is computed once (iteratively, so deep nesting cannot exhaust the stack)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}

    def size(self, root: yaml.Node) -> int:
        active: set[int] = set()
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, children_done = stack.pop()
            key = id(node)
            if key in self.sizes:
                continue
            if children_done:
                active.discard(key)
                self._settle(node)
                continue
            if key in active:
                raise YamlLimitError(
                    "uses an alias inside its own anchor (a recursive alias): write the values out",
                    node.start_mark.line + 1,
                )
            active.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in self.sizes)
        return self.sizes[id(root)]

    def _settle(self, node: yaml.Node) -> None:
        total = 1 + sum(self.sizes[id(child)] for child in _children(node))
        if total > MAX_EXPANDED_NODES:
            raise YamlLimitError(
                f"uses aliases (*name) that expand to more than {MAX_EXPANDED_NODES:,} values: "
                "write the values out instead of repeating anchors",
                node.start_mark.line + 1,
            )
        self.sizes[id(node)] = total
