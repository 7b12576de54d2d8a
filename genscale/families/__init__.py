"""Registry of model families: `--model NAME` -> the module that defines it.

A family module defines ``Options`` (a dataclass of its own flags), ``PRESET`` (defaults for the
common training flags that suit it on its default data) and ``FAMILY`` (its Family subclass,
built as ``FAMILY(train_config, options, data_info)``). Adding a family = one file + one line here.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "ddpm": "genscale.families.ddpm",
}

DESCRIPTIONS: dict[str, str] = {
    "ddpm": "denoising diffusion (DDPM/DDIM samplers, classifier-free guidance)",
}


def family_module(name: str) -> ModuleType:
    """Import the module of family ``name`` (the caller has checked that it exists)."""
    return importlib.import_module(FAMILIES[name])
