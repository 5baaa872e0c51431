"""Rebuild a model from a checkpoint with `torch.load(weights_only=True)`: no code from the file is executed.

A checkpoint names its class (`checkpoint["gen_lightning"]["class_path"]`, written by GenerativeModule); only classes
under `gen_lightning.models` are constructed, from the checkpoint's plain-typed hyper-parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_lightning.errors import UserInputError
from gen_lightning.interop.folders import EXPORT_MARKER
from gen_lightning.models.base import GenerativeModule, fill_external_state
from gen_lightning.models.checkpoint_format import upgrade


class CheckpointError(UserInputError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint file, or a folder written by `gen-lightning export`, as a checkpoint dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if (path / EXPORT_MARKER).is_file():
            return read_export(path)
        raise CheckpointError(
            f"{str(path)!r} is a folder without {EXPORT_MARKER}, not a model written by gen-lightning export "
            "(a Lightning checkpoint is a .ckpt file)"
        )
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise CheckpointError(f"checkpoint {str(path)!r} is {kind}, not a checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_refusal(path, err)) from err
    except Exception as err:  # torch raises several types for truncated / non-torch files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt, or not a torch checkpoint "
            f"({type(err).__name__}: {_first_sentence(err)}); use a complete copy, or an earlier checkpoint"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def read_export(folder: Path) -> dict[str, Any]:
    """A `gen-lightning export` folder (gen_lightning.json + model.safetensors: no pickle) in checkpoint form: the
    exported weights become both the network and its EMA copy, and paths to the parts it carries are resolved."""
    from safetensors.torch import load_file

    meta_path, weights = folder / EXPORT_MARKER, folder / "model.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(weights)
    except (OSError, ValueError) as err:  # json and safetensors raise ValueError subclasses on bad bytes
        raise CheckpointError(f"export {str(folder)!r} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("hyper_parameters"), dict):
        raise CheckpointError(f"{str(meta_path)!r} lacks the model's class_path or hyper_parameters")
    hparams = dict(meta["hyper_parameters"])
    for key in meta.get("relative_paths", []):
        if hparams.get(key) is not None:
            hparams[key] = str(folder / hparams[key])
    if meta.get("ema_from_net"):
        state |= {f"ema.shadow.{k[4:]}": v.clone() for k, v in state.items() if k.startswith("net.")}
        state["ema.num_updates"] = torch.zeros((), dtype=torch.long)
    return {
        "state_dict": state,
        "hyper_parameters": hparams,
        "gen_lightning": {"class_path": meta.get("class_path"), "format": meta.get("checkpoint_format", 1)},
    }


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_WEIGHTS_UNPICKLER = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def _refusal(path: Path, err: pickle.UnpicklingError) -> str:
    """The weights-only unpickler met something it will not build: say what, why, and the way out.

    torch's own text is long and suggests `weights_only=False`, which is exactly what must not happen silently here.
    """
    text = str(err)
    found = _UNSAFE_GLOBAL.search(text) or _WEIGHTS_UNPICKLER.search(text)
    what = f"a pickled Python object ({found.group(1)})" if found else f"pickle data it cannot read ({text[:200]})"
    return (
        f"checkpoint {str(path)!r} was refused for safety: it contains {what}, and loading that would mean "
        "unpickling arbitrary code, which gen_lightning never does (`sample`, `evaluate` and every model load use "
        "torch.load(weights_only=True)). "
        "Checkpoints written by `gen-lightning fit` contain only tensors and plain values. If you trust this file, "
        "re-save it once in Python with those only: torch.load(path, weights_only=False), drop or convert the "
        "object, torch.save(...). If the file may be truncated, use a complete copy."
    )


def _first_sentence(err: Exception) -> str:
    text = str(err).strip() or "no detail"
    return text.split(". ")[0][:200]


def model_class(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> type[GenerativeModule]:
    meta = checkpoint.get("gen_lightning")
    if not isinstance(meta, dict) or not isinstance(meta.get("class_path"), str):
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by a gen_lightning model (no class_path)")
    module_name, _, class_name = meta["class_path"].rpartition(".")
    if not module_name.startswith("gen_lightning.models."):
        raise CheckpointError(f"checkpoint {str(path)!r} names {meta['class_path']!r}, not a gen_lightning model")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # written by another version of gen_lightning
        raise CheckpointError(f"checkpoint {str(path)!r} names {meta['class_path']!r}, which does not exist") from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModule)):
        raise CheckpointError(f"checkpoint {str(path)!r}: {meta['class_path']!r} is not a gen_lightning model class")
    return cls


def read_model_checkpoint(
    path: str | Path, expected: type[GenerativeModule] | None = None
) -> tuple[type[GenerativeModule], dict[str, Any], dict[str, Any]]:
    """(class, hyper-parameters, state dict in the class's current format) of a checkpoint. `expected` rejects a
    checkpoint of another model class."""
    checkpoint = read_checkpoint(path)
    cls = model_class(checkpoint, path)
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {cls.__name__}, expected a {expected.__name__}")
    upgrade(checkpoint, cls)
    hparams = checkpoint.get("hyper_parameters", {})
    state_dict = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} lacks its hyper_parameters or state_dict")
    return cls, {k: v for k, v in hparams.items() if not k.startswith("_")}, state_dict


def load_model(path: str | Path, expected: type[GenerativeModule] | None = None) -> GenerativeModule:
    """The model of a checkpoint, in eval mode on CPU. `expected` rejects a checkpoint of another model class."""
    cls, hparams, state_dict = read_model_checkpoint(path, expected)
    with named_errors(path, cls):
        # The class named in the file with the file's arguments: a file relabelled (or written by another version)
        # fails here or in load_state_dict, with a TypeError / RuntimeError that would not name the file.
        model = cls(**hparams)
        fill_external_state(model, state_dict)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match {cls.__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def load_network(
    path: str | Path,
    expected: type[GenerativeModule],
    build: Callable[[dict[str, Any]], nn.Module],
    prefix: str,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """One network of a checkpoint without its LightningModule (a frozen part of another model): `build(hparams)`
    with the state dict's `prefix` entries loaded strictly, frozen, in eval mode. Returns it, the checkpoint's
    hyper-parameters and its (upgraded) state dict."""
    cls, hparams, state_dict = read_model_checkpoint(path, expected)
    with named_errors(path, cls):
        network = build(hparams)
        network.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})
    return network.requires_grad_(False).eval(), hparams, state_dict


@contextlib.contextmanager
def named_errors(path: str | Path, cls: type[GenerativeModule]) -> Iterator[None]:
    """Errors from building a model out of a file, as a CheckpointError that names the file."""
    try:
        yield
    except CheckpointError:
        raise  # a file this model loads in turn (e.g. a VAE): already named
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {cls.__name__}: {str(err)[:300]}") from err
