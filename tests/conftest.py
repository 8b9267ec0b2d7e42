"""Shared fixtures. The engine tests use cheap stages (tests/engine_stages.py) and their own config
folder (tests/engine_conf/), through the same environment variables a user or a plugin author has."""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Where $CI is set a skip is a failure that names what to install (tests/helpers_require.py): a CI
# machine without qemu, Chromium, a CJK font or root cannot pass those tests by skipping them.
pytest_plugins = ["helpers_require"]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EDGEPIPE = Path(sys.executable).parent / "edgepipe"

# `make test` runs the tests on every core (pytest-xdist, one process per core): each worker, and the
# processes it starts, gets its share of the cores for OpenMP/torch (two torch processes each spinning
# every core slow each other down tenfold). A thread count set in the environment wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# How `make test` hands the tests to the workers (pytest-xdist's default `--dist load`, replaced here):
# a module's tests go to one worker together, so its module fixtures are built once; the modules of
# a few heavy, independent tests are split test by test; the tests that start processes of their own
# (DDP ranks, sweep and --jobs workers) run one at a time, in one worker. The slow tests are handed
# out first, so that no worker starts one while the other has nothing left to do.
SPLIT_MODULES = {"test_bn_recalibration.py", "test_onnx_quantize.py", "test_package.py", "test_sweeps.py"}
OWN_PROCESSES = "own processes"
OWN_PROCESS_MODULES = {"test_train_ddp.py", "test_parallel_stages.py", "test_kill.py"}
OWN_PROCESS_TESTS = {  # in a split module: file name -> test names
    "test_sweeps.py": ("test_grid_on_joblib", "test_grid_on_submitit_local", "test_grid_on_ray",
                       "test_interrupted_joblib_sweep", "test_an_error_inside_a_joblib_worker",
                       "test_quickstart_2x2_on_joblib"),
}


def work_unit(nodeid: str) -> str:
    """The tests with the same unit run in one worker, in collection order."""
    module, _, test = nodeid.partition("::")
    name = Path(module).name
    if name in OWN_PROCESS_MODULES or test.startswith(OWN_PROCESS_TESTS.get(name, ())):
        return OWN_PROCESSES
    return nodeid if name in SPLIT_MODULES else module


class WorkUnits:
    """pytest-xdist's scheduler for `--dist load` (its default), handing out work_unit()s."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "load":  # another --dist asked for by name
            return None
        from xdist.scheduler import LoadScopeScheduling

        class ByWorkUnit(LoadScopeScheduling):  # _split_scope: how xdist's own schedulers name a unit
            def _split_scope(self, nodeid: str) -> str:
                return work_unit(nodeid)

        config.option.loadscopereorder = False  # keep the slow-first order below
        return ByWorkUnit(config, log)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):  # pytest refuses a hook of a plugin it does not have
        config.pluginmanager.register(WorkUnits(), "edgepipe-work-units")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a stable sort: each module's tests keep their order
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# The tests (and the edgepipe processes they start) compose through a compose cache of their own,
# never the user's ~/.cache/edgepipe/compose.
os.environ["EDGEPIPE_COMPOSE_CACHE"] = tempfile.mkdtemp(prefix="edgepipe-test-compose-")
atexit.register(shutil.rmtree, os.environ["EDGEPIPE_COMPOSE_CACHE"], ignore_errors=True)

# Pretrained weights by name (model.pretrained: imagenet) come from torch's hub cache: the tests have
# one of their own, never ~/.cache/torch, and a file:// mirror they control, so nothing ever reaches
# for the internet. A test that needs a specific file places it under $TORCH_HOME/hub/checkpoints
# (torchvision's file name); `placed_imagenet_weights` puts random ones there for the experiments.
TEST_TORCH_HOME = Path(tempfile.mkdtemp(prefix="edgepipe-test-torch-home-"))
TEST_WEIGHTS_MIRROR = TEST_TORCH_HOME / "mirror"
TEST_WEIGHTS_MIRROR.mkdir()
os.environ["TORCH_HOME"] = str(TEST_TORCH_HOME)
os.environ["EDGEPIPE_WEIGHTS_MIRROR"] = TEST_WEIGHTS_MIRROR.as_uri() + "/"
atexit.register(shutil.rmtree, TEST_TORCH_HOME, ignore_errors=True)
# torchvision's file names for the architectures the experiments start from
IMAGENET_FILES = {"resnet18": "resnet18-f37072fd.pth", "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth"}


def place_imagenet_weights(torch_home: Path = TEST_TORCH_HOME, archs=tuple(IMAGENET_FILES)) -> dict[str, Path]:
    """Randomly initialised torchvision state_dicts saved under torchvision's file names in
    torch_home's hub cache (a file already there is kept); {arch: path}."""
    import torch
    import torchvision

    placed = {}
    for arch in archs:
        path = Path(torch_home) / "hub" / "checkpoints" / IMAGENET_FILES[arch]
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
        placed[arch] = path
    return placed


@pytest.fixture(scope="session", autouse=True)
def placed_imagenet_weights() -> dict[str, Path]:
    """The experiments default to model.pretrained: imagenet, which plan and run resolve to these files
    (run would download them otherwise): every test that composes an experiment finds them."""
    return place_imagenet_weights()


@dataclass
class Result:
    rc: int
    out: str
    err: str


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Workspace:
    """A project folder with its own runs/ and a counter of real stage executions."""

    def __init__(self, root: Path, capsys, config_dir: Path) -> None:
        self.root = root
        self.runs = root / "runs"
        self.counter = root / "counter.txt"
        self.capsys = capsys
        self.env = {
            "EDGEPIPE_RUNS": str(self.runs),
            "EDGEPIPE_CONFIG_DIR": str(config_dir),
            "EDGEPIPE_PLUGINS": "engine_stages",
            "EDGEPIPE_TEST_COUNTER": str(self.counter),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }

    def cli(self, *args: str) -> Result:
        """Run the CLI in this process (fast)."""
        from engine.cli.commands import main

        self.capsys.readouterr()
        rc = main(list(args))
        captured = self.capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    def spawn(self, *args: str, **kw) -> subprocess.Popen:
        """Start the CLI as a separate process (for concurrency and kill tests), with Ctrl-C's signal
        handled as in a terminal's foreground job: a suite started in the background (`cmd &` in a
        script, nohup) hands its children SIGINT ignored, and Python then never raises
        KeyboardInterrupt, so the interrupt tests would wait for nothing."""
        env = {**os.environ, **self.env}
        return subprocess.Popen([str(EDGEPIPE), *args], cwd=self.root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kw)

    def counts(self) -> collections.Counter:
        if not self.counter.exists():
            return collections.Counter()
        return collections.Counter(line.split()[0] for line in self.counter.read_text().splitlines())

    def reset_counts(self) -> None:
        self.counter.unlink(missing_ok=True)

    def latest(self) -> dict:
        return json.loads((self.runs / "latest" / "run.json").read_text())

    def statuses(self, run: dict | None = None) -> dict[str, str]:
        run = run or self.latest()
        return {k: v["status"] for k, v in run["stages"].items()}

    def entries(self, stage_type: str) -> list[Path]:
        d = self.runs / "cache" / stage_type
        return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch) -> Workspace:
    w = Workspace(tmp_path, capsys, TESTS / "engine_conf")
    for k, v in w.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.chdir(tmp_path)
    return w


@pytest.fixture
def project(tmp_path, capsys, monkeypatch) -> Workspace:
    """A workspace on the real conf/ and the real stages."""
    w = Workspace(tmp_path, capsys, REPO / "conf")
    w.env.pop("EDGEPIPE_PLUGINS")
    for k, v in w.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("EDGEPIPE_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    return w


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 with a bucket; credentials only in the environment, as a user has them."""
    import logging

    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team")
    yield endpoint
    server.stop()


# -- the board tests' bundles (tests/board_tests): two RKNN models built once per session ----------------
BUNDLES = ("onnx", "data", "calib", "ncnn", "rknn_rv1103", "rknn_rk3566", "eval", "images")  # each a folder


def build_bundles(base: Path) -> None:
    from helpers_data import export_onnx, make_dataset, stage, write_images

    export_onnx(base / "onnx", kind="linear")
    make_dataset(base / "data")
    stage("calibration", {"count": 6}, {"data": base / "data"}, base / "calib")
    stage("ncnn", {}, {"onnx": base / "onnx"}, base / "ncnn")
    for target in ("rv1103", "rk3566"):  # with `data`: test_logits.npy, the golden outputs of the self-test
        stage("rknn_quantize", {"target": target, "accuracy_analysis_samples": 0},
              {"onnx": base / "onnx", "calib": base / "calib", "data": base / "data"}, base / f"rknn_{target}")
    ev = base / "eval"  # what package reads of an evaluate output
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"backends": {
        "pytorch": {"top1": 0.8, "agreement": 1.0}, "onnx": {"top1": 0.8, "agreement": 1.0},
        "rknn": {"top1": 0.75, "agreement": 0.9}}}))
    write_images(base / "images")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """The board tests' inputs, built once per session (and shared by the xdist workers; read only): an
    export_onnx-like folder (uniform normalisation, LABELS), a dataset, calibration, ncnn, rknn_rv1103 /
    rknn_rk3566 (the real rknn_quantize, with `data`: test_logits.npy, the self-test's golden outputs),
    an evaluate-like eval/ (metrics.json) and JPEG/PNG pictures."""
    from helpers_shared import built_once

    base = built_once(tmp_path_factory, "bundles", build_bundles)
    return {name: base / name for name in BUNDLES}


# -- real photographs and really pretrained weights (tests/helpers_data.py), built once per session ------
@pytest.fixture
def conf(ws, monkeypatch) -> Path:
    """The user's own config folder (a copy of the engine tests' one), where a colleague's file lands:
    $EDGEPIPE_CONFIG_DIR points at it."""
    conf = ws.root / "conf"
    shutil.copytree(TESTS / "engine_conf", conf)
    monkeypatch.setenv("EDGEPIPE_CONFIG_DIR", str(conf))
    return conf


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory):
    """real_photos(size=256, per_class=40, chinese=False) -> train/val/test folders (dataset kind
    split_folders) of augmented crops of real photos (six classes), each split cut from its own tiles
    of each photo, built once per session for each argument set."""
    from helpers_data import CHINESE_NAMES, make_real_photo_folder

    built: dict[tuple, Path] = {}

    def build(size: int = 256, per_class: int = 40, chinese: bool = False) -> Path:
        key = (size, per_class, chinese)
        if key not in built:
            root = tmp_path_factory.mktemp(f"real_photos_{size}px") / "photos"
            built[key] = make_real_photo_folder(root, size=size, per_class=per_class,
                                                names=CHINESE_NAMES if chinese else None)
        return built[key]

    return build


@pytest.fixture(scope="session")
def pretrained_weights(tmp_path_factory):
    """pretrained_weights(arch) -> a torchvision state_dict of ``arch`` trained first on other photos, at
    <session torch home>/hub/checkpoints/<torchvision's file name> (trained once per machine and recipe:
    helpers_data.cached_backbone)."""
    from helpers_data import cached_backbone

    torch_home = tmp_path_factory.mktemp("torch_home")
    made: dict[str, Path] = {}

    def weights(arch: str) -> Path:
        if arch not in made:
            made[arch] = cached_backbone(arch, torch_home / "hub" / "checkpoints")
        return made[arch]

    return weights
