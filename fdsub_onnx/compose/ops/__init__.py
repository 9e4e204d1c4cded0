"""The ops, one class per ONNX op type holding every reading of it (``_rule.OpRule``), one module per family.

Importing this package imports every ``op_*`` module; each class registers itself under its name as it is defined,
so adding an op is adding its class (in a module of its family, or a new ``op_*.py``; a class defined later, in a
test, registers itself the same way). ``RULES``: op type -> the op (an instance of its class).
"""

import importlib
import pkgutil

from ._rule import READINGS, REGISTRY, OpRule

for _module in pkgutil.iter_modules(__path__):
    if _module.name.startswith("op_"):
        importlib.import_module(f"{__name__}.{_module.name}")

RULES: dict[str, OpRule] = REGISTRY

__all__ = ["READINGS", "RULES", "OpRule"]
