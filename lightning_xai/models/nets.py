"""Reference networks: a LeNet-style CNN, an MLP and a small residual CNN (any input size, any channel count)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LeNet", "MLP", "SmallResNet", "LeNet300100", "LeNet5Caffe", "build_model", "MODELS"]


class LeNet(nn.Module):
    """Conv(3×3)-ReLU ×2, max-pool, Conv(3×3)-ReLU, max-pool, then two dense layers.

    Example:
        >>> import torch
        >>> LeNet(in_channels=1, num_classes=10, input_size=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, input_size: int = 8, width: int = 32, hidden: int = 128
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of ``hidden`` units, then a linear classifier."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998), the standard compression benchmark on MNIST (Han et al. 2016): 784 → 300 →
    100 → 10 with ReLU (266,610 parameters).

    Example:
        >>> import torch
        >>> net = LeNet300100()
        >>> net(torch.zeros(2, 1, 28, 28)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 266610)
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNet5Caffe(nn.Module):
    """LeNet-5 as in Caffe's MNIST example, the other standard compression benchmark: conv 20@5×5 → max-pool →
    conv 50@5×5 → max-pool → fc 500 (ReLU) → fc 10 (431,080 parameters on 28×28 inputs).

    Example:
        >>> import torch
        >>> net = LeNet5Caffe()
        >>> net(torch.zeros(2, 1, 28, 28)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 431080)
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2),
        )
        side = ((input_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * side * side, 500), nn.ReLU(), nn.Linear(500, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, three stages of ``blocks`` basic blocks (widths w, 2w, 4w), global pool, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


MODELS = ("lenet", "mlp", "resnet", "char_transformer", "lenet300100", "lenet5caffe")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10, **kwargs: int) -> nn.Module:
    """Build a reference model by name for inputs of ``input_shape`` (``(C, H, W)`` or ``(features,)``)."""
    if name == "lenet":
        if len(input_shape) != 3:
            raise ValueError(f"`model`='lenet' needs image inputs (C, H, W), got input shape {input_shape}")
        return LeNet(input_shape[0], num_classes, input_shape[1], **kwargs)
    if name == "mlp":
        features = 1
        for d in input_shape:
            features *= d
        return MLP(features, num_classes, **kwargs)
    if name == "resnet":
        if len(input_shape) != 3:
            raise ValueError(f"`model`='resnet' needs image inputs (C, H, W), got input shape {input_shape}")
        return SmallResNet(input_shape[0], num_classes, **kwargs)
    if name == "lenet300100":
        features = 1
        for d in input_shape:
            features *= d
        return LeNet300100(features, num_classes)
    if name == "lenet5caffe":
        if len(input_shape) != 3:
            raise ValueError(f"`model`='lenet5caffe' needs image inputs (C, H, W), got input shape {input_shape}")
        return LeNet5Caffe(input_shape[0], num_classes, input_shape[1])
    if name == "char_transformer":
        from lightning_xai.models.char_transformer import CharTransformer

        return CharTransformer(num_classes=num_classes, max_len=max(input_shape[0], 2), **kwargs)
    raise ValueError(f"`model` must be one of {list(MODELS)}, got {name!r}")
