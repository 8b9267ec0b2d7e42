"""Pretrained weights by name (`model.pretrained: imagenet`): torchvision's weights API, torch's hub
cache, the mirror, the published hash, and what plan and run say when the file is not there. Offline:
conftest points TORCH_HOME at a session folder and EDGEPIPE_WEIGHTS_MIRROR at a file:// folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers_data import make_array_dataset, make_digit_filelist, make_folder_dataset
from hostile import CodeRunningPickle, assert_clean_failure, new_files, snapshot

from engine.run.testing import run_stage
from engine.store.cache import Cache, stage_key
from stages.common.models import ModelParams, WeightsError, build_model, load_weights
from stages.common.pretrained import (
    MIRROR_ENV,
    WeightsUnavailable,
    download_verified,
    ensure,
    published,
    published_hash_mismatch,
)
from stages.train import Train

SMALL = "mobilenet_v3_small-047dcff4.pth"
SMALL_URL = f"https://download.pytorch.org/models/{SMALL}"


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty hub cache of this test's own (the session's holds the experiments' placed files)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv(MIRROR_ENV, folder.as_uri() + "/")
    return folder


def hub_file(home: Path, name: str = SMALL) -> Path:
    return home / "hub" / "checkpoints" / name


def place(path: Path, arch: str = "mobilenet_v3_small", seed: int = 0) -> Path:
    """A randomly initialised torchvision state_dict saved under torchvision's file name."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
    return path


# -- plan and run when the file is not there --------------------------------------------------------------
def test_plan_before_the_download_shows_the_plan_and_where_run_downloads_from(project, torch_home, monkeypatch):
    """It used to exit 2 ("run downloads URL -> PATH"): the first thing a new user typed failed."""
    monkeypatch.delenv(MIRROR_ENV)  # plan never downloads: torchvision's own URL is shown
    data = project.root / "images"
    data.mkdir()
    before = snapshot(project.root)
    r = project.cli("plan", "+experiment=rv1103_mobilenetv3", f"dataset.path={data}")
    assert r.rc == 0, r.err
    assert "clip_outliers" in r.out and "rknn_quantize" in r.out  # the plan, all of it
    said = [line for line in r.out.splitlines() if SMALL_URL in line]
    assert said == [f"`edgepipe run` will download {SMALL_URL} to {hub_file(torch_home)} first "
                    "(offline: put the file there)"], r.out
    assert not torch_home.exists()  # nothing downloaded; plan's only write is the content index, as always
    assert new_files(project.root, before) == ["runs/cache/.index/content.sqlite"]


def test_the_published_digest_keys_a_stage_before_and_after_the_download(tmp_path, torch_home, mirror, monkeypatch):
    """plan before the download keys clip_outliers (which reads the weights) by the sha256 prefix
    torchvision publishes; the downloaded file, whose content is what its name says, gives the same
    key; a file of other bytes under that name is keyed by its own content, never by the published one."""
    from engine.contract.fetching import fetching
    from stages.common import pretrained

    src = place(tmp_path / "own.pth")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    name = f"mobilenet_v3_small-{digest[:8]}.pth"
    src.rename(mirror / name)
    real = pretrained.published

    def with_own_hash(arch, given, depth=18):  # torchvision's real file would carry its own hash so
        w = real(arch, given, depth)
        return pretrained.PublishedWeights(w.name, w.url.replace(SMALL, name), w.path.with_name(name))

    monkeypatch.setattr("stages.common.models.published", with_own_hash)
    before, material = _stage_key(tmp_path, "rv1103_mobilenetv3", "clip")
    assert material["content"]["model.pretrained"] == f"published-sha256:{digest[:8]}"
    assert not hub_file(torch_home, name).exists()
    with fetching():  # what run does first
        _stage_key(tmp_path, "rv1103_mobilenetv3", "clip")
    assert hub_file(torch_home, name).read_bytes() == (mirror / name).read_bytes()
    assert _stage_key(tmp_path, "rv1103_mobilenetv3", "clip")[0] == before
    place(hub_file(torch_home, name), seed=1)  # other bytes under the published name
    other, material = _stage_key(tmp_path, "rv1103_mobilenetv3", "clip")
    own = hashlib.sha256(hub_file(torch_home, name).read_bytes()).hexdigest()
    assert other != before and material["content"]["model.pretrained"] == own


def test_a_remembered_plan_follows_torch_home(project, tmp_path, monkeypatch):
    """The plan memo keeps a pipeline with weights by name, and with it the $TORCH_HOME its path was
    resolved under: another torch cache is validated again, never planned from the old file."""
    monkeypatch.delenv(MIRROR_ENV)
    data = project.root / "images"
    data.mkdir()
    args = ("plan", "+experiment=onnx_catsdogs", f"dataset.path={data}")
    for _ in range(2):  # validated and remembered, then planned from memory: the placed file is there
        r = project.cli(*args)
        assert r.rc == 0 and SMALL_URL not in r.out, r.out + r.err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "another"))
    r = project.cli(*args)
    assert r.rc == 0 and f"{SMALL_URL} to {hub_file(tmp_path / 'another')} first" in r.out, r.out


def test_what_a_name_resolved_to_is_kept_sealed_and_an_edited_entry_is_ignored(project, torch_home, tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv(MIRROR_ENV)
    monkeypatch.setenv("EDGEPIPE_COMPOSE_CACHE", str(tmp_path / "compose"))
    data = project.root / "images"
    data.mkdir()
    args = ("plan", "+experiment=onnx_catsdogs", f"dataset.path={data}")
    assert SMALL_URL in project.cli(*args).out
    kept = list((tmp_path / "compose" / "resolved").glob("*.json"))
    assert len(kept) == 1 and "MobileNet_V3_Small_Weights.IMAGENET1K_V1" in kept[0].read_text()
    evil = "https://evil.example/mobilenet_v3_small-047dcff4.pth"
    kept[0].write_text(kept[0].read_text().replace(SMALL_URL, evil))  # the seal no longer matches
    r = project.cli(*args, "train.epochs=3")  # another config: validated, the name resolved again
    assert r.rc == 0 and SMALL_URL in r.out and evil not in r.out, r.out


def _stage_key(tmp_path: Path, experiment: str, stage: str) -> tuple[str, dict]:
    from engine.config.compose import compose
    from engine.config.validate import validate

    job = compose([f"+experiment={experiment}", f"dataset.path={tmp_path}"])
    _, specs = validate(job.cfg)
    return stage_key(specs[stage].recipe, {"data": "0" * 64}, Cache(tmp_path / "cache"))


def test_run_offline_says_where_to_put_the_file_before_anything_runs(project, torch_home, mirror):
    data = project.root / "images"
    data.mkdir()
    r = project.cli("run", "+experiment=rv1103_mobilenetv3", f"dataset.path={data}")
    assert_clean_failure(r, 2, "model.pretrained=imagenet", f"{mirror.as_uri()}/{SMALL}", str(hub_file(torch_home)),
                         "by hand", MIRROR_ENV)
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert not project.runs.exists()  # no stage ran, no run folder


@pytest.mark.parametrize("experiment, says", [("rv1103_mobilenetv3", "clip_outliers has no weights"),
                                               ("onnx_catsdogs", "train.mode=finetune needs starting weights")])
def test_an_experiment_without_weights_is_told_at_plan(project, experiment, says):
    """rv1103 used to run the dataset stage, then fail naming clip.weights, a key the user never set."""
    data = project.root / "images"
    data.mkdir()
    r = project.cli("plan", f"+experiment={experiment}", f"dataset.path={data}", "model.pretrained=null")
    assert_clean_failure(r, 2, "model.pretrained", says)
    assert "clip.weights=PATH" not in r.err and not project.runs.exists()


# -- a placed file: loaded, and its name and digest in the key -------------------------------------------------
def _train_key(tmp_path: Path, *overrides: str) -> tuple[str, dict]:
    from engine.config.compose import compose
    from engine.config.validate import validate

    job = compose(["+experiment=onnx_catsdogs", f"dataset.path={tmp_path}", *overrides])
    _, specs = validate(job.cfg)
    return stage_key(specs["train"].recipe, {"data": "0" * 64}, Cache(tmp_path / "cache"))


# -- plan and a cached run without torch ------------------------------------------------------------------------
# A command in a fresh process that says which heavy modules it loaded.
PROBE = """
import json, sys
from engine.cli.commands import main
rc = main(sys.argv[1:])
print("\\n" + json.dumps({"rc": rc, "loaded": [m for m in ("torch", "torchvision", "pydantic") if m in sys.modules]}))
"""
EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "experiment").glob("*.yaml"))


def probe(project, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=project.root, env={**os.environ, **project.env},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.rstrip().rpartition("\n")[2])
    assert result["rc"] == 0, r.stdout + r.stderr
    return result


def _experiment_data(root: Path, experiment: str) -> list[str]:
    if experiment == "quickstart":
        return []  # scikit-learn's digits
    if experiment == "mnist_gem_resnet":
        return [f"dataset.path={make_digit_filelist(root / 'lists', count=40)}"]
    return [f"dataset.path={make_folder_dataset(root / 'images', per_class=6)}"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_plan_and_a_cached_run_of_every_experiment_import_neither_torch_nor_torchvision(
        project, experiment, tmp_path, monkeypatch):
    """The weights' name (model.pretrained: imagenet, resolved to $TORCH_HOME's placed files) used to be
    resolved through torchvision at every validation: ~4 s of imports in every plan and cached run of
    the board experiments, and the plan memo kept none of them. Now the resolution is remembered (by
    torchvision's version) and so is the validated pipeline."""
    monkeypatch.setenv("EDGEPIPE_COMPOSE_CACHE", str(tmp_path / "compose"))  # nothing resolved yet
    args = [f"+experiment={experiment}", *_experiment_data(tmp_path, experiment)]
    probe(project, "plan", *args)  # the first resolution may ask torchvision
    # another config, validated for real: the name's resolution is remembered
    assert probe(project, "plan", *args, "train.epochs=3")["loaded"] == ["pydantic"]
    assert probe(project, "plan", *args)["loaded"] == []  # the validated pipeline is remembered
    # a cached run: the dataset stage (the only stage that needs no torch to run) computed once, then
    # taken from the cache; validation covers every stage's params whatever --only selects
    probe(project, "run", *args, "--only", "data")
    assert probe(project, "run", *args, "--only", "data")["loaded"] == []
    assert set(project.statuses().values()) == {"cached"}


def test_a_placed_file_is_used_and_its_name_and_digest_are_in_the_key(tmp_path, torch_home):
    path = place(hub_file(torch_home))
    key, material = _train_key(tmp_path)
    assert material["params"]["model"]["pretrained_weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert material["content"]["model.pretrained"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(torch_home) not in json.dumps(material)  # no machine-specific path in the key
    place(path, seed=1)  # other content under the same name: another key
    assert _train_key(tmp_path)[0] != key
    # the same file given by path: the same digest, but not the same weights name
    assert _train_key(tmp_path, f"model.pretrained={path}")[0] != _train_key(tmp_path)[0]


def test_finetune_from_imagenet_loads_the_hub_file_and_warns_it_is_not_torchvisions(tmp_path, torch_home, caplog):
    path = place(hub_file(torch_home))
    data = make_array_dataset(tmp_path / "data", {"train": 8, "val": 2, "test": 2}, num_classes=2)
    params = {"mode": "finetune", "epochs": 1, "batch_size": 8, "limit_train_batches": 1, "bn_recalibrate": False,
              "model": {"arch": "mobilenet_v3_small", "pretrained": "imagenet"}}
    run_stage(Train, params, {"data": data}, tmp_path / "ft")
    init = json.loads((tmp_path / "ft" / "metrics.json").read_text())["init"]
    assert init["source"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1" and init["loaded"] > 200
    assert init["reinitialized"] == ["classifier.3.bias", "classifier.3.weight"]  # 1000 ImageNet classes
    assert init["head"] == ("re-initialised: the source's classes (tench, goldfish, great white shark, tiger shark, "
                            "hammerhead, electric ray, ... 1000 classes) are not these (class 0, class 1)")
    warned = [r.getMessage() for r in caplog.records if "published hash" in r.getMessage()]
    assert len(warned) == 1 and "047dcff4" in warned[0] and "not torchvision's own file" in warned[0], warned
    assert str(path) in warned[0]


def test_weights_whose_bytes_changed_after_the_key_was_made_are_refused(tmp_path, torch_home):
    """The key rests on the file's digest (its own, or torchvision's published prefix when the file
    is torchvision's): a file swapped between `run`'s key and the stage's read would store outputs as
    those of the bytes the key names. The stage reads Context.content_digests, what the key held."""
    from engine.contract.stage import StageError

    path = place(hub_file(torch_home))
    _, material = _train_key(tmp_path)
    keyed = dict(material["content"])  # what the pipeline hands the stage
    data = make_array_dataset(tmp_path / "data", {"train": 8, "val": 2, "test": 2}, num_classes=2)
    params = {"mode": "finetune", "epochs": 1, "batch_size": 8, "limit_train_batches": 1, "bn_recalibrate": False,
              "model": {"arch": "mobilenet_v3_small", "pretrained": "imagenet"}}
    run_stage(Train, params, {"data": data}, tmp_path / "same", content_digests=keyed)  # the bytes keyed
    place(path, seed=1)  # swapped after the key was made
    with pytest.raises(StageError, match=r"changed after this run keyed it by sha256 .*: run again"):
        run_stage(Train, params, {"data": data}, tmp_path / "swapped", content_digests=keyed)
    prefix = keyed["model.pretrained"][:8]  # a key on a published prefix the file no longer starts with
    with pytest.raises(StageError, match=rf"keyed it by torchvision's published hash {prefix}"):
        run_stage(Train, params, {"data": data}, tmp_path / "published",
                  content_digests={"model.pretrained": f"published-sha256:{prefix}"})


def test_the_bytes_checked_against_the_key_are_the_bytes_loaded(tmp_path, torch_home, monkeypatch):
    """No window between the check and the load: a file swapped right after its bytes were checked (here:
    for a file that is no weights file at all) is not read again; the stage trains from the checked bytes."""
    from stages.common import pretrained

    path = place(hub_file(torch_home))
    _, material = _train_key(tmp_path)
    checked = pretrained.read_keyed_file

    def check_then_swap(p, keyed):
        out = checked(p, keyed)
        Path(p).write_bytes(b"not a weights file: swapped after the check")
        return out

    monkeypatch.setattr(pretrained, "read_keyed_file", check_then_swap)
    data = make_array_dataset(tmp_path / "data", {"train": 8, "val": 2, "test": 2}, num_classes=2)
    params = {"mode": "finetune", "epochs": 1, "batch_size": 8, "limit_train_batches": 1, "bn_recalibrate": False,
              "model": {"arch": "mobilenet_v3_small", "pretrained": "imagenet"}}
    run_stage(Train, params, {"data": data}, tmp_path / "out", content_digests=dict(material["content"]))
    assert path.read_bytes().startswith(b"not a weights file")  # the swap happened, before the load


def test_a_weights_file_gone_before_the_stage_reads_it_is_one_line(tmp_path):
    """Removed between the plan (which hashed it) and the stage's read: a one-line error, no traceback."""
    from engine.contract.stage import StageError

    with pytest.raises(StageError, match=r"^clip.weights: cannot read .*gone.pt: No such file or directory$"):
        run_stage("clip_outliers", {"weights": str(tmp_path / "gone.pt"), "model": {"arch": "mobilenet_v3_small"}},
                  {}, tmp_path / "out")


def test_gem_resnet_starts_from_resnet_weights(torch_home):
    path = place(hub_file(torch_home, "resnet18-f37072fd.pth"), arch="resnet18")
    p = ModelParams(arch="gem_resnet", pretrained="imagenet")
    assert p.pretrained == path and p.pretrained_weights == "ResNet18_Weights.IMAGENET1K_V1"
    model = build_model(p, 4)
    p_before = model.avgpool.p.detach().clone()
    report = load_weights(model, p.pretrained)
    assert report["kept"] == ["avgpool.p", "fc.bias", "fc.weight"]  # GeM's p has no ImageNet weights
    ref = torch.load(path, weights_only=True)
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    assert torch.equal(model.avgpool.p.detach(), p_before)


@pytest.mark.parametrize("given, weights", [("imagenet", "IMAGENET1K_V2"), ("DEFAULT", "IMAGENET1K_V2"),
                                            ("IMAGENET1K_V1", "IMAGENET1K_V1")])
def test_torchvisions_names_resolve_through_its_weights_api(given, weights):
    w = published("mobilenet_v3_large", given)
    assert w.name == f"MobileNet_V3_Large_Weights.{weights}"
    assert w.url == torchvision.models.MobileNet_V3_Large_Weights[weights].url and w.path.name in w.url


def test_unknown_names_and_unfitting_settings_are_config_errors():
    with pytest.raises(ValueError,
                       match=r"IMAGENET1K_V2.*not one of torchvision's weights for resnet18.*IMAGENET1K_V1"):
        ModelParams(arch="resnet18", pretrained="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="stem: small"):
        ModelParams(arch="resnet18", stem="small", pretrained="imagenet")
    with pytest.raises(ValueError, match="width_mult"):
        ModelParams(arch="mobilenet_v3_small", width_mult=0.75, pretrained="imagenet")


# -- the mirror and the published hash ----------------------------------------------------------------------
def test_a_mirror_serving_other_bytes_is_refused_and_nothing_is_kept(torch_home, mirror):
    from engine.contract.fetching import fetching

    place(mirror / SMALL)  # torchvision's name, not torchvision's content
    with fetching(), pytest.raises(WeightsUnavailable, match=r"refused: its sha256 does not start with .*047dcff4"):
        ensure(published("mobilenet_v3_small", "imagenet"), "model.pretrained=imagenet")
    checkpoints = hub_file(torch_home).parent
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []  # no file, no .partial


def test_the_download_verifies_the_hash_prefix_in_the_file_name(tmp_path):
    src = place(tmp_path / "weights.pth")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    named = src.rename(tmp_path / f"mobilenet_v3_small-{digest[:8]}.pth")
    dest = tmp_path / "hub" / "checkpoints" / named.name
    assert download_verified(named.as_uri(), dest) == dest and dest.read_bytes() == named.read_bytes()
    assert published_hash_mismatch(dest) is None  # what its name says: no warning when it is used
    with pytest.raises(ValueError, match="carries no sha256 prefix"):
        download_verified(src.with_name("plain.pth").as_uri(), tmp_path / "x.pth")


def test_run_fetches_from_the_mirror_before_any_stage_runs(tmp_path, torch_home, mirror, monkeypatch):
    """The whole path with a mirror file whose content is what its name says: downloaded into the hub
    cache when run validates (fetching on), never when plan does. torchvision's published name is
    patched to carry this file's own hash, as torchvision's real file would."""
    from engine.contract.fetching import fetching
    from stages.common import pretrained

    src = place(tmp_path / "own.pth")
    name = f"mobilenet_v3_small-{hashlib.sha256(src.read_bytes()).hexdigest()[:8]}.pth"
    src.rename(mirror / name)
    real = pretrained.published

    def with_own_hash(arch, given, depth=18):
        w = real(arch, given, depth)
        return pretrained.PublishedWeights(w.name, w.url.replace(SMALL, name), w.path.with_name(name))

    monkeypatch.setattr("stages.common.models.published", with_own_hash)
    planned = ModelParams(arch="mobilenet_v3_small", pretrained="imagenet")  # plan: named, not fetched
    assert planned.pretrained == hub_file(torch_home, name) and not planned.pretrained.exists()
    with fetching():
        p = ModelParams(arch="mobilenet_v3_small", pretrained="imagenet")
    assert p.pretrained == hub_file(torch_home, name) and p.pretrained.read_bytes() == (mirror / name).read_bytes()


# -- nothing in a weights file runs ------------------------------------------------------------------------------
def test_a_hub_file_that_would_run_code_is_refused(torch_home, tmp_path):
    marker = tmp_path / "PWNED"
    hub_file(torch_home).parent.mkdir(parents=True)
    torch.save({"features.0.0.weight": CodeRunningPickle(marker)}, hub_file(torch_home))
    p = ModelParams(arch="mobilenet_v3_small", pretrained="imagenet")
    with pytest.raises(WeightsError, match="refused: loading it would run code"):
        load_weights(build_model(p, 2), p.pretrained)
    assert not marker.exists()


def test_an_imagenet_head_is_never_kept_whatever_its_row_count(tmp_path, torch_home):
    """A backbone placed under torchvision's name with a head the size of this dataset's (trained on
    other photos) is still ImageNet's by name: the head starts fresh, as it would from 1000 rows."""
    torch.manual_seed(0)
    hub_file(torch_home).parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=2).state_dict(), hub_file(torch_home))
    data = make_array_dataset(tmp_path / "data", {"train": 8, "val": 2, "test": 2}, num_classes=2)
    params = {"mode": "finetune", "epochs": 1, "batch_size": 8, "limit_train_batches": 1, "bn_recalibrate": False,
              "model": {"arch": "mobilenet_v3_small", "pretrained": "imagenet"}}
    run_stage(Train, params, {"data": data}, tmp_path / "ft")
    init = json.loads((tmp_path / "ft" / "metrics.json").read_text())["init"]
    assert init["reinitialized"] == ["classifier.3.bias", "classifier.3.weight"] and "tench" in init["head"]
