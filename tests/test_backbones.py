"""The retrieval backbones: named stages, channels and sizes, frozen BN, and local-only pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import GoogLeNet as TorchvisionGoogLeNet
from torchvision.models import resnet50 as torchvision_resnet50

from harness import registry
from harness.errors import ConfigError
from harness.model import StagedBackbone

# stage → (channels, spatial size at a 224 input)
EXPECTED = {
    "googlenet": {
        "conv1": (64, 112), "pool1": (64, 56), "conv2": (64, 56), "conv3": (192, 56), "pool2": (192, 28),
        "inception3a": (256, 28), "inception3b": (480, 28), "pool3": (480, 14),
        "inception4a": (512, 14), "inception4b": (512, 14), "inception4c": (512, 14),
        "inception4d": (528, 14), "inception4e": (832, 14),
        "pool4": (832, 7), "inception5a": (832, 7), "inception5b": (1024, 7),
    },
    "bn_inception": {
        "conv1": (64, 112), "pool1": (64, 56), "conv2": (192, 56), "pool2": (192, 28),
        "inception3a": (256, 28), "inception3b": (320, 28), "inception3c": (576, 14),
        "inception4a": (576, 14), "inception4b": (576, 14), "inception4c": (608, 14),
        "inception4d": (608, 14), "inception4e": (1056, 7),
        "inception5a": (1024, 7), "inception5b": (1024, 7),
    },
    "resnet50": {
        "stem": (64, 56), "layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14), "layer4": (2048, 7),
    },
}  # fmt: skip


def build(name: str, **params: object) -> StagedBackbone:
    return registry.build("backbone", name, path="backbone", **params)


@pytest.fixture(scope="module")
def backbones() -> dict[str, StagedBackbone]:
    return {name: build(name).eval() for name in EXPECTED}


def staged_forward(
    backbone: StagedBackbone, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    shapes, prev = {}, None
    for stage in backbone.stage_names:
        x = backbone(x, start=prev, end=stage)
        shapes[stage] = (x.shape[1], x.shape[2])
        assert x.shape[2] == x.shape[3]
        prev = stage
    return x, shapes


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stages_channels_and_sizes(backbones: dict[str, StagedBackbone], name: str) -> None:
    backbone = backbones[name]
    assert backbone.stage_names == list(EXPECTED[name])
    assert backbone.stage_channels == {s: c for s, (c, _) in EXPECTED[name].items()}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out, shapes = staged_forward(backbone, x)
        assert shapes == EXPECTED[name]
        torch.testing.assert_close(out, backbone(x))
        # a split at any stage composes back to the full network
        mid = backbone.stage_names[len(backbone.stage_names) // 2]
        torch.testing.assert_close(backbone(backbone(x, end=mid), start=mid), out)


def test_data_configs() -> None:
    bni = build("bn_inception").data_config
    assert (bni.channel_order, bni.scale, bni.mean, bni.std) == (
        "BGR",
        255.0,
        (104.0, 117.0, 128.0),
        (1.0,) * 3,
    )
    res = build("resnet50").data_config
    assert (res.input_size, res.resize_size, res.mean) == (224, 256, (0.485, 0.456, 0.406))
    # torchvision's GoogLeNet weights expect (x - 0.5) / 0.5: what transform_input=True computes internally
    goo = build("googlenet").data_config
    assert (goo.mean, goo.std, goo.channel_order) == ((0.5,) * 3, (0.5,) * 3, "RGB")


def test_googlenet_equals_torchvision_features() -> None:
    """Same weights → the staged network computes torchvision's features (transform_input off)."""
    ref = TorchvisionGoogLeNet(aux_logits=False, transform_input=False, init_weights=True).eval()
    ours = build("googlenet").eval()
    ours.load_state_dict({f"stages.{k}": v for k, v in _googlenet_native_to_stages(ref.state_dict()).items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_features = torch.flatten(ref.avgpool(ours(x)), 1)
        torch.testing.assert_close(ref.fc(ref.dropout(ref_features)), ref(x))


def _googlenet_native_to_stages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rename = {"maxpool1": "pool1", "maxpool2": "pool2", "maxpool3": "pool3", "maxpool4": "pool4"}
    out = {}
    for k, v in state.items():
        head, rest = k.split(".", 1)
        if head != "fc":
            out[f"{rename.get(head, head)}.{rest}"] = v
    return out


def test_resnet_last_stride() -> None:
    backbone = build("resnet50", last_stride=1).eval()
    with torch.no_grad():
        _, shapes = staged_forward(backbone, torch.randn(1, 3, 224, 224))
    assert shapes["layer3"] == (1024, 14) and shapes["layer4"] == (2048, 14)


def test_bn_inception_uses_the_caffe_port_names() -> None:
    keys = {k.split(".", 2)[2] for k in build("bn_inception").state_dict()}
    for key in [
        "conv1_7x7_s2.weight", "conv1_7x7_s2_bn.running_var", "conv2_3x3_reduce.bias", "conv2_3x3_bn.weight",
        "inception_3a_1x1.weight", "inception_3a_double_3x3_2_bn.bias", "inception_3a_pool_proj.weight",
        "inception_3c_3x3.weight", "inception_3c_double_3x3_2_bn.running_mean",
        "inception_4e_3x3_reduce.weight", "inception_5b_pool_proj_bn.weight",
    ]:  # fmt: skip
        assert key in keys, key
    assert not any(
        k.startswith(("inception_3c_pool_proj", "inception_4e_pool_proj", "inception_3c_1x1")) for k in keys
    )
    assert len([k for k in keys if k.endswith("_bn.weight")]) == 69  # every conv is followed by a BN


@pytest.mark.parametrize("name", ["bn_inception", "resnet50"])
def test_frozen_bn_stays_in_eval_under_train(name: str) -> None:
    backbone = build(name, frozen_bn=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert backbone.training and any(isinstance(m, nn.Conv2d) and m.training for m in backbone.modules())
    x = torch.randn(2, 3, 64, 64)
    before = bns[0].running_mean.clone()
    backbone(x)
    torch.testing.assert_close(bns[0].running_mean, before)
    assert all(m.training for m in build(name).train().modules())


# -- pretrained weights -------------------------------------------------------------------------------------


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize(
    ("name", "filename", "source"),
    [
        ("googlenet", "googlenet-1378be20.pth", "https://download.pytorch.org/models/googlenet-1378be20.pth"),
        ("bn_inception", "bn_inception-52deb4733.pth", "data.lip6.fr/cadene/pretrainedmodels/"),
        ("resnet50", "resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    ],
)
def test_missing_imagenet_weights_say_which_file_goes_where(
    hub_dir: Path, name: str, filename: str, source: str
):
    with pytest.raises(ConfigError) as err:
        build(name, pretrained="imagenet")
    msg = str(err.value)
    assert filename in msg and source in msg and str(hub_dir) in msg and "backbone.pretrained" in msg
    with pytest.raises(ConfigError, match="never downloads"):
        build(name, pretrained=True)


def test_missing_or_bad_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build("bn_inception", pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ConfigError, match="is not a state dict"):
        build("bn_inception", pretrained=str(bad))
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        build("bn_inception", pretrained=str(bad))
    other = tmp_path / "googlenet.pth"
    torch.save(build("googlenet").state_dict(), other)
    with pytest.raises(ConfigError, match=r"does not fit BNInception: missing conv1_7x7_s2\.weight"):
        build("bn_inception", pretrained=str(other))


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(sa[k], sb[k], msg=k)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_load_own_state_dict_from_a_file(tmp_path: Path, name: str) -> None:
    source = build(name)
    with torch.no_grad():  # non-default BN statistics, so buffers are checked too
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    _assert_same_weights(build(name, pretrained=str(path)), source)


def test_imagenet_files_in_native_format_load(hub_dir: Path) -> None:
    hub_dir.mkdir(parents=True)
    # torchvision layouts (with their classifier keys, which are ignored)
    tv_googlenet = TorchvisionGoogLeNet(aux_logits=True, transform_input=False, init_weights=True)
    torch.save(tv_googlenet.state_dict(), hub_dir / "googlenet-1378be20.pth")
    loaded = build("googlenet", pretrained="imagenet")
    expected = _googlenet_native_to_stages(tv_googlenet.state_dict())
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, expected[k.removeprefix("stages.")])

    tv_resnet = torchvision_resnet50()
    torch.save(tv_resnet.state_dict(), hub_dir / "resnet50-0676ba61.pth")
    loaded = build("resnet50", pretrained="imagenet")
    torch.testing.assert_close(loaded.stages.stem.conv1.weight, tv_resnet.conv1.weight)
    torch.testing.assert_close(loaded.stages.layer4[2].bn3.running_var, tv_resnet.layer4[2].bn3.running_var)

    # the Caffe-port file: flat keys, BN vectors stored as [1, C], no num_batches_tracked, a classifier
    source = build("bn_inception")
    caffe = {
        k.split(".", 2)[2]: (v.unsqueeze(0) if ("_bn." in k and v.dim() == 1) else v)
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    caffe["last_linear.weight"] = torch.zeros(1000, 1024)
    torch.save(caffe, hub_dir / "bn_inception-52deb4733.pth")
    _assert_same_weights(build("bn_inception", pretrained="imagenet"), source)


def test_pretrained_option_is_validated_by_the_registry() -> None:
    assert registry.validate_params("backbone", "resnet50", {"last_stride": 3}, "backbone")
    assert not registry.validate_params(
        "backbone", "resnet50", {"last_stride": 1, "pretrained": "x"}, "backbone"
    )
