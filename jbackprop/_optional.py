"""The optional packages of the ``cli`` extra (scikit-learn, matplotlib, tqdm): imported only
where they are used, with a clear error naming the extra when they are missing."""
from __future__ import annotations

import importlib

# the packages of the ``cli`` extra, by import name
_CLI_EXTRA = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def import_optional(module: str, purpose: str):
    """Import ``module`` (one of the ``cli`` extra's packages), or raise ``ModuleNotFoundError``
    saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package = _CLI_EXTRA.get(top, top)
        raise ModuleNotFoundError(
            f"{purpose} needs {package}, which is not installed: pip install \"jbackprop[cli]\" "
            f"(or pip install {package})", name=module) from e
