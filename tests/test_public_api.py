"""The documented public API: every module's `__all__`, its type hints, and docs/architecture.md."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedbeam"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _exports(name: str) -> list[str]:
  module = importlib.import_module(name)
  assert "__all__" in vars(module), f"{name} declares no __all__"
  return list(module.__all__)


def _unannotated(fn: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str, method: bool) -> list:
  """What `fn` leaves without a type hint: parameters (but self/cls) and the return (but __init__)."""
  args = fn.args
  params = args.posonlyargs + args.args + args.kwonlyargs
  static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
  if method and not static:
    params = params[1:]
  params += [a for a in (args.vararg, args.kwarg) if a is not None]
  missing = [f"{qualname}: parameter {p.arg}" for p in params if p.annotation is None]
  if fn.returns is None and fn.name != "__init__":
    missing.append(f"{qualname}: return")
  return missing


def _public_methods(cls: ast.ClassDef):
  for node in cls.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      if not node.name.startswith("_") or node.name == "__init__":
        yield node


def _documented_api() -> dict[str, list[str]]:
  """module -> the names docs/architecture.md's "Public API" table lists for it."""
  text = ARCHITECTURE.read_text(encoding="utf-8")
  section = text.split("\n## Public API\n", 1)[1].split("\n## ", 1)[0]
  documented: dict[str, list[str]] = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if not line.startswith("| ") or len(cells) != 3:
      continue
    module = cells[0].strip("*`")
    if module != "fedbeam" and not module.startswith("fedbeam."):
      continue
    assert module not in documented, f"{module} is listed twice"
    documented[module] = re.findall(r"`([^`]+)`", cells[2])
  return documented


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_declares_all_and_defines_each_name(name):
  module = importlib.import_module(name)
  exports = _exports(name)
  assert len(exports) == len(set(exports)), f"{name}.__all__ repeats a name"
  undefined = [n for n in exports if not hasattr(module, n)]
  assert not undefined, f"{name}.__all__ names what the module does not define: {undefined}"


def test_every_exported_function_and_method_has_type_hints():
  missing = []
  for name, path in MODULES.items():
    exports = set(_exports(name))
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in exports:
        missing += _unannotated(node, f"{name}.{node.name}", method=False)
      elif isinstance(node, ast.ClassDef) and node.name in exports:
        for fn in _public_methods(node):
          missing += _unannotated(fn, f"{name}.{node.name}.{fn.name}", method=True)
  assert not missing, "missing type hints:\n" + "\n".join(missing)


def test_architecture_doc_lists_each_modules_all_exactly():
  documented = _documented_api()
  assert sorted(documented) == sorted(MODULES), (
    f"modules only in the doc: {sorted(set(documented) - set(MODULES))}; "
    f"modules missing from the doc: {sorted(set(MODULES) - set(documented))}"
  )
  wrong = {
    name: (documented[name], _exports(name))
    for name in MODULES
    if sorted(documented[name]) != sorted(_exports(name))
  }
  assert not wrong, "doc (listed, __all__) differ for: " + repr(wrong)


def test_architecture_doc_marks_the_modules_users_import():
  section = ARCHITECTURE.read_text(encoding="utf-8").split("\n## Public API\n", 1)[1]
  for name in ("fedbeam.pipelines", "fedbeam.runtime", "fedbeam.format", "fedbeam.testing"):
    assert f"| **`{name}`** |" in section, name
