"""transformers' CLIPTextModel + its tokenizer from a local folder, frozen, as latent diffusion's text tower.

The tower offers what nn.text_unet.TextConditionedUNet asks of any text encoder (`tokenize`, `encode` -> (hidden
states, pooled state), `padding_mask`, `context_length`, `width`), with the hidden states Stable Diffusion uses:
  "last":        last_hidden_state (the last layer after final_layer_norm): SD 1.x; also SD 2.x with diffusers'
                 text_encoder/ folder, which already holds 23 of OpenCLIP's 24 layers;
  "penultimate": final_layer_norm(hidden_states[-2]): SD 2.x's conditioning on a full-depth tower (clip_skip=1).
The pooled state is pooler_output (the final-normed last layer at the first EOS), whatever the layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_lightning.interop.folders import (
    PretrainedFolderError,
    check_loading_info,
    component_folder,
    quiet_hf_logs,
    read_config,
    require_hf,
    safetensors_weights,
    tokenizer_files,
    tokenizer_folder,
)

TEXT_LAYERS = ("last", "penultimate")
# A CLIPModel folder also holds the vision tower and the projections; only the text tower is read from it.
_OTHER_TOWERS = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale", "text_model.")


def tokenize_with_lengths(tokenizer: Any, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, context_length] truncated and padded, token count with BOS/EOS before truncation [N]). Truncation
    keeps the EOS the tower pools at."""
    texts = list(texts)
    # verbose=False: the length-only pass must not warn about sequences longer than the model
    full = tokenizer(texts, truncation=False, padding=False, verbose=False)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in full], dtype=torch.long)
    ids = tokenizer(texts, truncation=True, max_length=context_length, padding="max_length", return_tensors="pt")
    return ids["input_ids"], lengths


class _SharedTokenizer:
    """The tokenizer is read-only state: the EMA's deep copy of the network shares it instead of copying it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __deepcopy__(self, memo: dict) -> _SharedTokenizer:
        return self


class CLIPTextTower(nn.Module):
    """A CLIPTextModel folder (or a CLIPModel folder, or a pipeline root's text_encoder/ + tokenizer/), frozen."""

    def __init__(self, path: str | Path, layer: str = "last") -> None:
        super().__init__()
        if layer not in TEXT_LAYERS:
            raise ValueError(f"text layer {layer!r}: expected one of {TEXT_LAYERS}")
        folder = component_folder(path, "text_encoder")
        config = read_config(folder, "text_encoder")
        model_type = config.get("model_type")
        if model_type not in ("clip_text_model", "clip"):
            architectures = ", ".join(config.get("architectures") or []) or "no architecture named"
            raise PretrainedFolderError(
                f"{str(folder / 'config.json')!r} describes a {model_type} model ({architectures}), not a CLIP text "
                "model (model_type 'clip_text_model' or 'clip')"
            )
        weights = safetensors_weights(folder, "text_encoder")
        tokens_from = tokenizer_folder(folder)
        transformers = require_hf(folder, "transformers")
        with quiet_hf_logs():
            try:
                model, info = transformers.CLIPTextModel.from_pretrained(
                    str(folder), use_safetensors=True, local_files_only=True, torch_dtype=torch.float32,
                    output_loading_info=True,
                )  # fmt: skip
                tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokens_from), local_files_only=True)
            except (OSError, ValueError, RuntimeError) as err:
                raise PretrainedFolderError(f"{str(folder)!r}: cannot load the CLIP text tower: {err}") from err
        check_loading_info(weights[0], info, _OTHER_TOWERS if model_type == "clip" else ())
        self.model = model.float().eval().requires_grad_(False)
        self._tokenizer = _SharedTokenizer(tokenizer)
        self.layer = layer
        self.folder, self.files = folder, [folder / "config.json", *weights]
        self.tokenizer_folder, self.tokenizer_files = tokens_from, tokenizer_files(tokens_from)
        text_config = model.config
        self.eos_token_id = int(tokenizer.eos_token_id)
        self._context_length = min(int(tokenizer.model_max_length), int(text_config.max_position_embeddings))
        self._width = int(text_config.hidden_size)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def width(self) -> int:
        return self._width

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_with_lengths(self._tokenizer.tokenizer, texts, self.context_length)

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True up to and including each row's first EOS (SD 1.x pads with EOS itself, SD 2.x with '!')."""
        is_eos = ids == self.eos_token_id
        return (is_eos.cumsum(dim=1) - is_eos.long()) == 0

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [N, L, width] of the chosen layer, pooled state [N, width])."""
        return self(ids, with_pooled=True)

    def forward(self, ids: torch.Tensor, with_pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        penultimate = self.layer == "penultimate"
        out = self.model(input_ids=ids, output_hidden_states=penultimate)
        hidden = out.last_hidden_state
        if penultimate:  # transformers 4.x nests the tower under text_model, 5.x does not
            hidden = getattr(self.model, "text_model", self.model).final_layer_norm(out.hidden_states[-2])
        return (hidden, out.pooler_output) if with_pooled else hidden

    def train(self, mode: bool = True) -> CLIPTextTower:
        return super().train(False)  # frozen: inference behaviour always
