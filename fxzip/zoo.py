"""Small reference architectures used as test and benchmark fixtures.

These models reproduce the architectures the ZipIt! paper (and the model
merging literature it compares to) evaluates on, at sizes small enough for
unit tests and CPU benchmarks:

* :func:`resnet20` -- the CIFAR ResNet-20 with a width multiplier (the
  paper's main CIFAR-10 / CIFAR-100 model: residual adds, BatchNorm,
  option-B 1x1-conv shortcuts).
* :func:`vgg_cnn` -- a small VGG-style conv/BN/ReLU/max-pool stack whose
  classifier *flattens* a ``C x H x W`` map into a Linear (the feature
  dimension of that Linear is ``C*H*W``, ``H*W`` per channel), as in VGG-11.
* :func:`mlp` -- a plain Linear/ReLU MLP (the simplest case for permutation
  and merge matching).
* :func:`small_cnn` -- a tiny conv net with a residual add for the 8x8
  scikit-learn digits, so that tests can train two real models in seconds.

All models are plain :class:`torch.nn.Module` trees that ``torch.fx``
traces symbolically: there is no Python control flow on tensor values.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["resnet20", "vgg_cnn", "mlp", "small_cnn", "group_norm_groups", "cifar_vit", "redraw"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def group_norm_groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Number of groups used for ``nn.GroupNorm`` over ``channels`` channels.

    The largest divisor of ``channels`` that is at most ``max_groups`` and
    leaves at least ``min_per_group`` channels per group (16 channels -> 4
    groups, 64 -> 16, 128 and more -> 32). Always more than one group when
    ``channels >= 2 * min_per_group``, so GroupNorm is neither LayerNorm
    (1 group) nor InstanceNorm (one channel per group): merging must keep
    channels inside their groups, which is what the group-norm fixtures test.
    """
    upper = max(1, min(max_groups, channels // min_per_group))
    for g in range(upper, 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


# --------------------------------------------------------------------------- #
# ResNet-20 (CIFAR)
# --------------------------------------------------------------------------- #
class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm, plus shortcut, then ReLU.

    The shortcut is the identity when the shape is unchanged and a 1x1
    convolution + norm ("option B") when stride or channel count change.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                _norm2d(norm, planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20: stem, 3 stages x 3 BasicBlocks, global avg pool, linear."""

    def __init__(self, width: int = 1, out_dim: int = 10, norm: str = "batch", in_channels: int = 3) -> None:
        super().__init__()
        w = int(width)
        if w < 1:
            raise ValueError("width must be a positive integer")
        c1, c2, c3 = 16 * w, 32 * w, 64 * w
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm2d(norm, c1)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_stage(c1, c1, 3, 1, norm)
        self.layer2 = self._make_stage(c1, c2, 3, 2, norm)
        self.layer3 = self._make_stage(c2, c3, 3, 2, norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(c3, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, norm)]
        layers += [BasicBlock(planes, planes, 1, norm) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def resnet20(width: int = 1, out_dim: int = 10, norm: str = "batch", in_channels: int = 3) -> nn.Module:
    """The CIFAR ResNet-20 of the ZipIt! paper, with a width multiplier.

    Stem conv3x3 (16*width channels) + norm + ReLU; three stages of three
    BasicBlocks with 16*width, 32*width, 64*width channels (stride 2 at the
    start of stages 2 and 3, option-B 1x1 conv + norm shortcuts there);
    global average pooling; ``Linear(64*width, out_dim)``.

    ``norm="batch"`` (default) uses BatchNorm2d as in the paper;
    ``norm="group"`` uses GroupNorm with :func:`group_norm_groups` groups
    (more than one group, at least 4 channels per group), a fixture for
    merging through group-wise normalisation.

    For CLIP-style training (paper section 5) use ``out_dim`` equal to the
    text-embedding dimension (e.g. 384) and score by cosine similarity.
    """
    return ResNet20(width=width, out_dim=out_dim, norm=norm, in_channels=in_channels)


# --------------------------------------------------------------------------- #
# VGG-style CNN
# --------------------------------------------------------------------------- #
_VGG_CFG: tuple[int | str, ...] = (16, "M", 32, "M", 64, 64, "M")


class VGGCNN(nn.Module):
    """Conv/BN/ReLU/max-pool features, flatten (no global pool), MLP head."""

    def __init__(
        self,
        width: int = 1,
        out_dim: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        cfg: Sequence[int | str] = _VGG_CFG,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        size = image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                oc = int(v) * width
                layers += [nn.Conv2d(c, oc, 3, padding=1, bias=False), nn.BatchNorm2d(oc), nn.ReLU(inplace=False)]
                c = oc
        if size < 1:
            raise ValueError("image_size too small for the number of max-pools")
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        h = hidden * width
        self.classifier = nn.Sequential(
            nn.Linear(c * size * size, h),
            nn.ReLU(inplace=False),
            nn.Linear(h, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def vgg_cnn(width: int = 1, out_dim: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A small VGG-style network (stand-in for the papers' VGG-11).

    Features: conv(16w)-M-conv(32w)-M-conv(64w)-conv(64w)-M, each conv
    followed by BatchNorm and ReLU. The classifier *flattens* the
    ``64w x (s/8) x (s/8)`` map (no global pooling) into
    ``Linear(64w*(s/8)^2, 128w)``-ReLU-``Linear(128w, out_dim)``. This is the
    fixture for merging across a flatten, where each conv channel owns a
    contiguous block of ``(s/8)^2`` input features of the Linear.
    ``image_size`` must be divisible by 8 (32 for CIFAR, 8 gives a 1x1 map).
    """
    return VGGCNN(width=width, out_dim=out_dim, in_channels=in_channels, image_size=image_size)


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #
def mlp(in_dim: int, hidden: Sequence[int] = (64, 64), out_dim: int = 10) -> nn.Module:
    """A plain ``Flatten -> (Linear -> ReLU)* -> Linear`` MLP.

    The simplest merge fixture: every hidden layer is one permutable
    feature space, with no normalisation and no residuals.
    """
    layers: list[nn.Module] = [nn.Flatten(1)]
    d = int(in_dim)
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU(inplace=False)]
        d = int(h)
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- #
# Small CNN for 8x8 digits
# --------------------------------------------------------------------------- #
class SmallCNN(nn.Module):
    """conv-bn-relu, residual (conv-bn-relu-conv-bn + skip, relu), avg pool, linear."""

    def __init__(self, out_dim: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        r = self.relu2(self.bn2(self.conv2(h)))
        r = self.bn3(self.conv3(r))
        h = self.relu3(r + h)
        return self.fc(self.flatten(self.pool(h)))


def small_cnn(out_dim: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A tiny residual CNN for the 8x8 scikit-learn digits (fast test fixture).

    conv3x3(width)-BN-ReLU, then a residual block
    conv3x3-BN-ReLU-conv3x3-BN added to its input and ReLU'd, global average
    pooling and ``Linear(width, out_dim)``. Trains to >90% on digits in
    seconds on a CPU; exercises convs, BatchNorm and one residual add.
    """
    return SmallCNN(out_dim=out_dim, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- #
# Small ViT for CIFAR (32x32)
# --------------------------------------------------------------------------- #
def cifar_vit(width: int = 1, out_dim: int = 384, patch_size: int = 4, depth: int = 4,
              mlp_ratio: float = 4.0, img_size: int = 32) -> nn.Module:
    """A small timm ``VisionTransformer`` for 32x32 images (benchmark fixture).

    Patch 4 (64 patch tokens + a class token), embedding dimension
    ``96 * width``, ``3 * width`` heads of 32 dimensions, ``depth`` pre-norm
    blocks (LayerNorm, fused-qkv attention, GELU MLP with ``mlp_ratio``), final
    LayerNorm, the class token as the pooled feature (``global_pool='token'``)
    and ``Linear(96 * width, out_dim)``. At width 1 and 32 px: 29.1 M
    multiply-adds per image (``fxzip.evaluate.count_macs``), 0.50 M
    parameters. ``out_dim=384`` is the CLIP-style embedding of
    ``benchmarks/train_cifar.py --arch vit``.
    """
    from timm.models.vision_transformer import VisionTransformer

    w = int(width)
    if w < 1:
        raise ValueError("width must be a positive integer")
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=out_dim,
                             global_pool="token", embed_dim=96 * w, depth=depth, num_heads=3 * w,
                             mlp_ratio=mlp_ratio)


def redraw(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every floating parameter/buffer of ``model`` in place at O(1) scale.

    A test or benchmark fixture: timm zero-initialises the last norm of every
    residual branch and starts layer scales at 1e-6, so on a fresh model a wrong
    fold is invisible. Running variances in [0.5, 1.5), means and biases
    N(0, 0.3^2), vectors and scales +-[0.5, 1.5) with 20 % negative, weights
    He-normal; deterministic for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif leaf == "running_mean" or leaf == "bias":
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
            elif t.dim() <= 1 or "gamma" in leaf or "token" in leaf or "pos" in leaf or "scale" in leaf:
                sign = torch.where(torch.rand(t.shape, generator=gen) < 0.2, -1.0, 1.0)
                t.copy_(sign * (torch.rand(t.shape, generator=gen) + 0.5))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return model
