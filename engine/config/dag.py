"""The stage DAG: wiring checks, cycles, topological order, sub-graphs for --only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from engine.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from engine.config.validate import StageSpec


class Graph:
    """Over stage specs (config.StageSpec, or plan_memo's remembered ones: a name, `type` and
    `entry.needs`/`entry.after` is all it reads besides the wiring check)."""

    def __init__(self, specs: Mapping[str, StageSpec], check_wiring: bool = True) -> None:
        self.specs = dict(specs)
        if check_wiring:
            self._check_wiring()
        self.order = self._topological_order()

    def upstream(self, name: str) -> list[str]:
        """Stages `name` waits for: its inputs, then its `after:` stages (declaration order)."""
        entry = self.specs[name].entry
        return list(dict.fromkeys([*entry.needs.values(), *entry.after]))

    def _check_wiring(self) -> None:
        problems = []
        names = list(self.specs)
        for name, spec in self.specs.items():
            where = f"pipeline.stages.{name}"
            declared = spec.cls.inputs
            for input_name, upstream in spec.entry.needs.items():
                if upstream not in self.specs:
                    problems.append(
                        f"{where}.needs.{input_name}: no stage named '{upstream}'{did_you_mean(upstream, names)}; "
                        f"stages: {', '.join(names)}"
                    )
                if input_name not in declared and not spec.cls.extra_inputs:
                    problems.append(
                        f"{where}.needs.{input_name}: stage type '{spec.cls.name}' has no input '{input_name}'"
                        f"{did_you_mean(input_name, list(declared))}; its inputs: {', '.join(declared) or '(none)'}"
                    )
            for upstream in spec.entry.after:
                if upstream not in self.specs:
                    problems.append(f"{where}.after: no stage named '{upstream}'{did_you_mean(upstream, names)}")
            missing = [i for i, inp in declared.items() if inp.required and i not in spec.entry.needs]
            for input_name in missing:
                doc = declared[input_name].doc
                problems.append(
                    f"{where}.needs: required input '{input_name}' of stage type '{spec.cls.name}' is not wired"
                    f"{f' ({doc})' if doc else ''}; add `needs: {{{input_name}: <stage>}}`"
                )
        if problems:
            raise ConfigError(problems)

    def _topological_order(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        path: list[str] = []

        def visit(name: str) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                # path follows `needs` backwards; print it in data-flow order (a -> b: b reads a)
                cycle = list(reversed(path[path.index(name):] + [name]))
                raise ConfigError([f"pipeline.stages: cycle {' -> '.join(cycle)}"])
            state[name] = 1
            path.append(name)
            for up in self.upstream(name):
                visit(up)
            path.pop()
            state[name] = 2
            order.append(name)

        for name in self.specs:
            visit(name)
        return order

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """The stages named and everything they need, transitively."""
        seen: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(self.upstream(name))
        return seen

    def descendants(self, name: str) -> set[str]:
        down = {n for n in self.specs if name in self.upstream(n)}
        for d in list(down):
            down |= self.descendants(d)
        return down

    def select(self, only: Iterable[str] | None, option: str = "--only") -> list[str]:
        """Topological order restricted to `only` and what it needs (all stages when only is empty).
        ``option`` is the command-line option that named them (for the error)."""
        only = list(only or [])
        unknown = [n for n in only if n not in self.specs]
        if unknown:
            raise ConfigError(
                [f"{option} {n}: no such stage{did_you_mean(n, list(self.specs))}; stages: {', '.join(self.specs)}"
                 for n in unknown]
            )
        if not only:
            return list(self.order)
        keep = self.ancestors(only)
        return [n for n in self.order if n in keep]

    def mermaid(self) -> str:
        lines = ["flowchart LR"]
        for name in self.order:
            lines.append(f'    {name}["{name}<br/><small>{self.specs[name].type}</small>"]')
        for name in self.order:
            entry = self.specs[name].entry
            for input_name, up in entry.needs.items():
                label = "" if input_name == up else f"|{input_name}|"
                lines.append(f"    {up} -->{label} {name}")
            for up in entry.after:
                lines.append(f"    {up} -.-> {name}")
        return "\n".join(lines) + "\n"

    def dot(self) -> str:
        lines = ["digraph pipeline {", "  rankdir=LR;", "  node [shape=box];"]
        for name in self.order:
            lines.append(f'  "{name}" [label="{name}\\n({self.specs[name].type})"];')
        for name in self.order:
            entry = self.specs[name].entry
            for input_name, up in entry.needs.items():
                label = "" if input_name == up else f' [label="{input_name}"]'
                lines.append(f'  "{up}" -> "{name}"{label};')
            for up in entry.after:
                lines.append(f'  "{up}" -> "{name}" [style=dashed];')
        lines.append("}")
        return "\n".join(lines) + "\n"
