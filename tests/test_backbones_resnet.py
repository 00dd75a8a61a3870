"""ResNet-18/34 (and the shared ResNet staging): stages, sizes, last stride, local-only ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet34

from harness import registry
from harness.errors import ConfigError
from harness.model import StagedBackbone

TORCHVISION = {"resnet18": resnet18, "resnet34": resnet34}
FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth"}
# stage → (channels, spatial size at a 224 input)
EXPECTED = {
    "stem": (64, 56),
    "layer1": (64, 56),
    "layer2": (128, 28),
    "layer3": (256, 14),
    "layer4": (512, 7),
}


def build(name: str, **params: object) -> StagedBackbone:
    return registry.build("backbone", name, path="backbone", **params)


def stage_shapes(backbone: StagedBackbone, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    shapes, prev = {}, None
    for stage in backbone.stage_names:
        x = backbone(x, start=prev, end=stage)
        shapes[stage] = (x.shape[1], x.shape[2])
        prev = stage
    return shapes


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_stages_feature_info_and_torchvision_features(name: str) -> None:
    backbone = build(name).eval()
    assert backbone.stage_names == list(EXPECTED)
    assert backbone.stage_channels == {s: c for s, (c, _) in EXPECTED.items()}
    assert (backbone.data_config.input_size, backbone.data_config.resize_size) == (224, 256)
    with torch.no_grad():
        assert stage_shapes(backbone, torch.randn(1, 3, 224, 224)) == EXPECTED
        ref = TORCHVISION[name]().eval()
        native = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        backbone.load_state_dict(
            {
                f"stages.{'stem.' if k.split('.')[0] in ('conv1', 'bn1') else ''}{k}": v
                for k, v in native.items()
            }
        )
        x = torch.randn(2, 3, 64, 64)
        expected = x
        for layer in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            expected = getattr(ref, layer)(expected)
        torch.testing.assert_close(backbone(x), expected)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_last_stride_one_keeps_layer4_at_layer3_size(name: str) -> None:
    backbone = build(name, last_stride=1).eval()
    with torch.no_grad():
        shapes = stage_shapes(backbone, torch.randn(1, 3, 224, 224))
    assert shapes["layer3"] == (256, 14) and shapes["layer4"] == (512, 14)


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_imagenet_weights_come_from_the_local_cache_only(hub_dir: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(name, pretrained="imagenet")
    assert FILES[name] in str(err.value) and str(hub_dir) in str(err.value)
    hub_dir.mkdir(parents=True)
    ref = TORCHVISION[name]()
    torch.save(ref.state_dict(), hub_dir / FILES[name])  # torchvision layout, classifier included
    loaded = build(name, pretrained="imagenet")
    torch.testing.assert_close(loaded.stages.stem.conv1.weight, ref.conv1.weight)
    torch.testing.assert_close(loaded.stages.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    with pytest.raises(ConfigError, match=r"does not fit ResNet34: missing layer1\.2\.conv1\.weight"):
        build("resnet34", pretrained=str(_save(hub_dir / "r18.pth", resnet18())))


def _save(path: Path, net: torch.nn.Module) -> Path:
    torch.save(net.state_dict(), path)
    return path
