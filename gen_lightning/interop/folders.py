"""Local Hugging Face folders: which folder is meant, which files it must hold, and the errors that name them.

Pure path logic: nothing here imports diffusers or transformers. Weights are read from safetensors only: a folder that
holds only pickled weights (`.bin`, `.ckpt`, `.pt`) is refused before any library sees it, because unpickling can run
arbitrary code (the rule gen_lightning's own checkpoints follow, models.loading).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from gen_lightning.errors import UserInputError

Component = Literal["vae", "text_encoder"]
WEIGHT_STEMS = {"vae": "diffusion_pytorch_model", "text_encoder": "model"}
LIBRARY = {"vae": ("diffusers", "AutoencoderKL"), "text_encoder": ("transformers", "CLIPTextModel")}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
EXPORT_MARKER = "gen_lightning.json"  # written by `gen-lightning export`; such a folder is ours, not Hugging Face's


class PretrainedFolderError(UserInputError):
    """A Hugging Face folder that cannot serve; the message names the file and says what to do."""


def is_pretrained_folder(path: str | Path | None, component: Component) -> bool:
    """Whether `path` is a Hugging Face folder (or a pipeline root) rather than a gen_lightning checkpoint/export."""
    if path is None:
        return False
    path = Path(path)
    if not path.is_dir() or (path / EXPORT_MARKER).is_file():
        return False
    return (path / "config.json").is_file() or (path / "model_index.json").is_file() or (path / component).is_dir()


def component_folder(path: str | Path, component: Component) -> Path:
    """The folder holding `component`: the path itself when it has a config.json, else a pipeline root's
    `<component>/` (Stable Diffusion's layout: vae/, text_encoder/, tokenizer/)."""
    path = Path(path)
    if not path.exists():
        raise PretrainedFolderError(f"pretrained folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file() and (path / component / "config.json").is_file():
        return path / component
    return path


def read_config(folder: Path, component: Component) -> dict[str, Any]:
    library, cls = LIBRARY[component]
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PretrainedFolderError(
            f"{str(folder)!r} is not a {library} {cls} folder: it has no config.json (expected config.json and "
            f"{WEIGHT_STEMS[component]}.safetensors, as save_pretrained writes them)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedFolderError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise PretrainedFolderError(f"{str(config_path)!r} holds a {type(config).__name__}, not a config object")
    return config


def safetensors_weights(folder: Path, component: Component) -> list[Path]:
    """The component's safetensors weight files (one file, or the shards an index names); pickles are refused."""
    stem = WEIGHT_STEMS[component]
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise PretrainedFolderError(f"{str(index)!r} names shards that are missing: {missing[:5]}")
        return [index, *(folder / name for name in shards)]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        library, cls = LIBRARY[component]
        raise PretrainedFolderError(
            f"{str(pickles[0])!r} holds pickled weights, which gen_lightning refuses to load: unpickling can run "
            "arbitrary code (the rule its own checkpoints follow). Where you trust the file, convert it once: "
            f'python -c "from {library} import {cls} as M; M.from_pretrained({str(folder)!r}, '
            f'use_safetensors=False).save_pretrained({str(folder)!r})"'
        )
    raise PretrainedFolderError(
        f"{str(folder)!r} has no {stem}.safetensors: the weights are missing (gen_lightning reads safetensors "
        "weights only)"
    )


def tokenizer_folder(text_folder: Path) -> Path:
    """The CLIP tokenizer's files: in the text encoder's folder, or in its sibling tokenizer/ (a pipeline's layout)."""
    for folder in (text_folder, text_folder.parent / "tokenizer"):
        if (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        ):
            return folder
    raise PretrainedFolderError(
        f"no CLIP tokenizer for {str(text_folder)!r}: expected tokenizer.json, or vocab.json and merges.txt, in it "
        "or in its sibling folder tokenizer/"
    )


def tokenizer_files(folder: Path) -> list[Path]:
    names = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    return [folder / name for name in names if (folder / name).is_file()]


def require_hf(path: Path, library: str) -> Any:
    """The library, imported offline; a clear error naming the extra when it is not installed."""
    # Set before the import: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        module = __import__(library)
    except ImportError as err:
        raise PretrainedFolderError(
            f"{str(path)!r} is a Hugging Face folder, which needs the hf extra (diffusers, transformers): "
            "pip install -e '.[hf]'"
        ) from err
    if module is None:  # sys.modules[name] = None: treated as not installed, as Python's import does
        raise PretrainedFolderError(f"{str(path)!r} needs {library}: pip install -e '.[hf]'")
    return module


@contextlib.contextmanager
def quiet_hf_logs() -> Iterator[None]:
    """diffusers/transformers at ERROR during a load: their 'newly initialized weights' reports are checked here
    from the loading info instead, and raised as errors, not logged."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_loading_info(weights: Path, info: dict[str, Any], allowed_unexpected: tuple[str, ...] = ()) -> None:
    """diffusers and transformers fill missing tensors with random values and only log it: refuse that here."""
    missing = list(info.get("missing_keys", []))
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(allowed_unexpected)]
    mismatched = [str(item[0]) if isinstance(item, tuple | list) else str(item)
                  for item in info.get("mismatched_keys", [])]  # fmt: skip
    if missing or unexpected or mismatched:
        raise PretrainedFolderError(
            f"{str(weights)!r} does not fit its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {mismatched[:5]} (the library would fill the missing ones with random values)"
        )
