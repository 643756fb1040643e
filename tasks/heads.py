"""Downstream heads that guide fusion: a light segmentation network and its scores.

The head takes the fused luminance image (N, 1, H, W) on [0, 1] and predicts class logits
(N, K, H, W). It is small on purpose: it measures how much task-relevant information
the fused image carries, and its gradient through the fused image is the task guidance
(see ``timfusion.platform.training`` for the alternating formulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timfusion.platform.registry import Registry

IGNORE_INDEX = 255

HEADS: Registry[type[nn.Module]] = Registry("downstream head")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


@HEADS.register("segmentation")
class SegmentationHead(nn.Module):
    """A three-level U-Net (widths w, 2w, 4w) from a fused image to class logits; any H, W."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.enc1 = _block(in_channels, width)
        self.enc2 = _block(width, 2 * width)
        self.enc3 = _block(2 * width, 4 * width)
        self.dec2 = _block(6 * width, 2 * width)
        self.dec1 = _block(3 * width, width)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, fused: Tensor) -> Tensor:
        f1 = self.enc1(fused)
        f2 = self.enc2(F.max_pool2d(f1, 2, ceil_mode=True))
        f3 = self.enc3(F.max_pool2d(f2, 2, ceil_mode=True))
        up2 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up2, f2], dim=1))
        up1 = F.interpolate(d2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up1, f1], dim=1))
        return self.classify(d1)


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Pixel-wise cross-entropy; label ``IGNORE_INDEX`` pixels do not count (a batch with
    no labelled pixel, e.g. of a dataset without labels, gives 0 and no gradient)."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (labels != IGNORE_INDEX).sum()
    return per_pixel.sum() / counted.clamp(min=1)


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts, rows the true class, columns the predicted one."""
    predicted = logits.argmax(dim=1)
    valid = labels != IGNORE_INDEX
    index = labels[valid].long() * num_classes + predicted[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean intersection over union over the classes present in labels or predictions."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if not present.any():
        return float("nan")
    return float((intersection[present] / union[present]).mean())
