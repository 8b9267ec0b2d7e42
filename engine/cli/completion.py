"""Shell completion through Hydra's own completion plugins (bash, zsh, fish), as a Hydra app has it:

    eval "$(edgepipe -sc install=bash)"     # in ~/.bashrc

completes config keys (`train.l` -> `train.label_smoothing=`, `train.lr=`), groups and their options
(`model=mob` -> `model=mobilenet_v3_large`, ...) over edgepipe's search path (your conf/ first). Hydra's
plugin reads the line after the program's name; edgepipe takes its verb and its own flags out first.
"""

from __future__ import annotations

import os
from collections.abc import Callable

ACTIONS = ("install", "uninstall", "query")
COMPOSING_VERBS = ("run", "plan", "dag", "pull")


def main(spec: str, verbs: list[str], value_flags: set[str]) -> int:
    """`-sc ACTION=SHELL`; returns the exit status (ValueError on a malformed spec)."""
    action, _, shell = spec.partition("=")
    if action not in ACTIONS or not shell:
        raise ValueError(f"-sc/--shell-completion {spec!r}: use install=SHELL, uninstall=SHELL or query=SHELL")
    from engine.config import compose

    with compose.hydra_session(compose.user_config_dir(None)):
        plugin = _plugin(shell)
        if action != "query":
            getattr(plugin, action)()
            return 0
        line = os.environ.get("COMP_LINE", "")
        words = _complete_verb(line, verbs)
        if words is None:
            words = plugin._query(config_name=compose.config_name(), line=overrides_part(line, value_flags))
        print(" ".join(words))
    return 0


def _plugin(shell: str):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.plugins.completion_plugin import CompletionPlugin

    found: dict[str, Callable] = {cls.provides(): cls for cls in Plugins.instance().discover(CompletionPlugin)}
    if shell not in found or shell == "default":
        raise ValueError(f"-sc/--shell-completion: no completion for {shell!r}; "
                         f"Hydra has {', '.join(sorted(s for s in found if s != 'default'))}")
    return found[shell](GlobalHydra.instance().config_loader())


def _complete_verb(line: str, verbs: list[str]) -> list[str] | None:
    """The verbs while the verb is being typed; None once it is there."""
    tokens = line.split()
    if len(tokens) > 2 or (len(tokens) == 2 and line.endswith(" ")):
        return None if tokens[1] in COMPOSING_VERBS else []  # only composing verbs take overrides
    typed = tokens[1] if len(tokens) == 2 else ""
    return sorted(v for v in verbs if v.startswith(typed))


def overrides_part(line: str, value_flags: set[str]) -> str:
    """`edgepipe run --jobs 2 -m train.l` -> `-m train.l`: what a Hydra app's completion would see."""
    tokens, kept = line.split()[2:], []
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
        elif token in value_flags:
            skip_value = True
        elif token in ("-m", "--multirun") or not token.startswith("-"):
            kept.append(token)
    return " ".join(kept) + (" " if line.endswith(" ") else "")
