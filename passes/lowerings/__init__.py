"""One file per rewrite: its lowering (canonical attention → the rewrite's op) and its cost
formula, each registered by config type. Importing this package imports every module in the
folder, so a new rewrite needs no edit anywhere else."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
