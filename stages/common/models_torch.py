"""The torch side of the model zoo: module-level classes (picklable, importable by DDP ranks).

Imports torch at the top, so only code that runs a model imports it (inside a stage's ``run``);
``stages.common.models`` (ModelParams, bundles) stays importable while the engine plans.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.resnet import BasicBlock, ResNet


class GeM(nn.Module):
    """Generalised-mean pooling: (mean(x.clamp(eps) ** p)) ** (1/p), output N x C x 1 x 1."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        t = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(t)
        else:
            self.register_buffer("p", t)
        self.eps = eps

    def forward(self, x):
        p = self.p
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), 1).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.3f}, eps={self.eps}"


def _conv_like_linear(cin: int, cout: int, linear_init: str) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=1, bias=True)
    if linear_init == "normal":  # torchvision mobilenet's classifier init
        nn.init.normal_(conv.weight, 0, 0.01)
        nn.init.zeros_(conv.bias)
    return conv  # else: PyTorch default init, the same as nn.Linear's


class EdgeResNet(ResNet):
    """torchvision ResNet (same state_dict keys) with stem/pool/head options."""

    head_prefixes = ("fc.",)  # re-initialised when the class count differs
    trainable_prefixes = ("fc.", "avgpool.")  # left trainable when features are frozen
    first_conv = "conv1"

    def __init__(
        self,
        depth: int,
        num_classes: int,
        head: str = "linear",
        in_channels: int = 3,
        stem: str = "imagenet",
        pool: str = "avg",
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        dropout: float = 0.0,
    ) -> None:
        layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        if stem == "small":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if pool == "gem":
            self.avgpool = GeM(gem_p, gem_learnable)
        self.conv_head = head == "conv"
        if self.conv_head:
            self.fc = _conv_like_linear(512, num_classes, "default")
        self.dropout = float(dropout)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        if self.conv_head:
            return self.fc(x).mean(dim=(2, 3))
        return self.fc(torch.flatten(x, 1))


class EdgeMobileNetV3(MobileNetV3):
    """torchvision MobileNetV3 (same state_dict keys) with in_channels/head options."""

    head_prefixes = ("classifier.3.",)
    trainable_prefixes = ("classifier.",)
    first_conv = "features.0.0"

    def __init__(
        self,
        arch: str,
        num_classes: int,
        head: str = "linear",
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        setting, last_channel = _mobilenet_v3_conf(arch, width_mult=width_mult)
        super().__init__(setting, last_channel, num_classes=num_classes, dropout=dropout)
        if in_channels != 3:
            old = self.features[0][0]
            new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            nn.init.kaiming_normal_(new.weight, mode="fan_out")
            self.features[0][0] = new
        self.conv_head = head == "conv"
        if self.conv_head:
            lin0, lin3 = self.classifier[0], self.classifier[3]
            self.classifier[0] = _conv_like_linear(lin0.in_features, lin0.out_features, "normal")
            self.classifier[3] = _conv_like_linear(lin3.in_features, lin3.out_features, "normal")

    def forward(self, x):
        x = self.avgpool(self.features(x))
        if self.conv_head:
            return self.classifier(x).mean(dim=(2, 3))
        return self.classifier(torch.flatten(x, 1))
