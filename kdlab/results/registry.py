"""The method registry (``kdlab.methods.METHODS``) read without importing it.

Importing ``kdlab.methods`` imports torch (every method is an ``nn.Module``), and
``kdlab results`` must run where torch is slow or absent (login node, cron). So the
registry is read from the source: the modules named in the ``METHODS = {m.NAME: m
for m in (...)}`` line of ``kdlab/methods/__init__.py``, and each module's ``NAME``
and ``VERSION`` constants. tests/test_results.py checks that this equals
``kdlab.methods.method_versions()``; a registry written in another form makes this
raise ``RegistryUnreadable``, naming what it could not read.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parent.parent / "methods"


class RegistryUnreadable(ValueError):
    pass


def _constants(path: Path) -> dict:
    out = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _registered_modules(init: Path) -> list[str]:
    """The module names of the METHODS tuple, in registry order."""
    tree = ast.parse(init.read_text(encoding="utf-8"), str(init))
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            imported.update({a.asname or a.name: a.name for a in node.names})
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "METHODS"
                                                 for t in node.targets)
                and isinstance(node.value, ast.DictComp)
                and isinstance(node.value.generators[0].iter, (ast.Tuple, ast.List))):
            names = [e.id for e in node.value.generators[0].iter.elts if isinstance(e, ast.Name)]
            missing = [n for n in names if n not in imported]
            if missing:
                raise RegistryUnreadable(f"{init}: METHODS names {missing}, which are not "
                                         f"imported with 'from . import ...'")
            return [imported[n] for n in names]
    raise RegistryUnreadable(f"{init}: no 'METHODS = {{m.NAME: m for m in (...)}}' line")


@lru_cache(maxsize=None)
def registry_versions(methods_dir: Path = METHODS_DIR) -> dict[str, int]:
    """``{name: VERSION}`` of every registered method, in registry order."""
    versions = {}
    for module in _registered_modules(methods_dir / "__init__.py"):
        path = methods_dir / f"{module}.py"
        consts = _constants(path)
        if not isinstance(consts.get("NAME"), str) or not isinstance(consts.get("VERSION"), int):
            raise RegistryUnreadable(f"{path}: no literal NAME = '...' and VERSION = <int>")
        versions[consts["NAME"]] = consts["VERSION"]
    return versions


def distillation_methods() -> list[str]:
    """The registry's methods that distil (every one but plain training, ``none``)."""
    return [m for m in registry_versions() if m != "none"]
