"""Encoder shapes, unit norms, channels and the predictor switch for every backbone."""

import pytest
import torch
from torch import nn

from secu.config import ModelConfig
from secu.model import Encoder, build_backbone, build_projection


def _unit_rows(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=1), torch.ones(x.shape[0]), atol=1e-5)


@pytest.mark.parametrize(
    ("backbone", "channels", "size", "width"),
    [
        ("small_cnn", 1, 28, 128),  # 4 * cnn_width
        ("small_cnn", 3, 32, 128),
        ("resnet18_cifar", 3, 32, 512),
        ("resnet18_cifar", 1, 28, 512),
        ("resnet18_stl", 3, 96, 512),
        ("resnet50", 1, 64, 2048),  # grayscale replaces torchvision's first conv
    ],
)
@torch.no_grad()
def test_encoder_shapes_and_unit_norm(backbone: str, channels: int, size: int, width: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, in_channels=channels, feat_dim=16)
    enc = Encoder(cfg)
    assert enc.feat_dim == 16 and enc.backbone_dim == width
    feats: list[torch.Tensor] = []
    enc.backbone.register_forward_hook(lambda _m, _i, out: feats.append(out))
    z, p = enc(torch.randn(2, channels, size, size))
    assert z.shape == (2, 16) and p is None
    assert _unit_rows(z)
    assert feats[0].shape == (2, width)


def test_embed_is_the_projection() -> None:
    enc = Encoder(ModelConfig(backbone="small_cnn", in_channels=1, cnn_width=8, predictor=True)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(x), enc(x)[0])


def test_small_image_stems() -> None:
    cifar, _ = build_backbone(ModelConfig(backbone="resnet18_cifar", in_channels=1))
    stl, _ = build_backbone(ModelConfig(backbone="resnet18_stl"))
    for net, c_in, has_pool in ((cifar, 1, False), (stl, 3, True)):
        conv1 = net.conv1
        assert isinstance(conv1, nn.Conv2d)
        assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.in_channels == c_in
        assert isinstance(net.maxpool, nn.MaxPool2d) is has_pool
    # The cifar stem keeps 32x32 into layer1; the stl stem halves 96 to 48.
    x = torch.randn(1, 3, 96, 96)
    assert stl.maxpool(stl.relu(stl.bn1(stl.conv1(x)))).shape[-1] == 48


def test_predictor_output_and_gradients() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="small_cnn", in_channels=1, cnn_width=8, feat_dim=12, mlp="imagenet", predictor=True, hidden_dim=24
    )
    enc = Encoder(cfg)
    z, p = enc(torch.randn(4, 1, 28, 28))
    assert p is not None and p.shape == z.shape == (4, 12)
    assert _unit_rows(z) and _unit_rows(p)
    assert not torch.allclose(z, p)
    (p.sum() + z.sum()).backward()
    assert enc.predictor is not None
    assert all(param.grad is not None for param in enc.parameters())


def test_projection_layouts() -> None:
    cifar = build_projection(64, ModelConfig(mlp="cifar", feat_dim=8))
    linears = [m for m in cifar if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 8)]
    imagenet = build_projection(64, ModelConfig(mlp="imagenet", feat_dim=8, hidden_dim=32))
    layers = [type(m).__name__ for m in imagenet]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    linears = [m for m in imagenet if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 8)]


def test_batchnorm_makes_batch_statistics_matter() -> None:
    # Train mode normalises with batch statistics: the same image gets a different embedding in a
    # different batch; eval mode (inference) does not.
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(backbone="small_cnn", in_channels=1, cnn_width=8, feat_dim=8))
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(enc(x[:3])[0][0], enc(x)[0][0], atol=1e-4)
        enc.eval()
        torch.testing.assert_close(enc(x[:3])[0][0], enc(x)[0][0], atol=1e-5, rtol=1e-4)
