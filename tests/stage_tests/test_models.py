"""stages/common/models.py: the model zoo, bundles and weight loading."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision

from stages.common.models import (
    BUNDLE_FORMAT,
    ModelParams,
    WeightsError,
    build_model,
    load_model,
    load_weights,
    read_bundle,
    save_model,
)

ARCHS = ["resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "gem_resnet"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", ["linear", "conv"])
def test_build_every_arch_and_head(arch, head):
    torch.manual_seed(0)
    m = build_model({"arch": arch, "head": head}, 5).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 5)


def _onnx_ops(module, size=32) -> set[str]:
    import onnx

    f = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.randn(1, 3, size, size),), f, dynamo=False, opset_version=13)
    return {n.op_type for n in onnx.load_from_string(f.getvalue()).graph.node}


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "gem_resnet"])
def test_conv_head_exports_without_flatten_or_reshape(arch):
    ops = _onnx_ops(build_model({"arch": arch, "head": "conv"}, 4))
    assert not ops & {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "View"}, ops
    assert "ReduceMean" in ops
    assert "Flatten" in _onnx_ops(build_model({"arch": arch, "head": "linear"}, 4))


def test_gem_options():
    m = build_model({"arch": "gem_resnet", "depth": 34, "gem_p": 2.5, "stem": "small", "in_channels": 1}, 3)
    assert isinstance(m.avgpool.p, torch.nn.Parameter) and float(m.avgpool.p.detach()) == pytest.approx(2.5)
    assert m.conv1.in_channels == 1 and m.conv1.kernel_size == (3, 3) and isinstance(m.maxpool, torch.nn.Identity)
    assert len(m.layer3) == 6  # ResNet-34 layout
    assert m(torch.randn(2, 1, 20, 28)).shape == (2, 3)  # any input size
    fixed = build_model({"arch": "gem_resnet", "gem_learnable": False}, 3)
    assert "avgpool.p" not in dict(fixed.named_parameters()) and "avgpool.p" in fixed.state_dict()
    with pytest.raises(ValueError):
        ModelParams(arch="gem_resnet", depth=50)
    with pytest.raises(ValueError):
        build_model("resnet18", 1)


def test_bundle_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = build_model({"arch": "mobilenet_v3_small", "head": "conv"}, 4).eval()
    params = ModelParams(arch="mobilenet_v3_small", head="conv", pretrained=tmp_path / "x.pth")
    save_model(tmp_path / "model.pt", m, params, 4)
    b = read_bundle(tmp_path)
    assert b["format"] == BUNDLE_FORMAT and b["num_classes"] == 4
    assert b["arch"]["arch"] == "mobilenet_v3_small" and b["arch"]["pretrained"] is None
    m2 = load_model(tmp_path / "model.pt")
    assert not m2.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.pt")
    m3 = pickle.loads(pickle.dumps(m2))  # the lazily created classes pickle by name
    assert type(m3).__name__ == "EdgeMobileNetV3"


def test_load_torchvision_state_dict_reinits_head(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)  # 1000 classes, torchvision keys
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    for arch in ({"arch": "resnet18"}, {"arch": "gem_resnet"}, {"arch": "resnet18", "head": "conv"}):
        m = build_model(arch, 7)
        head_before = m.fc.weight.detach().clone()
        report = load_weights(m, tmp_path / "resnet18.pth")
        assert report["reinitialized"] == ["fc.bias", "fc.weight"]
        assert torch.equal(m.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
        assert torch.equal(m.fc.weight, head_before)  # kept as built
    # same class count: a Linear head loads into a 1x1-conv head (reshaped)
    m = build_model({"arch": "resnet18", "head": "conv"}, 1000)
    report = load_weights(m, tv.state_dict())
    assert "fc.weight" in report["adapted"] and torch.equal(m.fc.weight[:, :, 0, 0], tv.fc.weight)
    # a 3-channel stem loads into a 1-channel one (summed over RGB)
    g = build_model({"arch": "resnet18", "in_channels": 1}, 1000)
    load_weights(g, tv.state_dict())
    assert torch.allclose(g.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))
    mb = torchvision.models.mobilenet_v3_small(weights=None)
    m = build_model("mobilenet_v3_small", 3)
    assert load_weights(m, mb.state_dict())["reinitialized"] == ["classifier.3.bias", "classifier.3.weight"]


def test_load_our_checkpoints(tmp_path):
    torch.manual_seed(2)
    src = build_model("mobilenet_v3_small", 3)
    save_model(tmp_path / "model.pt", src, {"arch": "mobilenet_v3_small"}, 3)
    dst = build_model("mobilenet_v3_small", 3)
    assert load_weights(dst, tmp_path)["reinitialized"] == []
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # a Lightning checkpoint of the train stage ("model." prefix)
    ckpt = {"epoch": 3, "pytorch-lightning_version": "2",
            "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    dst = build_model("mobilenet_v3_small", 3)
    load_weights(dst, tmp_path / "last.ckpt")
    assert torch.equal(dst.classifier[3].weight, src.classifier[3].weight)


def test_mismatched_weights_list_keys(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError) as e:
        load_weights(build_model("mobilenet_v3_small", 3), tmp_path / "r18.pth")
    msg = str(e.value)
    assert ("missing keys" in msg and "features.0.0.weight" in msg
            and "unexpected keys" in msg and "layer1.0.conv1.weight" in msg)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \(\d+\): layer1\.2\."):
        load_weights(build_model({"arch": "gem_resnet", "depth": 18}, 3), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="shape mismatches.*conv1.weight"):
        load_weights(build_model({"arch": "resnet18", "stem": "small"}, 1000), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(build_model("resnet18", 3), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(build_model("resnet18", 3), tmp_path / "junk.pth")


def test_stage_modules_import_without_torch():
    code = ("import sys; import stages.common.models, stages.dataset, stages.train, stages.clip_outliers;"
            "bad = [m for m in ('torch', 'torchvision', 'pytorch_lightning', 'sklearn') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bn_momentum_applies_to_every_batchnorm():
    import torch

    from stages.common.models import build_model

    m = build_model({"arch": "mobilenet_v3_small", "bn_momentum": 0.1}, 3)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and {b.momentum for b in bns} == {0.1}
    default = build_model({"arch": "mobilenet_v3_small"}, 3)
    assert {b.momentum for b in default.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)} == {0.01}


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_the_head_follows_the_class_names(tmp_path, head):
    """A model.pt in a folder with labels.txt (a train output): the same classes in another order
    reorder the head's rows; other classes re-initialise it even at the same count; no names: as built."""
    from stages.common.bundle import write_labels

    arch = {"arch": "mobilenet_v3_small", "head": head}
    torch.manual_seed(5)
    src = build_model(arch, 3)
    save_model(tmp_path / "model.pt", src, arch, 3)
    write_labels(tmp_path / "labels.txt", ["无鸟", "有鸟", "猫"])
    w, b = src.classifier[3].weight.detach(), src.classifier[3].bias.detach()

    dst = build_model(arch, 3)
    report = load_weights(dst, tmp_path, labels=["猫", "无鸟", "有鸟"])
    assert report["head"] == "rows reordered: 无鸟, 有鸟, 猫 -> 猫, 无鸟, 有鸟" and report["reinitialized"] == []
    assert torch.equal(dst.classifier[3].weight, w[[2, 0, 1]]) and torch.equal(dst.classifier[3].bias, b[[2, 0, 1]])
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(dst.eval()(x), src.eval()(x)[:, [2, 0, 1]], atol=1e-5)  # the same answers, renamed

    dst = build_model(arch, 3)
    report = load_weights(dst, tmp_path, labels=["无鸟", "有鸟", "狗"])
    assert report["head"].startswith("re-initialised: the source's classes") and "狗" in report["head"]
    assert report["reinitialized"] == ["classifier.3.bias", "classifier.3.weight"]
    assert not torch.equal(dst.classifier[3].weight, w)

    assert load_weights(build_model(arch, 3), tmp_path,
                        labels=["无鸟", "有鸟", "猫"])["head"].startswith("kept: the same")
    assert load_weights(build_model(arch, 3), src.state_dict(),
                        labels=["a", "b", "c"])["head"].startswith("kept (no class")
