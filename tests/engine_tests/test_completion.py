"""Shell completion on Hydra's completion plugins: the script `edgepipe -sc install=bash` prints, run
by a real bash, completes edgepipe's overrides the way a Hydra app's are completed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def bash_complete(line: str, cwd: Path) -> list[str]:
    """COMPREPLY of the installed bash completion for `line` (cursor at its end)."""
    script = f'''eval "$(edgepipe -sc install=bash)"
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<< "$COMP_LINE"; [[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
hydra_bash_completion
printf '%s\\n' "${{COMPREPLY[@]}}"'''
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return sorted(w for w in r.stdout.split() if w)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("EDGEPIPE_CONFIG_DIR", raising=False)
    monkeypatch.delenv("EDGEPIPE_CONFIG_NAME", raising=False)
    (tmp_path / "conf/model").mkdir(parents=True)
    (tmp_path / "conf/model/my_net.yaml").write_text("arch: resnet18\nstem: small\n")
    return tmp_path


def test_bash_completes_keys_groups_and_the_users_own_options(project):
    assert bash_complete("edgepipe run train.l", project) == ["train.label_smoothing=", "train.limit_train_batches=",
                                                               "train.lr="]
    # the user's conf/ is on the search path; edgepipe's own flags are not overrides
    assert bash_complete("edgepipe run --jobs 2 -m model=m", project) == [
        "model=mobilenet_v3_large", "model=mobilenet_v3_small", "model=my_net"]
    assert "+experiment=quickstart" in bash_complete("edgepipe plan +experiment=q", project)
    assert bash_complete("edgepipe pl", project) == ["plan"]


def test_unknown_shell_is_one_line(project):
    r = subprocess.run([BIN / "edgepipe", "-sc", "install=tcsh"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bash, fish, zsh" in r.stderr
