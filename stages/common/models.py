"""The model zoo and the ``model.pt`` bundle format.

Importing this module does not import torch (stage modules use ``ModelParams`` at top level while the
engine plans); torch/torchvision are imported when a model is built or loaded. The torch classes
(GeM, EdgeResNet, EdgeMobileNetV3) are ordinary module-level classes in ``models_torch.py``.

Architectures (``model.arch``):
- ``resnet18``            torchvision ResNet-18.
- ``mobilenet_v3_small``  torchvision MobileNetV3-Small (``width_mult``, ``dropout``).
- ``mobilenet_v3_large``  torchvision MobileNetV3-Large.
- ``gem_resnet``          ResNet-18/34 (``depth``) with generalised-mean pooling (learnable ``p``).

Heads (``model.head``):
- ``linear`` (default): torchvision's pooling -> flatten -> Linear; state_dict keys are torchvision's.
- ``conv``: pooling (kept 4-D) -> 1x1 Conv2d -> ``mean`` over H,W (ReduceMean, keepdims=0) giving
  N x classes. The exported ONNX graph holds no Flatten/Reshape/View/Squeeze (for converters that
  reject them). Linear and 1x1-conv weights load into each other (same keys).
  Note for ncnn (MaixII-Dock/awnn goes ONNX/TorchScript -> ncnn): pnnx turns the ``linear`` head into
  Pooling -> InnerProduct with no Reshape layer, but the ``conv`` head into InnerProduct -> Reshape ->
  Reduction; so ``linear`` is the head for awnn, ``conv`` the one for flatten-free ONNX.

``model.pretrained`` is a local file (a torchvision state_dict or one of our bundles/checkpoints) or
torchvision's weights by name (``imagenet``, ``IMAGENET1K_V1``, ...): validation turns the name into
the file in torch's hub cache, downloaded by ``run`` when it is not there (stages/common/pretrained.py),
and records the weights' name in ``pretrained_weights`` and the published sha256 prefix and URL in
``pretrained_published``; the key holds that name and the file's digest, or the published prefix when
the file is absent (``plan`` before the download) or is torchvision's own (stage.PublishedDigest).
The builders here always get ``weights=None``: weights are loaded by ``load_weights``.

Bundle (``model.pt``): ``torch.save({"format": "edgepipe.model/1", "arch": <ModelParams dict>,
"num_classes": int, "state_dict": ...})``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import model_validator

from engine.contract.stage import HASH_CONTENT, Params, PublishedDigest
from stages.common.errors import WeightsError as WeightsError  # re-exported: raised here
from stages.common.pretrained import ensure, is_weights_name, published

BUNDLE_FORMAT = "edgepipe.model/1"
BUNDLE_NAME = "model.pt"
ARCHS = ("resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "gem_resnet")


class ModelParams(Params):
    """The ``model`` config section."""

    arch: Literal["resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "gem_resnet"] = "resnet18"
    # linear: flatten + Linear (torchvision); conv: 1x1 conv head, no flatten/reshape in the graph
    head: Literal["linear", "conv"] = "linear"
    # gem_resnet backbone depth
    depth: Literal[18, 34] = 18
    in_channels: int = 3
    # resnet18 / gem_resnet: "small" = 3x3 stride-1 first conv and no max-pool (inputs <= 64 px)
    stem: Literal["imagenet", "small"] = "imagenet"
    # mobilenet_v3 channel multiplier
    width_mult: float = 1.0
    # dropout before the classifier; null = the architecture's default (mobilenet 0.2, resnets 0)
    dropout: float | None = None
    # gem_resnet: initial p of generalised-mean pooling and whether it is learned
    gem_p: float = 3.0
    gem_learnable: bool = True
    # BatchNorm running-statistics momentum; null = the architecture's (torchvision's MobileNetV3 uses
    # 0.01, whose statistics lag far behind the weights in a short run from scratch: 0.1 fixes that)
    bn_momentum: float | None = None
    # starting weights: `imagenet` (or torchvision's IMAGENET1K_V1, DEFAULT, ...: downloaded once into
    # torch's hub cache), or a local file (torchvision state_dict, our model.pt or a train checkpoint).
    # After validation it is the file's path; its content digest is in the key
    pretrained: Annotated[Path | None, HASH_CONTENT] = None
    # not settings: validation writes torchvision's weights name here (ResNet18_Weights.IMAGENET1K_V1)
    # when `pretrained` named weights, so the key holds the name beside the file's digest, and the
    # sha256 prefix torchvision publishes with its URL, which stands for the file in the key when the
    # file is absent (`plan` before `run` downloads it) or is torchvision's own
    pretrained_weights: str | None = None
    pretrained_published: Annotated[dict[str, str] | None, PublishedDigest("pretrained")] = None

    @model_validator(mode="before")
    @classmethod
    def _weights_by_name(cls, data: Any) -> Any:
        """`pretrained: imagenet` -> the hub cache's file (fetched by `run`) and the weights' name."""
        if not isinstance(data, Mapping) or not is_weights_name(data.get("pretrained")):
            return data
        given, arch = str(data["pretrained"]), str(data.get("arch", "resnet18"))
        if arch in ("resnet18", "gem_resnet") and data.get("stem", "imagenet") != "imagenet":
            raise ValueError(f"pretrained={given}: torchvision's weights have the 7x7 first conv of stem: imagenet, "
                             f"not stem: {data.get('stem')}; set model.stem=imagenet or model.pretrained=null")
        if arch.startswith("mobilenet") and float(data.get("width_mult", 1.0)) != 1.0:
            raise ValueError(f"pretrained={given}: torchvision's weights are for width_mult 1.0, "
                             f"not {data.get('width_mult')}")
        weights = published(arch, given, int(data.get("depth", 18)))  # ValueError: the names that exist
        path = ensure(weights, f"model.pretrained={given}")  # WeightsUnavailable: one line, before any stage
        return {**data, "pretrained": path, "pretrained_weights": weights.name,
                "pretrained_published": {"sha256": weights.sha256_prefix, "url": weights.source_url()}}

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.in_channels < 1:
            raise ValueError("in_channels must be >= 1")
        if self.width_mult <= 0:
            raise ValueError("width_mult must be > 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.gem_p <= 0:
            raise ValueError("gem_p must be > 0")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError("bn_momentum must be in (0, 1]")
        return self

    def arch_dict(self) -> dict:
        """What a bundle stores: everything but the (machine-specific) pretrained path."""
        d = self.model_dump(mode="json")
        d["pretrained"] = d["pretrained_weights"] = d["pretrained_published"] = None
        return d


# -- building ---------------------------------------------------------------------------------------
def _params(arch: Mapping[str, Any] | ModelParams | str) -> ModelParams:
    if isinstance(arch, ModelParams):
        return arch
    if isinstance(arch, str):
        return ModelParams(arch=arch)
    return ModelParams.model_validate(dict(arch))


def build_model(arch: Mapping[str, Any] | ModelParams | str, num_classes: int):
    """A freshly initialised model (never downloads weights; ``pretrained`` is NOT loaded here)."""
    p = _params(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = _build(p, num_classes)
    if p.bn_momentum is not None:
        import torch

        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = p.bn_momentum
    return model


def _build(p: ModelParams, num_classes: int):
    from .models_torch import EdgeMobileNetV3, EdgeResNet

    if p.arch in ("resnet18", "gem_resnet"):
        return EdgeResNet(
            depth=18 if p.arch == "resnet18" else p.depth,
            num_classes=num_classes,
            head=p.head,
            in_channels=p.in_channels,
            stem=p.stem,
            pool="gem" if p.arch == "gem_resnet" else "avg",
            gem_p=p.gem_p,
            gem_learnable=p.gem_learnable,
            dropout=0.0 if p.dropout is None else p.dropout,
        )
    return EdgeMobileNetV3(
        arch=p.arch,
        num_classes=num_classes,
        head=p.head,
        in_channels=p.in_channels,
        width_mult=p.width_mult,
        dropout=0.2 if p.dropout is None else p.dropout,
    )


def head_prefixes(module) -> tuple[str, ...]:
    return getattr(module, "head_prefixes", ("fc.", "classifier.", "head."))


def trainable_prefixes(module) -> tuple[str, ...]:
    """Parameter-name prefixes left trainable when a finetune freezes the feature layers."""
    return getattr(module, "trainable_prefixes", head_prefixes(module))


# -- bundles ----------------------------------------------------------------------------------------
def _bundle_path(path: str | Path) -> Path:
    path = Path(path)
    return path / BUNDLE_NAME if path.is_dir() else path


def save_model(path: str | Path, module, arch: Mapping[str, Any] | ModelParams, num_classes: int) -> Path:
    """Write a ``model.pt`` bundle (a folder gets ``model.pt`` inside it)."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_NAME
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    torch.save(
        {"format": BUNDLE_FORMAT, "arch": _params(arch).arch_dict(), "num_classes": int(num_classes),
         "state_dict": state},
        path,
    )
    return path


def safe_torch_load(path: str | Path, data: bytes | None = None):
    """``torch.load`` that never runs code from the file: ``weights_only=True`` always (tensors,
    containers and plain types only), with Lightning's AttributeDict allowed (a dict; our own
    checkpoints' hyper-parameters). A file that needs any other type -- a pickled module, a checkpoint
    with custom classes, a malicious pickle -- is refused, saying how to convert a file one trusts.
    Users download weights: loading one must never execute it. ``data``: the file's bytes, already read
    (and checked against a cache key): loaded instead of reading ``path`` again; ``path`` names it."""
    import io
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_types()):
            return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the Python object {found.group(1)}" if found else "Python objects beyond tensors"
        raise WeightsError(
            f"{path} is refused: loading it would run code ({what}); edgepipe loads only tensors and plain data "
            "from weights files. If you trust the file, save its state_dict where you made it: "
            "torch.save(model.state_dict(), 'weights.pt')") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _safe_types() -> list:
    from lightning_fabric.utilities.data import AttributeDict

    return [AttributeDict]


def read_bundle(path: str | Path) -> dict:
    """The bundle dict of a ``model.pt`` (file or folder holding one)."""
    path = _bundle_path(path)
    if not path.is_file():
        raise WeightsError(f"model bundle not found: {path}")
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != BUNDLE_FORMAT:
        raise WeightsError(f"{path} is not an edgepipe model bundle (expected format {BUNDLE_FORMAT!r})")
    return obj


def load_model(path: str | Path):
    """Rebuild the module stored in a ``model.pt`` bundle, in eval mode."""
    b = read_bundle(path)
    module = build_model(b["arch"], b["num_classes"])
    module.load_state_dict(b["state_dict"], strict=True)
    return module.eval()


def read_state_dict(path: str | Path, data: bytes | None = None) -> tuple[dict, dict]:
    """(state_dict, info) from any supported weights file: a torchvision state_dict, a model.pt bundle
    (file or folder), a Lightning checkpoint of the train stage. Read with safe_torch_load: nothing in the file runs.
    info holds ``kind`` and, for bundles and train checkpoints, ``arch`` and ``num_classes``. ``data``: the
    file's bytes, already read (``safe_torch_load``)."""
    import torch

    path = _bundle_path(path) if data is None else Path(path)
    if data is None and not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    obj = safe_torch_load(path, data)
    info: dict[str, Any] = {"path": str(path)}
    if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
        info.update(kind="bundle", arch=obj.get("arch"), num_classes=obj.get("num_classes"))
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and (
        "pytorch-lightning_version" in obj or "epoch" in obj or "optimizer_states" in obj
    ):
        info["kind"] = "lightning"
        hp = obj.get("hyper_parameters") or {}
        if isinstance(hp, dict) and "arch" in hp:
            info.update(arch=hp.get("arch"), num_classes=hp.get("num_classes"))
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info["kind"] = "state_dict"
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        info["kind"] = "state_dict"
        sd = obj["model"]
    elif isinstance(obj, dict):
        info["kind"] = "state_dict"
        sd = obj
    else:
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict or checkpoint")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{path} holds no tensors")
    for prefix in ("model.", "module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, info


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def infer_num_classes(state_dict: Mapping[str, Any], arch: Mapping[str, Any] | ModelParams) -> int:
    """The class count a state_dict's head was trained for."""
    p = _params(arch)
    key = "fc.weight" if p.arch in ("resnet18", "gem_resnet") else "classifier.3.weight"
    if key not in state_dict:
        raise WeightsError(f"cannot tell the class count: the weights have no {key!r} (is model.arch={p.arch} right?)")
    return int(state_dict[key].shape[0])


def load_weights(module, source: str | Path | Mapping[str, Any], labels: list[str] | None = None,
                 source_labels: list[str] | None = None, data: bytes | None = None) -> dict:
    """Load weights into ``module``: a path (any format ``read_state_dict`` takes) or a state_dict.

    - tensors whose shapes differ only by a Linear <-> 1x1 conv reshape are reshaped;
    - a 3-channel first conv loads into a 1-channel one (summed over RGB) and vice versa (averaged);
    - the classifier head follows the class names when both sides have them (``labels``: the model's
      classes; ``source_labels``, else the labels.txt a bundle or train output carries): its rows are
      reordered for the same classes in another order, re-initialised for other classes;
    - without names, the head is re-initialised (kept as built) when its class count differs;
    - GeM's ``p`` may be missing (torchvision weights).
    Anything else that does not fit raises WeightsError listing missing/unexpected/mismatched keys.
    Returns a report: loaded/adapted/reinitialized/kept key lists, the source and ``head`` (one line
    saying what became of the head).
    """
    import torch

    if isinstance(source, (str, Path)):
        sd, info = read_state_dict(source, data)  # data: the file's bytes, already read and checked
        where = str(source)
        if source_labels is None:
            source_labels = labels_beside(source, info)
    else:
        sd, info, where = dict(source), {"kind": "state_dict"}, "<state_dict>"
    own = module.state_dict()
    heads = head_prefixes(module)
    sd, head = _head_by_names(sd, heads, source_labels, labels)
    fit = _fit_tensors(sd, own, heads, getattr(module, "first_conv", None))
    if head.startswith("re-initialised"):  # other classes: the head starts fresh even where shapes agree
        for k in [k for k in fit.new if k.startswith(heads)]:
            del fit.new[k]
            fit.reinit.append(k)
    elif fit.reinit:
        head = f"re-initialised: {_head_size(sd, heads)} outputs in the source, {_head_size(own, heads)} here"
    _refuse_misfit(fit, sd, own, where, type(module).__name__)
    merged = dict(own)
    merged.update({k: v.to(dtype=own[k].dtype) if torch.is_floating_point(own[k]) else v for k, v in fit.new.items()})
    module.load_state_dict(merged, strict=True)
    return {
        "source": where,
        "kind": info.get("kind"),
        "loaded": len(fit.new),
        "adapted": sorted(fit.adapted),
        "reinitialized": sorted(set(fit.reinit)),
        "kept": sorted(k for k in own if k not in fit.new),
        "head": head,
    }


def labels_beside(path: str | Path, info: Mapping[str, Any]) -> list[str] | None:
    """The class names a weights file carries: the labels.txt of the folder holding a model.pt bundle
    (a train or clip_outliers output), or of the train output a checkpoint sits in; None otherwise
    (a torchvision state_dict has no names: ImageNet's 1000 classes are not this dataset's)."""
    from .bundle import read_labels

    path = _bundle_path(path)
    if info.get("kind") == "bundle":
        folder = path.parent
    elif info.get("kind") == "lightning" and path.parent.name == "checkpoints":
        folder = path.parent.parent
    else:
        return None
    return read_labels(folder) if (folder / "labels.txt").is_file() else None


def _head_size(sd: Mapping[str, Any], heads: tuple[str, ...]) -> int | None:
    sizes = [v.shape[0] for k, v in sd.items() if k.startswith(heads) and k.endswith("weight")]
    return int(sizes[-1]) if sizes else None


def _head_by_names(sd: dict, heads: tuple[str, ...], source: list[str] | None,
                   target: list[str] | None) -> tuple[dict, str]:
    """(state_dict with the head's rows in the target's class order, what happened to the head)."""
    if source is None or target is None:
        return sd, "kept (no class names to compare)" if source is None else "kept (the model's classes are not named)"
    if source == target:
        return sd, f"kept: the same classes in the same order ({_names(target)})"
    if sorted(source) != sorted(target) or len(set(source)) != len(source):
        return sd, f"re-initialised: the source's classes ({_names(source)}) are not these ({_names(target)})"
    order = [source.index(name) for name in target]
    rows = {k: v[order] for k, v in sd.items() if k.startswith(heads) and v.dim() >= 1 and v.shape[0] == len(source)}
    return {**sd, **rows}, f"rows reordered: {_names(source)} -> {_names(target)}"


def _names(names: list[str], limit: int = 6) -> str:
    """Class names for a log line: ImageNet's 1000 shortened."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names)} classes" if len(names) > limit else "")


@dataclass
class _Fit:
    """How each tensor of a weights file fits the model's state_dict."""

    new: dict[str, Any] = field(default_factory=dict)  # key -> tensor to load (maybe reshaped)
    adapted: list[str] = field(default_factory=list)
    reinit: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _fit_tensors(sd: Mapping[str, Any], own: Mapping[str, Any], heads: tuple[str, ...], first: str | None) -> _Fit:
    fit = _Fit()
    for k, v in sd.items():
        if k not in own:
            fit.unexpected.append(k)
            continue
        t = own[k]
        if v.shape == t.shape:
            fit.new[k] = v
        elif (v.numel() == t.numel() and v.squeeze().shape == t.squeeze().shape and v.dim() in (1, 2, 4)
              and t.dim() in (1, 2, 4)):
            fit.new[k] = v.reshape(t.shape)  # Linear <-> 1x1 conv
            fit.adapted.append(k)
        elif any(k.startswith(h) for h in heads):
            fit.reinit.append(k)
        elif (first and k == f"{first}.weight" and v.dim() == 4 and v.shape[0] == t.shape[0]
              and v.shape[2:] == t.shape[2:]):
            fit.new[k] = _adapt_channels(v, t.shape[1])
            fit.adapted.append(k)
        else:
            fit.mismatched.append(f"{k}: file {list(v.shape)} vs model {list(t.shape)}")
    # a head is re-initialised as a whole (weight and bias), not half-loaded
    prefixes = {k.rsplit(".", 1)[0] + "." for k in fit.reinit}
    for k in [k for k in fit.new if any(k.startswith(p) for p in prefixes)]:
        del fit.new[k]
        fit.reinit.append(k)
    return fit


def _adapt_channels(weight, channels: int):
    """A first conv's weights for another input channel count: RGB summed into grey, grey spread over
    channels (scaled so the response to a grey image is unchanged)."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1) * (weight.shape[1] / channels)


def _refuse_misfit(fit: _Fit, sd: Mapping[str, Any], own: Mapping[str, Any], where: str, model: str) -> None:
    optional = ("avgpool.p", "num_batches_tracked")
    missing = [k for k in own if k not in sd and not k.endswith(optional)]
    if not (missing or fit.unexpected or fit.mismatched):
        return
    parts = [f"weights {where} do not fit the model ({model})"]
    for label, keys in (("missing keys", missing), ("unexpected keys", fit.unexpected),
                        ("shape mismatches", fit.mismatched)):
        if keys:
            parts.append(f"{label} ({len(keys)}): {_fmt_keys(keys)}")
    parts.append("check model.arch / model.depth / model.stem / model.in_channels against the file")
    raise WeightsError("; ".join(parts))
