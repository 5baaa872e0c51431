"""CLIPModel: contrastive image-text pre-training (Radford et al. 2021) on the shared shard DataModule.

The trained network (nn.clip.CLIPNet) is used elsewhere through two documented doors:
- as a `metrics.clip_score.TextImageEncoder` (tokenize / encode_image / encode_text) for the CLIP score;
- its `text`, a `nn.text.TextEncoder`, as the frozen text tower of latent diffusion.
`load_clip(path)` opens a checkpoint's network weights-only, frozen, for both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gen_lightning.distributed import all_gather_objects
from gen_lightning.metrics.retrieval import recall_at_k, same_caption, zero_shot_accuracy
from gen_lightning.models.base import GenerativeModule
from gen_lightning.nn.clip import CLIPNet
from gen_lightning.nn.contrastive import ClipLoss
from gen_lightning.nn.text import TextConfig, TruncationCounter, normalize_caption
from gen_lightning.nn.vision import VisionConfig


class CLIPModel(GenerativeModule):
    """A ViT image tower and a causal byte-level text transformer, projected into `embed_dim`, trained with the
    symmetric InfoNCE loss over the global batch (see nn.contrastive) and a learnable temperature.

    Args:
        vision / text: tower shapes (nn.vision.VisionConfig, nn.text.TextConfig); vision.image_size follows image_size.
        embed_dim: width of the shared embedding space.
        image_size: training resolution (linked from data.image_size by the CLI); other sizes are resized on encode.
        init_logit_scale / max_logit_scale: log of the inverse temperature at start (CLIP: ln(1/0.07)) and its clamp
            (open_clip clamps at ln 100 after every step, against the instability of a runaway scale).
        local_loss / gather_with_grad: see nn.contrastive.ClipLoss.
        lr / weight_decay / adam_betas / warmup_steps / lr_schedule: AdamW (β2 = 0.98 as in CLIP), warm-up, then
            constant or cosine; biases, norms, embeddings and the temperature get no weight decay (open_clip practice).
        zero_shot_keys: metadata keys (the sample's json member) whose values are zero-shot classes on val; the
            emoji shards carry Unicode's "group" and "subgroup".
        zero_shot_template: prompt for zero-shot classes on val ("{}" is replaced by the class name).
    """

    keeps_ema = False

    kind = "encoder"
    trains_on_captions = True
    format_1_renames = (
        ("logit_scale", "net.logit_scale"),
        *((prefix, f"net.{prefix}") for prefix in ("visual.", "visual_projection.", "text.", "text_projection.")),
    )

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        embed_dim: int = 256,
        image_size: int = 32,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        local_loss: bool = False,
        gather_with_grad: bool = True,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        adam_betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 200,
        lr_schedule: str = "cosine",
        zero_shot_keys: tuple[str, ...] = ("group", "subgroup"),
        zero_shot_template: str = "{}",
    ) -> None:
        super().__init__()
        vision_config = VisionConfig.coerce(vision if vision is not None else VisionConfig())
        vision_config.image_size = image_size
        text_config = TextConfig.coerce(text if text is not None else TextConfig())
        self.save_hyperparameters()
        self.hparams["vision"] = vision_config.as_dict()  # plain types only: checkpoints load weights-only
        self.hparams["text"] = text_config.as_dict()
        self.net = CLIPNet(vision_config, text_config, embed_dim, init_logit_scale)
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self.truncation = TruncationCounter("CLIP training")
        self._val_outputs: list[dict[str, Any]] = []

    # --- training ---------------------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) features of a batch; counts and warns once about truncated captions."""
        tokens, lengths = self.net.tokenize(captions)
        self.truncation.update(captions, lengths, self.net.context_length)
        return self.net(images, tokens.to(images.device))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features, text_features = self.embed(batch["image"], batch["caption"])
        loss = self.loss_fn(image_features, text_features, self.net.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        self.log("train/logit_scale", self.net.logit_scale.exp().detach().squeeze(), batch_size=len(batch["caption"]))
        return loss

    @classmethod
    def upgrade_from_format_1(cls, checkpoint: dict[str, Any]) -> None:
        super().upgrade_from_format_1(checkpoint)
        # The temperature was 0-dim before DeepSpeed (which cannot broadcast it): the weight and its AdamW moments
        # take the one-element shape (the `step` counters are 0-dim by design and stay so).
        state = checkpoint["state_dict"]
        state["net.logit_scale"] = state["net.logit_scale"].reshape(1)
        for optimizer in checkpoint.get("optimizer_states", []):
            for moments in optimizer.get("state", {}).values():
                for moment in ("exp_avg", "exp_avg_sq"):
                    if moment in moments and moments[moment].ndim == 0:
                        moments[moment] = moments[moment].reshape(1)

    def after_optimizer_step(self, steps_done: int) -> None:
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            # open_clip: no decay for gains/biases (1-d), embeddings and the temperature
            skip = param.ndim < 2 or "embedding" in name or name.endswith("logit_scale")
            (no_decay if skip else decay).append(param)
        return self.adamw_with_warmup([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])

    # --- validation: retrieval over the whole val split, zero-shot over emoji groups ------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_features, text_features = self.embed(batch["image"], batch["caption"])
        metas = batch.get("meta") or [{} for _ in batch["caption"]]
        self._val_outputs.append(
            {
                "image": image_features.float().cpu(),
                "text": text_features.float().cpu(),
                "captions": list(batch["caption"]),
                "labels": [{k: meta.get(k) for k in self.hparams.zero_shot_keys} for meta in metas],
            }
        )

    def on_validation_epoch_end(self) -> None:
        local = self._val_outputs
        self._val_outputs = []
        # Every rank gets every rank's features, so every rank computes (and logs) the same numbers.
        outputs = [out for rank_outputs in all_gather_objects(local) for out in rank_outputs]
        if not outputs:
            return
        image_features = torch.cat([out["image"] for out in outputs])
        text_features = torch.cat([out["text"] for out in outputs])
        captions = [caption for out in outputs for caption in out["captions"]]
        labels = [label for out in outputs for label in out["labels"]]
        for name, value in self.validation_scores(image_features, text_features, captions, labels).items():
            self.log(f"val/{name}", value, sync_dist=False, rank_zero_only=False)

    @torch.no_grad()
    def validation_scores(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        captions: list[str],
        labels: list[dict[str, Any]],
    ) -> dict[str, float]:
        """On normalised features of the whole split: contrastive loss, recall@1/5/10 in both directions (an image
        with the same caption counts as a right answer; chance ≈ k/N for unique captions) and zero-shot top-1 over
        each zero_shot_keys label present (with its chance, 1/classes)."""
        n = image_features.shape[0]
        similarity = image_features @ text_features.T
        targets = torch.arange(n)
        scale = float(self.net.logit_scale.exp())
        scores: dict[str, float] = {
            "loss": float(
                (F.cross_entropy(scale * similarity, targets) + F.cross_entropy(scale * similarity.T, targets)) / 2
            ),
            "num_samples": float(n),
        }
        relevant = same_caption(captions)
        for direction, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
            for k, recall in recall_at_k(matrix, relevant).items():
                scores[f"{direction}_R@{k}"] = recall
        for key in self.hparams.zero_shot_keys:
            names = [label.get(key) for label in labels]
            classes = sorted({name for name in names if name})
            if len(classes) < 2:
                continue
            known = torch.tensor([bool(name) for name in names])  # a missing or empty label is not scored
            prompts = [self.hparams.zero_shot_template.format(class_prompt(name)) for name in classes]
            tokens, _ = self.net.tokenize(prompts)
            class_features = F.normalize(self.net.encode_text(tokens.to(self.device)).float().cpu(), dim=-1)
            targets_k = torch.tensor([classes.index(name) for name in names if name])
            accuracy, chance = zero_shot_accuracy(image_features[known], class_features, targets_k)
            scores[f"zeroshot_{key}_top1"] = accuracy
            scores[f"zeroshot_{key}_chance"] = chance
        return scores


def class_prompt(name: str) -> str:
    """Unicode group names as words: 'face-smiling' -> 'face smiling', 'Smileys & Emotion' -> 'smileys & emotion'."""
    return normalize_caption(name.replace("-", " "))


def load_clip(path: str | Path) -> CLIPNet:
    """A CLIP checkpoint's network, weights-only, in eval mode, frozen (for the CLIP score and for conditioning)."""
    from gen_lightning.models.loading import load_network

    def build(hparams: dict[str, Any]) -> CLIPNet:
        return CLIPNet(hparams["vision"], hparams["text"], hparams["embed_dim"], hparams["init_logit_scale"])

    network, _, _ = load_network(path, CLIPModel, build, prefix="net.")
    return network  # type: ignore[return-value]
