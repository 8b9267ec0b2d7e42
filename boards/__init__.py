"""Board profiles: what a target takes, what it cannot run, and what its deploy package holds.

A profile is a ``BoardProfile`` registered under the ``edgepipe.boards`` entry points (pyproject.toml):
one class per family holds the behaviour (``boards/rockchip.py``: Rockchip NPU with a C demo or with
rknn-toolkit-lite2; ``maixii_dock.py``: ncnn/awnn; ``onnxruntime.py``), and a board of a known family is a
data file, ``boards/profiles/<name>.yaml`` (its entry point names ``boards.profiles:<name>``). It states

- the input it takes (layout, size limits) and the normalisation it can express;
- operators it cannot run (errors) and operators that may fall back to a CPU path the board's
  runtime lacks (warnings);
- flash and RAM limits, checked against estimates from the exported ONNX;
- its quantizer and options (the rknn-toolkit2 target platform);
- the files and deploy script of its package (``write_package``).

    board = get_board("rv1103")                        # defaults
    board = get_board("rv1103", BoardSettings(name="rv1103", ram_mb=128))   # user limits
    findings = board.check_onnx(analyze("model.onnx"), Preprocess.load(d), io)

The ``preflight`` stage runs ``check_onnx`` on the exported ONNX before any slow conversion; the
``package`` stage calls ``check_package`` on the converted model (the file that goes to the board)
and ``write_package``. Nothing here imports torch; onnx is imported inside ``boards.graph.analyze``.
"""

from __future__ import annotations

import json
import shutil
import string
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from backends.base import by_kind, packaged_kinds
from boards.errors import UnknownBoard as UnknownBoard  # re-exported: raised here
from engine.contract.stage import Params
from stages.common.bundle import write_labels

from .emulation import Emulation

if TYPE_CHECKING:  # pragma: no cover
    from stages.common.preprocess import Preprocess

    from .graph import GraphInfo, Node

BOARD_GROUP = "edgepipe.boards"
TEMPLATES = Path(__file__).resolve().parent / "templates"
# the shared preprocessing functions (numpy + Pillow only), copied verbatim as preprocess.py into
# packages that run Python on the board
PREPROCESS_MODULE = Path(__file__).resolve().parent.parent / "stages" / "common" / "preprocess_numpy.py"
# share of a limit above which a check warns ("close to the limit")
NEAR_LIMIT = 0.8
MB = 1024 * 1024

Level = Literal["error", "warning", "info"]


class Finding(BaseModel):
    """One result of a board check."""

    model_config = ConfigDict(frozen=True)

    level: Level
    check: str  # input | preprocess | normalisation | op | cpu_fallback | reshape | flash | ram | ...
    message: str  # what is wrong, where, and what to change
    node: str | None = None  # the ONNX node or ncnn layer concerned

    def line(self) -> str:
        return f"[{self.level}] {self.check}: {self.message}"


# -- registry -------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def board_entry_points() -> dict:
    """Every board by name: those of a known family are the profile files in boards/profiles/ (a new
    one is that file alone), the rest the `edgepipe.boards` entry points (a board with a module of its
    own, or another distribution's board; one of those with a profile's name wins)."""
    profiles = Path(__file__).resolve().parent / "profiles"
    found = {p.stem: EntryPoint(p.stem, f"boards.profiles:{p.stem}", BOARD_GROUP) for p in profiles.glob("*.yaml")}
    return {**found, **{ep.name: ep for ep in entry_points(group=BOARD_GROUP)}}


def known_boards() -> list[str]:
    return sorted(board_entry_points())


def _check_board_name(name: str) -> str:
    if name not in board_entry_points():
        raise ValueError(f"unknown board {name!r}; known boards: {', '.join(known_boards())}")
    return name


# A board name, validated against the registered profiles (config keys `board.name`, `package.board`).
BoardName = Annotated[str, AfterValidator(_check_board_name)]


def _check_model_format(kind: str) -> str:
    if kind not in packaged_kinds():
        raise ValueError(f"model_format {kind!r} is not a backend kind a package takes; known: {packaged_kinds()}")
    return kind


# The model kind a board's package takes: a registered backend with a packaged name (backends/).
ModelFormat = Annotated[str, AfterValidator(_check_model_format)]


class BoardSettings(Params):
    """The ``board`` config section (conf/board/NAME.yaml): which board, plus optional limits the
    user can tune for their variant of it (a Luckfox Pico with more flash, a V831 with less free RAM)."""

    name: BoardName = "onnxruntime"
    # storage for the model file, MB (null: the profile's value; the profile may have none)
    flash_mb: float | None = Field(None, gt=0)
    # RAM of the board, MB, and the share of it a model may use (the OS and camera take the rest)
    ram_mb: float | None = Field(None, gt=0)
    ram_usable_fraction: float | None = Field(None, gt=0, le=1)
    # rknn-toolkit2 target_platform of the board (pipelines interpolate quantize.target from it);
    # checked against the profile, it is not a free choice
    rknn_target: str | None = None
    # preflight: fail on warnings too (CPU-fallback operators, limits within 80 %)
    strict: bool = False



def get_board(name: str, settings: BoardSettings | Mapping[str, Any] | None = None) -> BoardProfile:
    """The profile registered as ``name``, with the user's limits from ``settings`` applied."""
    ep = board_entry_points().get(name)
    if ep is None:
        raise UnknownBoard(name, known_boards())
    # a board with its own module registers its class; a board of a known family registers its
    # profile, read from boards/profiles/<name>.yaml
    loaded = ep.load()
    board = loaded if isinstance(loaded, BoardProfile) else loaded()
    if settings is not None:
        if not isinstance(settings, BoardSettings):
            settings = BoardSettings.model_validate(dict(settings))
        board = board.with_settings(settings)
    return board


# -- the profile ----------------------------------------------------------------------------------
class BoardProfile(BaseModel):
    """What a board takes and cannot take. Subclasses set the field defaults and may add checks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    title: str
    soc: str
    runtime: str  # what runs the model on the board
    # the model bundle the package takes, as a backend kind (ncnn, rknn, onnx: that stage's output folder)
    model_format: ModelFormat
    # how the board feeds the model (documentation; the checks below enforce what matters)
    input_layout: str
    max_input_size: int | None = None  # largest H or W
    # per_channel: any mean/std; uniform: one mean and one norm for all three channels
    normalisation: Literal["per_channel", "uniform"] = "per_channel"
    # op type -> why and what to change; an error in preflight
    unsupported_ops: Mapping[str, str] = Field(default_factory=dict)
    # op type -> why and what to change; a warning (the op may land on a CPU path the runtime lacks)
    cpu_fallback_ops: Mapping[str, str] = Field(default_factory=dict)
    flash_mb: float | None = None
    ram_mb: float | None = None
    ram_usable_fraction: float = 0.5
    # bytes per weight / per activation element on the board (int8 NPUs: 1; float runtimes: 4)
    weight_bytes: float = 4.0
    activation_bytes: float = 4.0
    quantizer: str | None = None
    quantizer_options: Mapping[str, Any] = Field(default_factory=dict)
    package_files: tuple[str, ...] = ()
    deploy_script: str = ""
    # where each figure above comes from
    sources: Mapping[str, str] = Field(default_factory=dict)
    # the instruction set and userland its package's self-test runs on under qemu-user
    # (`edgepipe selftest --emulate`, boards/emulation.py); one per family, not part of facts()
    emulation: ClassVar[Emulation | None] = None

    def with_settings(self, s: BoardSettings) -> BoardProfile:
        if s.name != self.name:
            raise ValueError(f"settings for board {s.name!r} applied to {self.name!r}")
        target = self.quantizer_options.get("target")
        if s.rknn_target is not None and s.rknn_target != target:
            raise ValueError(f"board.rknn_target={s.rknn_target!r}, but {self.name} is rknn target {target!r}")
        update = {k: v for k, v in (("flash_mb", s.flash_mb), ("ram_mb", s.ram_mb),
                                    ("ram_usable_fraction", s.ram_usable_fraction)) if v is not None}
        return self.model_copy(update=update)

    def facts(self) -> dict[str, Any]:
        """The profile as JSON (preflight.json and manifest.json record it)."""
        return self.model_dump(mode="json")

    # -- checks on the exported ONNX (preflight) ----------------------------------------------------
    def check_onnx(self, g: GraphInfo, spec: Preprocess | None = None, io: Mapping | None = None) -> list[Finding]:
        out = self.check_io(g, spec, io)
        out += self.check_normalisation(spec)
        out += self.check_ops(g)
        out += self.check_sizes(g)
        out += self.extra_checks(g, spec)
        return out

    def check_io(self, g: GraphInfo, spec: Preprocess | None, io: Mapping | None) -> list[Finding]:
        out: list[Finding] = []
        if g.n_inputs != 1 or g.n_outputs != 1:
            out.append(Finding(level="error", check="input",
                               message=f"the graph has {g.n_inputs} inputs and {g.n_outputs} outputs; "
                                       f"{self.title} packages take one image input and one logits output"))
        shape = g.input_shape
        if shape is None or len(shape) != 4:
            out.append(Finding(level="error", check="input",
                               message=f"input '{g.input_name}' has shape {shape}; expected N x 3 x H x W (NCHW)"))
            return out
        n, c, h, w = shape
        if c != 3:
            out.append(Finding(level="error", check="input",
                               message=f"input '{g.input_name}' has {c} channels; {self.title} feeds 3-channel RGB "
                                       f"images (set model.in_channels=3)"))
        if n != 1:
            level: Level = "warning" if by_kind(self.model_format).any_batch else "error"
            out.append(Finding(level=level, check="input",
                               message=f"input '{g.input_name}' batch dimension is "
                                       f"{n if n is not None else 'dynamic'}; {self.title} runs batch 1 with static "
                                       "shapes (export without a dynamic batch)"))
        if h is None or w is None:
            out.append(Finding(level="error", check="input",
                               message=f"input '{g.input_name}' has a dynamic height/width; "
                                       "export with a fixed input size"))
        elif self.max_input_size and max(h, w) > self.max_input_size:
            out.append(Finding(level="error", check="input",
                               message=f"input {h}x{w} exceeds {self.title}'s {self.max_input_size} px; "
                                       f"lower preprocess.input_size"))
        if spec is not None and h is not None and w is not None and (spec.height, spec.width) != (h, w):
            out.append(Finding(level="error", check="preprocess",
                               message=f"preprocess.json input_size {list(spec.input_size)} differs from the "
                                       f"ONNX input {h}x{w}; re-export after changing preprocess.input_size"))
        if io:
            for key, actual in (("input", g.input_name), ("output", g.output_name)):
                if io.get(key) and io[key] != actual:
                    out.append(Finding(level="error", check="input",
                                       message=f"io.json names {key} '{io[key]}' but the ONNX graph's {key} "
                                               f"is '{actual}'"))
        if g.output_shape is not None and len(nontrivial(g.output_shape)) > 1:
            out.append(Finding(level="error", check="output",
                               message=f"output '{g.output_name}' has shape {list(g.output_shape)}; a classifier "
                                       f"package expects one score per class (N x classes)"))
        return out

    def preprocess_problems(self, spec: Preprocess) -> list[tuple[str, str]]:
        """What this board cannot take in a preprocess spec, as (preprocess field, problem). Known from
        the config alone: the preflight stage reports these at validation, before anything runs."""
        out = []
        if self.normalisation == "uniform":
            try:
                spec.awnn_mean_norm()
            except ValueError:
                out.append(("mean", f"{list(spec.mean)} (std {list(spec.std)}) differs per channel, but "
                                    f"board={self.name} ({self.title}) takes one mean and one norm for all three "
                                    "channels; use preprocess=uniform (mean 0.5, std 0.5) or equal values per channel"))
        if self.max_input_size and max(spec.input_size) > self.max_input_size:
            out.append(("input_size", f"{list(spec.input_size)} exceeds the {self.max_input_size} px that "
                                      f"board={self.name} ({self.title}) takes; lower preprocess.input_size"))
        return out

    def check_normalisation(self, spec: Preprocess | None) -> list[Finding]:
        if spec is None or self.normalisation != "uniform":
            return []
        try:
            spec.awnn_mean_norm()
        except ValueError:
            return [Finding(level="error", check="normalisation",
                            message=f"{self.title} takes one mean and one norm for all three channels "
                                    f"({self.runtime}), but preprocess has mean={list(spec.mean)} "
                                    f"std={list(spec.std)}; train with preprocess=uniform "
                                    "(mean 0.5, std 0.5 -> mean 127.5, norm 1/127.5)")]
        return []

    def check_ops(self, g: GraphInfo) -> list[Finding]:
        out: list[Finding] = []
        seen: set[tuple[str, str]] = set()
        for node in g.nodes:
            for level, table in (("error", self.unsupported_ops), ("warning", self.cpu_fallback_ops)):
                if node.op in table and self.op_applies(g, node, level):
                    if (level, node.op) in seen:  # one finding per op type, naming the first node
                        continue
                    seen.add((level, node.op))
                    count = sum(1 for n in g.nodes if n.op == node.op and self.op_applies(g, n, level))
                    where = f"{node.label()}" + (f" (and {count - 1} more)" if count > 1 else "")
                    check = "op" if level == "error" else "cpu_fallback"
                    out.append(Finding(level=level, check=check, node=node.name,  # type: ignore[arg-type]
                                       message=f"{where}: {table[node.op]}"))
        return out

    def op_applies(self, g: GraphInfo, node: Node, level: str) -> bool:
        """Whether a listed op type is a problem for this node (subclasses narrow it by attributes)."""
        return True

    def estimates(self, g: GraphInfo) -> dict[str, float]:
        """Model file and working-memory estimates on the board, MB."""
        weights = g.n_params * self.weight_bytes / MB
        acts = g.peak_activation_elems * self.activation_bytes / MB
        return {"params": g.n_params, "model_mb": round(weights, 6), "activations_mb": round(acts, 6),
                "working_mb": round(weights + acts, 6)}

    def check_sizes(self, g: GraphInfo) -> list[Finding]:
        est = self.estimates(g)
        out: list[Finding] = []
        if self.flash_mb:
            out += limit_findings("flash", est["model_mb"], self.flash_mb,
                          f"model weights {fmt_mb(est['model_mb'])} ({g.n_params:,} parameters at "
                          f"{self.weight_bytes:g} byte each)", f"the flash budget of {self.title}",
                          "use a smaller model (model=mobilenet_v3_small, model.width_mult) or raise board.flash_mb "
                          "if your board has more storage")
        if self.ram_mb:
            budget = self.ram_mb * self.ram_usable_fraction
            out += limit_findings("ram", est["working_mb"], budget,
                          f"working memory estimate {fmt_mb(est['working_mb'])} (weights {fmt_mb(est['model_mb'])} + "
                          f"peak activations {fmt_mb(est['activations_mb'])})",
                          f"the budget of {self.ram_usable_fraction:.0%} of {self.title}'s {self.ram_mb:g} MB RAM",
                          "lower preprocess.input_size or use a smaller model; board.ram_mb / "
                          "board.ram_usable_fraction tune the budget")
        if g.unknown_shapes:
            out.append(Finding(level="info", check="ram",
                               message=f"{g.unknown_shapes} activation shapes could not be inferred; the memory "
                                       f"estimate leaves them out"))
        return out

    def extra_checks(self, g: GraphInfo, spec: Preprocess | None) -> list[Finding]:
        return []

    # -- checks on the converted model and the package ----------------------------------------------
    def check_package(self, model_dir: Path, model_file: Path) -> list[Finding]:
        """Checks on the file that goes to the board (its real size; format-specific contents)."""
        out: list[Finding] = []
        if self.flash_mb:
            mb = model_file.stat().st_size / MB
            out += limit_findings("flash", mb, self.flash_mb, f"{model_file.name} is {fmt_mb(mb)}",
                          f"the flash budget of {self.title}", "use a smaller model or raise board.flash_mb")
        return out

    def normalisation_for(self, spec: Preprocess) -> dict[str, Any]:
        """The normalisation as this board's toolchain takes it (recorded in the manifest)."""
        mean, std = spec.rknn_mean_std()
        return {"mean": list(spec.mean), "std": list(spec.std), "channel_order": spec.channel_order,
                "mean_values_0_255": mean, "std_values_0_255": std}

    def write_package(self, pkg: PackageContext) -> None:
        raise NotImplementedError


def nontrivial(shape) -> list:
    return [d for d in shape[1:] if d != 1]


def fmt_mb(mb: float) -> str:
    return f"{mb:.1f} MB" if mb >= 0.1 else f"{mb * 1024:.1f} KB"


def limit_findings(check: str, value: float, limit: float, what: str, budget: str, fix: str) -> list[Finding]:
    """An error above the limit, a warning above 80 % of it. ``budget`` names the limit."""
    if value > limit:
        return [Finding(level="error", check=check, message=f"{what} exceeds {budget} ({limit:g} MB); {fix}")]
    if value > NEAR_LIMIT * limit:
        return [Finding(level="warning", check=check,
                        message=f"{what} uses {value / limit:.0%} of {budget} ({limit:g} MB)")]
    return []


# -- packages ---------------------------------------------------------------------------------------
@dataclass
class PackageContext:
    """Everything a board needs to write its package folder."""

    board: BoardProfile
    model_dir: Path  # the model bundle (onnx / ncnn / rknn stage output)
    model_file: Path
    spec: Preprocess
    io: dict
    labels: list[str]
    pkg: Path  # the package folder being written
    calib_dir: Path | None = None
    data_dir: Path | None = None  # the dataset folder: golden samples for the self-test (boards/golden.py)
    top_k: int = 5
    name: str = "model"
    notes: list[str] = field(default_factory=list)  # shown in the README and the manifest
    extra_manifest: dict = field(default_factory=dict)

    def render(self, template: str, dest: str, **values: Any) -> Path:
        """Fill ``boards/templates/<template>`` (``string.Template``: ``${name}``, ``$$`` for $)."""
        text = (TEMPLATES / template).read_text(encoding="utf-8")
        filled = string.Template(text).substitute(**{k: str(v) for k, v in values.items()})
        path = self.pkg / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(filled, encoding="utf-8")
        return path

    def copy(self, src: Path, dest: str) -> Path:
        path = self.pkg / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        return path

    def copy_template(self, template: str, dest: str) -> Path:
        return self.copy(TEMPLATES / template, dest)

    def write_labels(self, dest: str = "labels.txt") -> Path:
        return write_labels(self.pkg / dest, self.labels)

    def copy_preprocess(self) -> None:
        """The shared preprocessing module, verbatim, and the model's preprocess.json."""
        self.copy(PREPROCESS_MODULE, "preprocess.py")
        self.copy(self.model_dir / "preprocess.json", "preprocess.json")



def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_zip(path: Path, members: list[tuple[str, Path]]) -> None:
    """A deterministic zip: members in the given order, fixed timestamps and permissions."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, src in members:
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, Path(src).read_bytes())
