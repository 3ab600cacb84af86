"""Finds, by reading the project's source with ``ast``, every vLLM name it uses, and reports
the uses that rollout/vllm_api.py does not list: the registry then cannot fall behind the code.

What counts as a use:
- ``from vllm... import X`` / ``vllm.X``: X must be registered under that import path;
- a call of an imported vLLM callable, or of a method reached from one: its keywords, and the
  keys of a dict unpacked into it (``LLM(**kwargs)``: ``kwargs = dict(...)``,
  ``kwargs.update(...)``, ``kwargs["k"] = ...`` in the same module);
- attribute chains on an object of a registered vLLM class (``self.llm.llm_engine
  .engine_core.shutdown()``): the object's type comes from the assignment (``llm = LLM(...)``,
  ``self.llm = self._start_llm(...)`` where that function returns ``LLM(...)``), each step from
  the registry's ``value_type``;
- the worker extension named by ``worker_extension_cls``: ``self.X`` that the class does not
  define itself is vLLM's Worker's;
- a method overriding one of a subclassed vLLM class (its parameter names), and attributes
  set on the ``layer`` such a method receives (vLLM must still read them: a ``reads`` entry);
- constant values of ``LITERAL_KEYWORDS`` (``logprobs_mode="processed_logprobs"``);
- any ``VLLM_*`` name in a string (an environment variable vLLM reads).

Not followed: values vLLM returns (``RequestOutput`` fields are registered by hand).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_prime.rollout.vllm_api import LITERAL_KEYWORDS, VLLM_API, WORKER, VllmName

ROOT = Path(__file__).resolve().parents[1]
# The project's own code that runs vLLM (tests/workers start real engines on a GPU).
SOURCE_FOLDERS = ("megatron_prime", "benchmarks", "tools", "examples", "tests/workers")
_ENVIRONMENT_NAME = re.compile(r"\bVLLM_[A-Z0-9_]*[A-Z0-9]\b")
_SELF_NAMES = ("self", "cls")


REGISTRY_FILE = ROOT / "megatron_prime" / "rollout" / "vllm_api.py"


def project_files(root: Path = ROOT) -> list[Path]:
    """The files to scan (not the registry itself, whose strings name what it lists)."""
    return sorted(path for folder in SOURCE_FOLDERS for path in (root / folder).rglob("*.py")
                  if path != REGISTRY_FILE)


@dataclass
class Registry:
    entries: dict[str, VllmName]
    imports: dict[str, str]  # import path ("vllm.LLM") -> "module:Name"

    @classmethod
    def of(cls, names: tuple[VllmName, ...]) -> "Registry":
        imports = {path: f"{name.module}:{path.rpartition('.')[2]}"
                   for name in names for path in name.imported_as}
        return cls({name.key: name for name in names}, imports)

    def member(self, type_key: str, attribute: str) -> VllmName | None:
        return self.entries.get(f"{type_key}.{attribute}")


class _ModuleScan:
    """The uses in one module (see the module docstring); ``problems`` collects the misses."""

    def __init__(self, path: Path, tree: ast.Module, registry: Registry, worker_extensions: set[str]):
        self.path, self.tree, self.registry = path, tree, registry
        self.problems: list[str] = []
        self.local_names: dict[str, str] = {}  # name bound by an import -> "module:Name"
        self.module_aliases: set[str] = set()  # names bound to the vllm package itself
        self.returns: dict[str, str] = {}  # function name -> type of the vLLM object it returns
        self.self_types: dict[str, str] = {}  # self.<attribute> -> type
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        self.worker_classes = {name.rpartition(".")[2] for name in worker_extensions
                               if name.rpartition(".")[0] == module}

    def where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"

    def miss(self, node: ast.AST, text: str) -> None:
        self.problems.append(f"{self.where(node)}: {text} (not in rollout/vllm_api.py)")

    # ---- the pieces ----

    def scan(self) -> list[str]:
        self._imports()
        self._environment_names()
        if not (self.local_names or self.module_aliases or self.worker_classes):
            return self.problems  # no vLLM object can reach this module's code
        self._owners = {id(item): node for node in ast.walk(self.tree)
                        if isinstance(node, ast.ClassDef) for item in node.body}
        self._function_returns()
        self._self_attributes()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ClassDef):
                self._subclass(node)
            if isinstance(node, ast.FunctionDef):
                self._function(node)
        return self.problems

    def _imports(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    path = f"{node.module}.{alias.name}"
                    if path not in self.registry.imports:
                        self.miss(node, f"import {path}")
                    else:
                        self.local_names[alias.asname or alias.name] = self.registry.imports[path]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vllm":
                        self.module_aliases.add((alias.asname or alias.name).split(".")[0])

    def _type_of_call(self, call: ast.Call) -> str | None:
        """The vLLM type a call returns: a registered class, or a function returning one."""
        func = call.func
        if isinstance(func, ast.Name) and func.id in self.local_names:
            return self.local_names[func.id]
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id in self.module_aliases:
                return self.registry.imports.get(f"vllm.{func.attr}")
            if func.value.id in _SELF_NAMES:
                return self.returns.get(func.attr)
        if isinstance(func, ast.Name):
            return self.returns.get(func.id)
        return None

    def _function_returns(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef):
                for child in ast.walk(node):
                    if isinstance(child, ast.Return) and isinstance(child.value, ast.Call):
                        found = self._type_of_call(child.value)
                        if found:
                            self.returns[node.name] = found

    def _self_attributes(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                found = self._type_of_call(node.value)
                for target in node.targets:
                    if found and isinstance(target, ast.Attribute) \
                            and isinstance(target.value, ast.Name) and target.value.id == "self":
                        self.self_types[target.attr] = found

    def _environment_names(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in _ENVIRONMENT_NAME.findall(node.value):
                    entry = self.registry.entries.get(f"vllm.envs:{name}")
                    if entry is None or entry.kind != "environment":
                        self.miss(node, f"environment variable {name}")

    def _subclass(self, node: ast.ClassDef) -> None:
        bases = [self.local_names[base.id] for base in node.bases
                 if isinstance(base, ast.Name) and base.id in self.local_names]
        for base in bases:
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                entry = self.registry.member(base, item.name)
                if entry is None:
                    self.miss(item, f"override {base}.{item.name}")
                    continue
                own = [arg.arg for arg in item.args.posonlyargs + item.args.args + item.args.kwonlyargs
                       if arg.arg not in _SELF_NAMES]
                for name in own:
                    if name not in entry.parameters:
                        self.miss(item, f"parameter {name!r} of override {entry.key}")
                self._layer_attributes(item)

    def _layer_attributes(self, method: ast.FunctionDef) -> None:
        read = {name for entry in self.registry.entries.values() if entry.kind == "reads"
                for name in entry.parameters}
        for child in ast.walk(method):
            if isinstance(child, ast.Assign):
                for target in child.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id == "layer" and target.attr not in read:
                        self.miss(child, f"layer attribute {target.attr!r} for vLLM to read")

    # ---- inside one function ----

    def _function(self, function: ast.FunctionDef) -> None:
        types: dict[str, str] = {}
        for child in ast.walk(function):
            if isinstance(child, ast.Assign) and isinstance(child.value, ast.Call):
                found = self._type_of_call(child.value)
                for target in child.targets:
                    if found and isinstance(target, ast.Name):
                        types[target.id] = found
        owner = self._owning_class(function)
        worker_self = owner is not None and owner.name in self.worker_classes
        own_members = self._members(owner) if worker_self else set()
        checked: set[int] = set()
        for child in ast.walk(function):
            if isinstance(child, ast.Call):
                self._call(child, types, worker_self, own_members, checked)
        for child in ast.walk(function):
            if isinstance(child, ast.Attribute) and id(child) not in checked:
                self._chain(child, types, worker_self, own_members, checked, keywords=())

    def _owning_class(self, function: ast.FunctionDef) -> ast.ClassDef | None:
        return self._owners.get(id(function))

    @staticmethod
    def _members(owner: ast.ClassDef) -> set[str]:
        names = {item.name for item in owner.body if isinstance(item, ast.FunctionDef)}
        for node in ast.walk(owner):
            targets = node.targets if isinstance(node, ast.Assign) else []
            names |= {target.attr for target in targets if isinstance(target, ast.Attribute)}
        return names

    def _call(self, call: ast.Call, types: dict[str, str], worker_self: bool,
              own_members: set[str], checked: set[int]) -> None:
        keywords = [keyword.arg for keyword in call.keywords if keyword.arg]
        for keyword in call.keywords:
            if keyword.arg is None and isinstance(keyword.value, ast.Name):
                keywords += self._dict_keys(keyword.value.id)
        func = call.func
        if isinstance(func, ast.Name) and func.id in self.local_names:
            self._keywords(call, self.registry.entries.get(self.local_names[func.id]),
                           self.local_names[func.id], keywords, "call")
        elif isinstance(func, ast.Attribute):
            self._chain(func, types, worker_self, own_members, checked, keywords)
        self._literal_keywords(call)

    def _chain(self, node: ast.Attribute, types: dict[str, str], worker_self: bool,
               own_members: set[str], checked: set[int], keywords: list[str] | tuple) -> None:
        """Resolves ``base.a.b.c`` from a typed base; ``keywords`` are the call's, if any."""
        parts, base = [], node
        while isinstance(base, ast.Attribute):
            checked.add(id(base))
            parts.append(base.attr)
            base = base.value
        parts.reverse()
        if not isinstance(base, ast.Name):
            return
        current: str | None = None
        if base.id == "self" and worker_self and parts[0] not in own_members:
            current = WORKER
        elif base.id == "self" and parts[0] in self.self_types:
            current, parts = self.self_types[parts[0]], parts[1:]
        elif base.id in types:
            current = types[base.id]
        elif base.id in self.local_names:
            current = self.local_names[base.id]
        elif base.id in self.module_aliases:
            current = self.registry.imports.get(f"vllm.{parts[0]}")
            if current is None:
                self.miss(node, f"vllm.{parts[0]}")
                return
            parts = parts[1:]
        if current is None:
            return
        for index, part in enumerate(parts):
            entry = self.registry.member(current, part)
            if entry is None:
                self.miss(node, f"{current}.{part}")
                return
            if entry.kind == "attribute":
                current = entry.value_type
                if current is None:
                    return
            elif index == len(parts) - 1:
                self._keywords(node, entry, entry.key, list(keywords), "call")
                return
            else:
                return  # a method's result: not followed

    def _keywords(self, node: ast.AST, entry: VllmName | None, key: str, keywords: list[str],
                  what: str) -> None:
        if entry is None:
            self.miss(node, f"{what} of {key}")
            return
        for keyword in keywords:
            if keyword not in entry.parameters:
                self.miss(node, f"keyword {keyword!r} of {key}")

    def _dict_keys(self, name: str) -> list[str]:
        """Keys given to the dict ``name`` anywhere in the module."""
        keys = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                    for t in node.targets):
                value = node.value
                if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
                        and value.func.id == "dict":
                    keys += [keyword.arg for keyword in value.keywords if keyword.arg]
                elif isinstance(value, ast.Dict):
                    keys += [key.value for key in value.keys if isinstance(key, ast.Constant)]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "update" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == name:
                keys += [keyword.arg for keyword in node.keywords if keyword.arg]
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                            and target.value.id == name and isinstance(target.slice, ast.Constant):
                        keys.append(target.slice.value)
        return keys

    def _literal_keywords(self, call: ast.Call) -> None:
        for keyword in call.keywords:
            if keyword.arg in LITERAL_KEYWORDS and isinstance(keyword.value, ast.Constant):
                entry = self.registry.entries.get(LITERAL_KEYWORDS[keyword.arg])
                if entry is None or keyword.value.value not in entry.parameters:
                    self.miss(keyword.value, f"{keyword.arg}={keyword.value.value!r}")


def worker_extensions(trees: dict[Path, ast.Module]) -> set[str]:
    """Dotted class names the project passes as ``worker_extension_cls``."""
    found = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "worker_extension_cls" \
                    and isinstance(node.value, ast.Constant):
                found.add(node.value.value)
    return found


def unregistered_uses(names: tuple[VllmName, ...] = VLLM_API,
                      files: list[Path] | None = None) -> list[str]:
    """One line (file:line, what) per use of vLLM missing from ``names``."""
    registry = Registry.of(names)
    trees = {path: ast.parse(path.read_text(), str(path)) for path in files or project_files()}
    extensions = worker_extensions(trees)
    problems = []
    for path, tree in trees.items():
        problems += _ModuleScan(path, tree, registry, extensions).scan()
    return sorted(set(problems))
