"""What `make install` provides must be importable and working: a broken install is a failure of
`make test`, never a reason to skip. (The known way to break it: a dependency that pulls numpy 2,
which rknn-toolkit2 2.5.0 cannot load.) Each check runs in a fresh interpreter, so one module's
import side effects cannot hide another's failure."""

from __future__ import annotations

import subprocess
import sys

import pytest

# module -> a statement that exercises what the stages use from it
REQUIRED = {
    "rknn.api": "from rknn.api import RKNN; assert callable(RKNN.load_onnx) and callable(RKNN.build)",
    "pnnx": "from stages.ncnn import pnnx_executable; import os; assert os.access(pnnx_executable(), os.X_OK)",
    "ncnn": "import ncnn; net = ncnn.Net(); assert hasattr(net, 'load_param')",
    "onnxruntime": ("import onnxruntime as ort; "
                    "assert 'CPUExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()"),
    "numpy<2": "import numpy; assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__",
}


@pytest.mark.parametrize("name", REQUIRED)
def test_required_dependency_works(name):
    r = subprocess.run([sys.executable, "-c", REQUIRED[name]], capture_output=True, text=True)
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    assert r.returncode == 0, (f"{name} is missing or broken ({last}): run `make install` "
                               "(rknn-toolkit2 needs numpy<2; every pip call takes -c constraints.txt)")
