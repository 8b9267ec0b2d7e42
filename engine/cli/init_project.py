"""`edgepipe init [DIR]`: the skeleton of a user's own project. The project holds only what is the
user's (experiments, data, runs); edgepipe's built-in configs stay in the installed package and are
layered under the project's conf/ (engine/compose.py), so upgrading edgepipe never touches them."""

from __future__ import annotations

from pathlib import Path

from engine.errors import InitError as InitError  # re-exported: raised here

EXPERIMENT = """\
# @package _global_
# Your experiment (written by `edgepipe init`): the quickstart's whole flow - train, then ONNX, ncnn and
# RKNN int8, every backend evaluated, board packages - on your own images. From this project's folder:
#   edgepipe plan +experiment=my_experiment            # what would run; nothing is computed
#   edgepipe run +experiment=my_experiment             # add train.epochs=20 board=rv1106 ... to try values
# Everything not set here comes from edgepipe's built-in configs; `edgepipe plan --info
# +experiment=my_experiment` lists the file each part came from. A file you add under conf/ (conf/model/
# my_net.yaml, conf/board/my_board.yaml, conf/pipeline/mine.yaml) is one more option of that group, and a
# file named like a built-in one replaces it.
defaults:
  - quickstart                    # edgepipe's experiment/quickstart.yaml: this file starts from it
  - override /dataset: folder     # one folder per class; other kinds: split_folders, filelist, idx
  # - override /model: mobilenet_v3_small    # a built-in model, or your own conf/model/NAME.yaml
  # - override /board: rv1106                # the board you deploy to (maixii_dock, rk3566, rk3588, ...)
  - _self_

name: my_experiment               # run folders: runs/<date>/<time>_my_experiment/
dataset:
  path: data                      # your images, data/<class name>/<image>, relative to this folder
train:
  epochs: 6                       # the quickstart's value; real data usually wants more
# preprocess:
#   input_size: 224               # the quickstart's 32 px suits digits; photos want more
#   mean: imagenet
#   std: imagenet
"""

GITIGNORE = """\
# edgepipe's run folders and its cache (runs/cache): recomputed from the configs and the data
runs/
"""

README = """\
# My edgepipe project

Experiments live in `conf/experiment/`, images in `data/<class name>/`, results in `runs/`
(git-ignored). edgepipe's built-in configs are layered under `conf/`: add a file to use your own
model, board or pipeline, or name one like a built-in file to replace it.

```
edgepipe plan +experiment=my_experiment     # check the config, see what would run
edgepipe run +experiment=my_experiment      # run it (again: every finished stage is a cache hit)
edgepipe reproduce runs/latest              # check that a run's results come back from its config
```
"""

FILES = {Path("conf/experiment/my_experiment.yaml"): EXPERIMENT, Path(".gitignore"): GITIGNORE,
         Path("README.md"): README}


def init(folder: Path) -> list[str]:
    """Write the skeleton into folder; never overwrite a file. Returns one line per file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InitError(f"{folder} is a file; name a folder for the project (edgepipe init DIR)")
    lines = []
    for rel, text in FILES.items():
        path = folder / rel
        if path.exists() or path.is_symlink():
            hint = "; add a line 'runs/' to it" if rel.name == ".gitignore" and not _ignores_runs(path) else ""
            lines.append(f"kept {path} (it exists; edgepipe init never overwrites a file{hint})")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:  # "x": fails rather than overwrite
            f.write(text)
        lines.append(f"wrote {path}")
    return lines


def _ignores_runs(gitignore: Path) -> bool:
    try:
        return any(line.strip() in ("runs", "runs/", "/runs", "/runs/") for line in gitignore.read_text().splitlines())
    except (OSError, UnicodeDecodeError):
        return False
