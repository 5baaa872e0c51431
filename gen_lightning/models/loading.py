"""Rebuild a model from a checkpoint with `torch.load(weights_only=True)`: no code from the file is executed.

A checkpoint names its class (`checkpoint["gen_lightning"]["class_path"]`, written by GenerativeModule); only classes
under `gen_lightning.models` are constructed, from the checkpoint's plain-typed hyper-parameters.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

from gen_lightning.models.base import GenerativeModule


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncation / foreign pickles
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read weights-only ({type(err).__name__}: {str(err)[:300]}); "
            "it is truncated, not a gen_lightning checkpoint, or needs arbitrary code to load"
        ) from err


def model_class(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> type[GenerativeModule]:
    meta = checkpoint.get("gen_lightning")
    if not isinstance(meta, dict) or "class_path" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by a gen_lightning model (no class_path)")
    module_name, _, class_name = meta["class_path"].rpartition(".")
    if not module_name.startswith("gen_lightning.models."):
        raise CheckpointError(f"checkpoint {str(path)!r} names {meta['class_path']!r}, not a gen_lightning model")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModule)):
        raise CheckpointError(f"checkpoint {str(path)!r}: {meta['class_path']!r} is not a gen_lightning model class")
    return cls


def build_model(cls: type[GenerativeModule], hparams: dict[str, Any]) -> GenerativeModule:
    """cls(**hparams), with hyper-parameters of its own even when built inside another model's __init__.

    Lightning's save_hyperparameters would otherwise take the outer model's: LightningCLI sets a context variable
    with the CLI's arguments for the model it instantiates, and without it the frame walk continues into an outer
    __init__ that called this one directly. A plain function frame (this one) and a cleared context stop both.
    """
    token = _given_hyperparameters.set(None)
    try:
        return cls(**hparams)
    finally:
        _given_hyperparameters.reset(token)


def load_model(path: str | Path, expected: type[GenerativeModule] | None = None) -> GenerativeModule:
    """The model of a checkpoint, in eval mode on CPU. `expected` rejects a checkpoint of another model class."""
    checkpoint = read_checkpoint(path)
    cls = model_class(checkpoint, path)
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {cls.__name__}, expected a {expected.__name__}")
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = build_model(cls, hparams)
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match {cls.__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
