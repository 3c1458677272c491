"""The package's shape, checked: the pipeline's layering, no import circles, short functions, no reaching into
another module's private names, and one style for every error message."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import hubsync
from hubsync.errors import HubsyncError

PACKAGE = Path(hubsync.__file__).parent
# The pipeline, bottom to top: a module may import its own layer's modules and those below, never above.
# (`testing` ships the emulator and fixtures; only the demo and tests use it.)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hubsync", "errors", "fsio", "progress", "yaml_limits", "formats", "tuned", "chunks", "prefill"),
    ("tensors",),
    ("record",),
    ("manifest",),
    ("safety",),
    ("resolve", "remote"),
    ("names",),
    ("adapters",),
    ("finetune",),
    ("compare", "sample"),
    ("plan",),
    ("card",),
    ("write",),
    ("verify",),
    ("build",),
    ("push",),
    ("doctor",),
    ("testing",),
    ("demo",),
    ("ci",),
    ("cli", "__main__"),
)
MAX_FUNCTION_LINES = 80
MESSAGE_ERRORS = {cls.__name__ for cls in HubsyncError.__subclasses__()} | {"HubsyncError"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "hubsync"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hubsync"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("hubsync")]
    return out


def _target(module: str, names: list[str], known: set[str]) -> list[str]:
    """`from hubsync import tensors` imports the module hubsync.tensors, not the package."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
    return subs or [module]


def test_no_module_imports_one_above_it_in_the_pipeline() -> None:
    modules = _modules()
    wrong = []
    for name, tree in modules.items():
        if name.startswith("hubsync.testing"):
            continue
        for module, names, line in _imports(tree):
            for target in _target(module, names, set(modules)):
                if _layer(target) > _layer(name):
                    wrong.append(f"{name}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {
        name: {t for m, n, _ in _imports(tree) for t in _target(m, n, set(modules)) if t != name}
        for name, tree in modules.items()
    }
    # verify/__init__ re-exports its stages: a package importing its own submodules is not a circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") or name.startswith(t + "."))}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def test_functions_are_short() -> None:
    long = {}
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = lines
    assert not long, "\n".join(f"{k}: {v} lines" for k, v in long.items())


def test_no_module_imports_another_modules_private_names() -> None:
    private = []
    for name, tree in _modules().items():
        for module, names, line in _imports(tree):
            for imported in names:
                if (
                    imported.startswith("_")
                    and not imported.startswith("__")
                    and module.split(".")[:2] != name.split(".")[:2]
                ):
                    private.append(f"{name}:{line} imports {module}.{imported}")
    assert not private, "\n".join(private)


def _message_head(node: ast.expr) -> str | None:
    """The literal text of an error message, with `{}` for each interpolation; None when it is not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)  # type: ignore[misc]
    if isinstance(node, ast.BinOp):
        left, right = _message_head(node.left), _message_head(node.right)
        return left + right if left is not None and right is not None else left
    return None


def _style_problem(text: str) -> str | None:
    first = text.lstrip().split(" ", 1)[0]
    if first[:1].isupper() and not first.replace("_", "").replace("=", "").isupper():
        return "starts with a capital (messages start lower-case)"
    if ": " not in text and not text.startswith(
        "{}"
    ):  # `{}...`: a message built on another one, checked there
        return "has no ': ' between what is wrong and what to do"
    if text.rstrip().endswith("."):
        return "ends with a period"
    return None


def test_every_error_message_has_one_style() -> None:
    found = []
    for name, tree in _modules().items():
        if name.startswith("hubsync.testing"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called not in MESSAGE_ERRORS or called == "ManifestError":
                continue
            text = _message_head(node.args[0])
            problem = None if text is None or text == "{} {}" else _style_problem(text)
            if problem:
                found.append(f"{name}:{node.lineno}: {text[:70]!r} {problem}")
    assert not found, "\n".join(found)


def test_every_error_class_has_its_own_title() -> None:
    for info in pkgutil.walk_packages(hubsync.__path__, "hubsync."):
        if not info.name.startswith("hubsync.testing") and info.name != "hubsync.__main__":
            importlib.import_module(info.name)
    seen: dict[str, str] = {}
    stack = list(HubsyncError.__subclasses__())
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        assert "title" in vars(cls), f"{cls.__name__} has no title of its own"
        assert cls.title == cls.title.lower() and cls.title, cls.__name__
        assert cls.title not in seen, f"{cls.__name__} and {seen[cls.title]} share the title {cls.title!r}"
        seen[cls.title] = cls.__name__


def test_the_style_check_can_fail() -> None:
    assert _style_problem("Base folder x does not exist: check it") is not None
    assert _style_problem("base folder x does not exist; check it") is not None
    assert _style_problem("base folder x does not exist: check it.") is not None
    assert _style_problem("HF_TOKEN is not set: set it") is None
