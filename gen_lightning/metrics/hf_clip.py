"""A local Hugging Face CLIP directory as a `TextImageEncoder` for the CLIP score (metrics.clip_score).

Why not torchmetrics' own CLIPScore: it needs a Hugging Face CLIP anyway and breaks with transformers 5.x (DESIGN.md),
and it preprocesses through the model's image processor, which in transformers 5.x runs on torchvision (which cannot be
installed beside this project's torch) or on PIL one image at a time on the CPU. Here the directory's preprocessing
(preprocessor_config.json: shortest-side resize, center crop, mean/std) is redone in torch on the [-1, 1] batch, so
it runs batched on whatever device the images are on, and captions go through the directory's own tokenizer with the
same explicit truncation accounting as the project's CLIP.

Nothing is downloaded: the path must be a directory written by `save_pretrained` (config.json with model_type "clip",
the weights, the tokenizer files); everything is loaded with `local_files_only=True` and HF_HUB_OFFLINE set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gen_lightning.errors import UserInputError
from gen_lightning.interop.clip_text import tokenize_with_lengths

# OpenAI CLIP's preprocessing: what CLIPImageProcessor uses when a directory has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes as stored in preprocessor_config.json ("resample") -> torch interpolation modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HuggingFaceCLIPError(UserInputError):
    """A path that cannot serve as a Hugging Face CLIP; the message names the path and what is wrong."""


def _import_transformers() -> Any:
    # Set before the import: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported. A user's explicit
    # setting is respected; local_files_only=True below keeps loading offline either way.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("a Hugging Face CLIP directory needs transformers: pip install 'gen-lightning[hf]'") from err
    return transformers


def _pair(value: Any, what: str, path: Path) -> tuple[int, int]:
    """An image processor size given as an int or {"height", "width"} -> (height, width)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise HuggingFaceCLIPError(f"{str(path)!r}: preprocessor_config.json has an unsupported {what} {value!r}")


@dataclass(frozen=True)
class ImagePreprocessing:
    """The subset of CLIPImageProcessor's settings that CLIP checkpoints use, applied in torch to a batch."""

    shortest_edge: int | None = 224  # resize keeping the aspect ratio; None: resize to `resize_to` exactly
    resize_to: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = (224, 224)  # None: no center crop
    mode: str = "bicubic"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD  # None: no normalisation

    @classmethod
    def from_directory(cls, path: Path) -> ImagePreprocessing:
        config_path = path / "preprocessor_config.json"
        if not config_path.is_file():
            return cls()
        config = json.loads(config_path.read_text())
        shortest_edge, resize_to = cls.shortest_edge, None
        if config.get("do_resize", True):
            size = config.get("size", 224)
            if isinstance(size, dict) and "shortest_edge" in size:
                shortest_edge = int(size["shortest_edge"])
            elif isinstance(size, int):
                shortest_edge = size  # older configs: an int meant the shortest edge for CLIP
            else:
                shortest_edge, resize_to = None, _pair(size, "size", path)
        else:
            shortest_edge = None
        crop_size = (
            _pair(config.get("crop_size", 224), "crop_size", path) if config.get("do_center_crop", True) else None
        )
        resample = config.get("resample", 3)
        if resample not in _RESAMPLE:
            raise HuggingFaceCLIPError(
                f"{str(path)!r}: preprocessor_config.json asks for PIL resample {resample}, "
                f"supported are {sorted(_RESAMPLE)} (nearest, bilinear, bicubic)"
            )
        normalize = config.get("do_normalize", True)
        return cls(
            shortest_edge=shortest_edge,
            resize_to=resize_to,
            crop_size=crop_size,
            mode=_RESAMPLE[resample],
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else OPENAI_CLIP_MEAN,
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """float [-1, 1] NCHW (any size) -> the model's pixel_values."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images as N×3×H×W (or N×1×H×W) in [-1, 1], got shape {tuple(images.shape)}")
        # The processor's rescale step maps uint8 pixels to [0, 1]: that is the range its mean/std are for.
        x = ((images.float() + 1) / 2).expand(-1, 3, -1, -1)  # grey -> RGB, as do_convert_rgb would
        height, width = x.shape[-2:]
        size = self.resize_to
        if self.shortest_edge is not None:
            short, long = min(height, width), max(height, width)
            new_long = int(self.shortest_edge * long / short)  # int() truncates, as transformers does
            size = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        if size is not None and size != (height, width):
            smooth = self.mode != "nearest"
            # antialias: PIL (which the processor's numbers come from) low-pass filters when it shrinks; the clamp:
            # bicubic overshoots, PIL's 8-bit result cannot.
            x = F.interpolate(x, size=size, mode=self.mode, antialias=smooth, align_corners=False if smooth else None)
            x = x.clamp(0, 1)
        if self.crop_size is not None:
            x = _center_crop(x, self.crop_size)
        if self.std is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """transformers' center_crop: zero-pad (black) a side shorter than the crop, extra pixel top/left, then cut."""
    pad_h, pad_w = max(crop[0] - x.shape[-2], 0), max(crop[1] - x.shape[-1], 0)
    if pad_h or pad_w:
        x = F.pad(x, (math.ceil(pad_w / 2), pad_w // 2, math.ceil(pad_h / 2), pad_h // 2))
    top, left = (x.shape[-2] - crop[0]) // 2, (x.shape[-1] - crop[1]) // 2
    return x[..., top : top + crop[0], left : left + crop[1]]


def _features(output: Any) -> torch.Tensor:
    # transformers 4.x returns the projected features; 5.x a BaseModelOutputWithPooling whose pooler_output holds them.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HuggingFaceCLIP(nn.Module):
    """A `save_pretrained` CLIP directory (model, tokenizer, optional preprocessor_config.json), frozen, in eval mode.

    An nn.Module so `.to(device)` / `.half()` move it; inputs on another device are moved to the model and the
    features come back on the input's device, so CLIPScore's sums stay where the metric lives.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        model_type = clip_model_type(path)
        if model_type != "clip":
            raise HuggingFaceCLIPError(
                f"{str(path)!r} is not a Hugging Face CLIP directory: config.json has model_type {model_type!r}, "
                "expected 'clip'"
            )
        transformers = _import_transformers()
        self.path = path
        try:
            self.model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:  # what transformers raises for missing weights / tokenizer files
            raise HuggingFaceCLIPError(f"{str(path)!r}: cannot load the CLIP model or its tokenizer: {err}") from err
        if self.tokenizer.pad_token is None:
            # The text tower is causal and pools at the first EOS, so whatever pads after it cannot change the result.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval().requires_grad_(False)
        self.preprocess = ImagePreprocessing.from_directory(path)
        self.context_length: int = int(self.model.config.text_config.max_position_embeddings)

    def train(self, mode: bool = True) -> HuggingFaceCLIP:
        return super().train(False)  # an evaluation encoder: dropout stays off even inside a module set to train

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids [N, context_length] truncated and padded, token count with BOS/EOS before truncation [N])."""
        return tokenize_with_lengths(self.tokenizer, texts, self.context_length)

    def _parameter(self) -> torch.Tensor:
        return next(self.model.parameters())

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [-1, 1] NCHW (any size) -> projected, unnormalised image features [N, projection_dim]."""
        weight = self._parameter()
        pixels = self.preprocess(images.to(weight.device)).to(weight.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels)).to(images.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N, context_length] -> projected, unnormalised text features [N, projection_dim]."""
        # No attention mask: the causal text tower never lets padding after EOS reach the pooled EOS state.
        features = self.model.get_text_features(input_ids=tokens.to(self._parameter().device))
        return _features(features).to(tokens.device)


def clip_model_type(path: Path) -> str | None:
    """model_type of a Hugging Face directory's config.json; a clear error when there is no such directory."""
    if not path.exists():
        raise HuggingFaceCLIPError(f"Hugging Face CLIP directory {str(path)!r} does not exist")
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise HuggingFaceCLIPError(f"{str(path)!r} is not a Hugging Face CLIP directory (no config.json in it)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HuggingFaceCLIPError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    return config.get("model_type") if isinstance(config, dict) else None
