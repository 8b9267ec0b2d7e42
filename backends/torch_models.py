"""PyTorch backends: ``model.pt`` (the train/clip_outliers bundle, eager fp32) and TorchScript."""

from __future__ import annotations

import warnings

from .base import Backend


class TorchBackend(Backend):
    kind, model_file, producer, runtime = "torch", "model.pt", "train", "pytorch"
    report_name, order, reference_rank, gives_features = "PyTorch (model.pt)", 30, 0, True

    def _load(self) -> None:
        from stages.common.models import load_model

        self.module = load_model(self.folder / self.model_file)

    def logits(self, x):
        return torch_logits(self.module, x, self.batch)

    def features(self, x):
        """N x D penultimate-layer features: the input of the model's last Linear/Conv2d (the classifier),
        averaged over space when it is a feature map (a conv head)."""
        import numpy as np
        import torch

        last = [m for m in self.module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
        seen: list[np.ndarray] = []

        def grab(_module, args):
            t = args[0]
            seen.append((t.mean(dim=(2, 3)) if t.ndim == 4 else t.flatten(1)).detach().cpu().numpy())

        handle = last.register_forward_pre_hook(grab)
        try:
            self.logits(x)
        finally:
            handle.remove()
        return np.concatenate(seen).astype(np.float32)


class TorchScriptBackend(TorchBackend):
    kind, model_file, producer, runtime, target = "torchscript", "model.torchscript.pt", "export_torchscript", \
        "torchscript", "float"
    # before TorchBackend: a folder holding both is an export_torchscript folder
    report_name, order, reference_rank = "TorchScript", 20, 1
    gives_features = False  # features.npz comes from the eager model.pt only

    def _load(self) -> None:
        import torch

        with warnings.catch_warnings():  # torch 2.14: "torch.jit.load is deprecated"
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(self.folder / self.model_file), map_location="cpu").eval()


def torch_logits(module, x, batch: int | None = None):
    """Run a torch module (eager or TorchScript) on float32 N x C x H x W; one sample at a time when
    ``batch`` is None (the shape an exported batch-1 model sees)."""
    import numpy as np
    import torch

    step = batch or 1
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), step):
            outs.append(module(torch.from_numpy(np.ascontiguousarray(x[i:i + step]))).detach().cpu().numpy())
    return np.concatenate(outs).astype(np.float32)
