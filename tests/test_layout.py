"""The single file reads top to bottom: sections in the documented order, definitions before use."""

import ast
import inspect
import re
import typing
from pathlib import Path

import score

SOURCE = Path(score.__file__).read_text()
TREE = ast.parse(SOURCE)
HEADER = re.compile(r"^# ── (.+?) ─+$", re.MULTILINE)


def annotations(tree: ast.AST) -> set[int]:
    """Ids of the nodes inside type annotations: they document, they do not run."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    inside.update(id(n) for n in ast.walk(arg.annotation))
            if node.returns is not None:
                inside.update(id(n) for n in ast.walk(node.returns))
        elif isinstance(node, ast.AnnAssign):
            inside.update(id(n) for n in ast.walk(node.annotation))
    return inside


def top_level_names(statement: ast.stmt) -> list[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, ast.Assign):
        return [n.id for target in statement.targets for n in ast.walk(target) if isinstance(n, ast.Name)]
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return [statement.target.id]
    return []


def test_every_name_is_defined_above_its_first_use():
    defined_at = {}
    for index, statement in enumerate(TREE.body):
        for name in top_level_names(statement):
            defined_at.setdefault(name, index)
    skip = annotations(TREE)
    early = []
    for index, statement in enumerate(TREE.body):
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in skip \
                    and defined_at.get(node.id, -1) > index:
                early.append(f"line {node.lineno}: {node.id}")
    assert early == [], "used above their definition:\n" + "\n".join(early)


def test_sections_come_in_the_order_the_docstring_gives():
    layout = SOURCE.split("Layout of this file", 1)[1].split('"""', 1)[0]
    documented = [part.strip() for part in re.split(r"·|\n", layout.split(":", 1)[1]) if part.strip()]
    assert HEADER.findall(SOURCE) == documented


def test_each_section_says_what_it_is_for():
    lines = SOURCE.splitlines()
    for number, line in enumerate(lines):
        if HEADER.match(line):
            purpose = lines[number + 1]
            assert purpose.startswith("# ") and len(purpose) > 12, f"section {line!r} has no one-line purpose"


def test_no_function_needs_more_than_a_screen():
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(TREE)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert long == []


def test_no_local_name_hides_a_module_level_one():
    module = {name for statement in TREE.body for name in top_level_names(statement)}
    hidden = set()
    for node in ast.walk(TREE):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and arg.arg in module:
                    hidden.add(f"parameter {arg.arg} (line {node.lineno})")
            for inner in ast.walk(node):
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store) and inner.id in module:
                    hidden.add(f"local {inner.id} (line {inner.lineno})")
    assert hidden == set()


def module_functions() -> list[tuple[str, object]]:
    """Every top-level function, class and method of score.py, by qualified name."""
    found = []
    for name, value in vars(score).items():
        if getattr(value, "__module__", None) != "score":
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            found.append((name, value))
        if inspect.isclass(value):
            for attribute, member in vars(value).items():
                member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(member):
                    found.append((f"{name}.{attribute}", member))
    return found


def test_every_annotation_names_something_defined():
    unresolved = []
    for name, value in module_functions():
        try:
            typing.get_type_hints(value)
        except NameError as error:
            unresolved.append(f"{name}: {error}")
    assert len(module_functions()) > 100
    assert unresolved == []
