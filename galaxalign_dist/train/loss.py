"""Pairwise symmetric InfoNCE over features gathered from all workers, with diagonal or class-aware targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from galaxalign_dist.config import LossConfig
from galaxalign_dist.train.collectives import gather_no_grad, gather_with_grad, world

Pair = tuple[str, str]
STAGE1_PAIRS: tuple[Pair, ...] = (("image", "text"), ("symbol", "text"))
STAGE2_PAIRS: tuple[Pair, ...] = (("image", "text"), ("symbol", "text"), ("image", "symbol"))


def pairs_for(stage: int, loss_cfg: LossConfig) -> tuple[Pair, ...]:
    """Which modality pairs a stage trains; the CLIP-only ablation drops every pair with symbols."""
    pairs = STAGE1_PAIRS if stage == 1 else STAGE2_PAIRS
    if not loss_cfg.use_symbols:
        pairs = tuple(p for p in pairs if "symbol" not in p)
    return pairs


class TriModalLoss(torch.nn.Module):
    """Sum of weighted symmetric InfoNCE losses, each rank's local rows against the global batch.

    Equal to the single-process loss on the concatenated global batch (open_clip's local_loss +
    gather_with_grad): the mean of the ranks' losses is the global mean, and data-parallel gradient
    averaging of the ranks' gradients gives the global gradient.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.class_aware = cfg.targets == "class_aware"
        self.weights = {
            ("image", "text"): cfg.weight_image_text,
            ("symbol", "text"): cfg.weight_symbol_text,
            ("image", "symbol"): cfg.weight_image_symbol,
        }

    def _targets(self, labels: torch.Tensor, all_labels: torch.Tensor, offset: int) -> torch.Tensor:
        if self.class_aware:
            # Multi-positive cross-entropy: every same-class column is a positive, equally weighted.
            same = (labels[:, None] == all_labels[None, :]).float()  # (B, world*B)
            return same / same.sum(dim=1, keepdim=True)
        return torch.arange(labels.shape[0], device=labels.device) + offset  # (B,) diagonal

    def forward(
        self,
        features: dict[str, torch.Tensor],
        logit_scale: torch.Tensor,
        labels: torch.Tensor,
        pairs: tuple[Pair, ...],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """features: modality -> (B, D) normalised local rows; labels: (B,). Returns (total, per pair)."""
        rank, _ = world()
        local_b = labels.shape[0]
        used = sorted({m for pair in pairs for m in pair})
        # One collective for every modality: (B, M*D) -> (world*B, M*D), split back per modality.
        dims = [features[m].shape[1] for m in used]
        stacked = gather_with_grad(torch.cat([features[m] for m in used], dim=1))
        gathered = dict(zip(used, stacked.split(dims, dim=1), strict=True))
        all_labels = gather_no_grad(labels) if self.class_aware else labels
        targets = self._targets(labels, all_labels, rank * local_b)
        scale = logit_scale.reshape(())
        total = torch.zeros((), device=labels.device, dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for a, b in pairs:
            logits_ab = scale * features[a] @ gathered[b].T  # (B, world*B): local a vs all b
            logits_ba = scale * features[b] @ gathered[a].T
            loss = (
                F.cross_entropy(logits_ab.float(), targets) + F.cross_entropy(logits_ba.float(), targets)
            ) / 2
            parts[f"{a}_{b}"] = loss.detach()
            total = total + self.weights[(a, b)] * loss
        return total, parts
