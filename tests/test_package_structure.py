"""The package's structure: no import cycles, no private cross-module imports,
and model families named only in their own modules."""

import ast
import os
import re

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nbn_keras")


def module_files():
    """`{dotted module name: path}` of every module of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports_at_import_time(tree, modules):
    """The package modules a module imports when it is imported, with the names."""
    found = []
    for node in tree.body:
        for statement in node.body if isinstance(node, ast.If) else [node]:
            if isinstance(statement, ast.ImportFrom) and (statement.module or "").startswith(
                    "nbn_keras"):
                for alias in statement.names:
                    full = f"{statement.module}.{alias.name}"
                    found.append((full if full in modules else statement.module, alias.name))
            elif isinstance(statement, ast.Import):
                found += [(a.name, None) for a in statement.names
                          if a.name.startswith("nbn_keras")]
    return found


def import_graph():
    modules = module_files()
    return {name: {target for target, _ in imports_at_import_time(
                       ast.parse(open(path).read()), modules)
                   if target in modules and target not in (name, "nbn_keras")}
            for name, path in modules.items()}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_from_another_module():
    modules = module_files()
    private = [f"{name}: from {target} import {imported}"
               for name, path in modules.items()
               for target, imported in imports_at_import_time(ast.parse(open(path).read()),
                                                              modules)
               if imported and imported.startswith("_")]
    assert private == []


@pytest.mark.parametrize("family, folder", [("ride", "models/ride")])
def test_a_family_is_named_only_in_its_own_folder(family, folder):
    quoted = re.compile(rf"""["']{family}["']|\b{family}\.ARCHITECTURES\b""")
    found = []
    for name, path in module_files().items():
        if not os.path.relpath(path, PACKAGE).startswith(folder + os.sep):
            found += [f"{name}:{number}" for number, line in enumerate(open(path), 1)
                      if quoted.search(line) and not line.lstrip().startswith(("#", ">>>"))]
    assert found == []


def imported_modules(path):
    """Every module a file imports, anywhere in it (functions and scripts in strings aside)."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_test_modules_share_code_only_through_helper_modules():
    # Shared code lives in tests/helpers.py and the reference modules, so a
    # test module can change without breaking another. The one exception is the
    # table that gathers every module's bad-input cases.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    offenders = {}
    for name in sorted(os.listdir(tests_dir)):
        if name.endswith(".py") and name != "test_bad_input_table.py":
            imported = {m for m in imported_modules(os.path.join(tests_dir, name))
                        if re.fullmatch(r"tests\.(test_\w+|conftest)", m)}
            if imported:
                offenders[name] = sorted(imported)
    assert offenders == {}
