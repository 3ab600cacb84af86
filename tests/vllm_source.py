"""Checks megatron_prime's vLLM registry (rollout/vllm_api.py) against vLLM *source text*,
parsed with ``ast`` and never imported: the pinned CUDA wheel cannot be imported on a CPU
machine, and reading its source is enough to see that a class, method, keyword, attribute or
environment variable still exists. The installed-build test uses the same functions for the
entries ``inspect.signature`` cannot answer (attributes, literals, what a function reads).
"""

from __future__ import annotations

import ast
from typing import Callable

from megatron_prime.rollout.vllm_api import VLLM_API, VllmName

# module name -> parsed source; returns None where the module is not in the source tree.
ModuleSource = Callable[[str], "ast.Module | None"]


def module_path_candidates(module: str) -> tuple[str, str]:
    """Where a module's source lies in a wheel or site-packages: ``a/b.py`` or ``a/b/__init__.py``."""
    base = module.replace(".", "/")
    return f"{base}.py", f"{base}/__init__.py"


def find_definition(tree: ast.Module, qualname: str) -> ast.AST | None:
    """The class or function ``qualname`` (``Class.method``) at the top of ``tree``."""
    scope: list[ast.stmt] = tree.body
    found: ast.AST | None = None
    for part in qualname.split("."):
        found = next((node for node in scope if isinstance(
            node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == part), None)
        if found is None:
            return None
        scope = found.body
    return found


def parameters_of(node: ast.AST) -> tuple[set[str], bool]:
    """(parameter names, takes ``**kwargs``) of a function, or of a class: its ``__init__``,
    else its annotated fields (a dataclass or msgspec struct)."""
    if isinstance(node, ast.ClassDef):
        init = next((item for item in node.body if isinstance(item, ast.FunctionDef)
                     and item.name == "__init__"), None)
        if init is None:
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)}, False
        node = init
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    arguments = node.args
    names = {arg.arg for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    return names, arguments.kwarg is not None


def sets_attribute(class_node: ast.ClassDef, name: str) -> bool:
    """``self.<name> = ...`` (or annotated) in any method, or ``<name>: T`` in the class body."""
    for item in class_node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                and item.target.id == name:
            return True
    for node in ast.walk(class_node):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == name \
                    and isinstance(target.value, ast.Name) and target.value.id == "self":
                return True
    return False


def references(node: ast.AST, name: str) -> bool:
    """The body reads attribute ``name``: ``x.name`` or ``getattr(x, "name", ...)``."""
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and child.attr == name:
            return True
        if isinstance(child, ast.Constant) and child.value == name:
            return True
    return False


def literal_values(tree: ast.Module, alias: str) -> set[object] | None:
    """The string values of ``alias = Literal[...]`` at module level; None if no such alias."""
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == alias and node.value is not None:
            return {child.value for child in ast.walk(node.value) if isinstance(child, ast.Constant)}
    return None


def dict_keys(tree: ast.Module) -> set[object]:
    """Every constant key of every dict literal in the module (vllm.envs: name -> reader)."""
    return {key.value for node in ast.walk(tree) if isinstance(node, ast.Dict)
            for key in node.keys if isinstance(key, ast.Constant)}


def reexports(tree: ast.Module, name: str, defining_module: str, package: str) -> bool:
    """``package`` binds ``name``: defines it, imports it, or maps it lazily by string
    (vllm/__init__.py: ``"LLM": ".entrypoints.llm:LLM"``)."""
    if find_definition(tree, name) is not None:
        return True
    relative = "." + defining_module.removeprefix(package + ".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(alias.name == name for alias in node.names):
            return True
        if isinstance(node, ast.Constant) and node.value in (f"{relative}:{name}",
                                                             f"{defining_module}:{name}"):
            return True
    return False


def check_source(source: ModuleSource, registry: tuple[VllmName, ...] = VLLM_API) -> list[str]:
    """One line per registry entry the source does not satisfy (empty: all present)."""
    problems = []
    by_key = {entry.key: entry for entry in registry}
    for entry in registry:
        tree = source(entry.module)
        where = f"{entry.key}"
        if tree is None:
            problems.append(f"{where}: module {entry.module} not found")
            continue
        for imported in entry.imported_as:
            package, _, name = imported.rpartition(".")
            if name != entry.qualname.split(".")[0]:
                problems.append(f"{where}: imported_as {imported} names another object")
            elif package != entry.module:
                package_tree = source(package)
                if package_tree is None or not reexports(package_tree, name, entry.module, package):
                    problems.append(f"{where}: {package} no longer exports {name}")
        if entry.kind == "environment":
            if entry.qualname not in dict_keys(tree):
                problems.append(f"{where}: vLLM no longer reads {entry.qualname}")
            continue
        if entry.kind == "literal":
            values = literal_values(tree, entry.qualname)
            if values is None:
                problems.append(f"{where}: no Literal alias {entry.qualname}")
            else:
                problems += [f"{where}: {value!r} is not one of its values"
                             for value in entry.parameters if value not in values]
            continue
        if entry.kind == "attribute":
            owner, _, attribute = entry.qualname.rpartition(".")
            class_node = find_definition(tree, owner)
            if not isinstance(class_node, ast.ClassDef) or not sets_attribute(class_node, attribute):
                problems.append(f"{where}: {owner} has no attribute {attribute}")
            continue
        if entry.inherited_from:
            owner, _, method = entry.qualname.partition(".")
            base_module, base = entry.inherited_from.split(":")
            class_node = find_definition(tree, owner)
            if not isinstance(class_node, ast.ClassDef) or base not in {
                    ast.unparse(b).rpartition(".")[2] for b in class_node.bases}:
                problems.append(f"{where}: {owner} no longer inherits {base}")
                continue
            base_tree = source(base_module)
            node = None if base_tree is None else find_definition(base_tree, f"{base}.{method}")
            if node is None:
                problems.append(f"{where}: {base} in {base_module} has no {method}")
                continue
        else:
            node = find_definition(tree, entry.qualname)
        if node is None:
            problems.append(f"{where}: not defined in {entry.module}")
            continue
        if entry.kind == "reads":
            problems += [f"{where}: no longer reads .{name}" for name in entry.parameters
                         if not references(node, name)]
            continue
        names, var_keyword = parameters_of(node)
        missing = [name for name in entry.parameters if name not in names]
        if missing and var_keyword and entry.forwards_to:
            target = by_key.get(entry.forwards_to)
            target_tree = source(entry.forwards_to.split(":")[0])
            target_node = None if target_tree is None else \
                find_definition(target_tree, entry.forwards_to.split(":")[1])
            target_names = set() if target_node is None else parameters_of(target_node)[0]
            if target is None:
                problems.append(f"{where}: forwards_to {entry.forwards_to} is not in the registry")
            missing = [name for name in missing if name not in target_names]
        problems += [f"{where}: no parameter {name!r}" for name in missing]
    return problems
