"""What a method is, and the registry of methods.

A method is one registered :class:`Method`: its name, its typed profile section, the runs its
section plans, its notebook, its report label and order, and the method-specific part of a run
(:class:`MethodRun`: prepare, then predict one case). Everything else a run does (run folder,
per-case loop, saving on the original grid, scoring) is the shared loop,
:func:`fewsam_lib.bench.evaluate.evaluate`. Registering a method in any module makes it known to
the CLI, profiles, ``make reproduce`` and the report; no other module names it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import FewsamError, lookup

if TYPE_CHECKING:
    from ..bench.profiles import Profile
    from ..bench.runs import RunWriter
    from ..data.manifest import Manifest
    from ..data.volumes import Volume


@dataclass(frozen=True)
class PlannedRun:
    """One run asked for: a cell of a profile's matrix, or a ``fewsam run`` command line.

    ``manifest`` is relative to the repository (or absolute). ``backbone`` is ``none`` for methods
    without an image encoder. ``budget`` is nnU-Net's label budget; its ``shots`` are known once
    the budget is drawn.
    """

    method: str
    manifest: str
    backbone: str
    variant: str
    seed: int
    profile: str
    shots: int | None = None
    budget: str | None = None


@dataclass(frozen=True)
class RunContext:
    """Everything a method needs to start one run."""

    run: PlannedRun
    manifest: Manifest
    profile: Profile  # as it applies to this dataset
    device: str = "cpu"
    checkpoint: str | Path | None = None
    progress: bool = True

    @property
    def section(self) -> Any:
        return self.profile.section(self.run.method)

    @property
    def encoder_path(self) -> str:
        """How this run's SAM encoder runs (the profile's ``encoder_path``, else the device's default)."""
        return self.profile.encoder_path_on(self.device)


@dataclass
class CasePrediction:
    """A method's answer for one test case: a canonical label volume and which slices to score.

    ``scored_slices`` None means every slice of the profile's extent; ``slice_selection`` is
    written into each metric row (``all_slices``, ``gt_slices`` where a method needs a
    ground-truth prompt on the slice, ``unlabelled_slices`` where it was given some slices'
    labels). ``withheld_slices``: slices whose labels the method was given; volume rows leave them
    out and ``run.json`` records them.
    """

    labels: np.ndarray
    scored_slices: list[int] | None = None
    slice_selection: str = "all_slices"
    withheld_slices: list[int] = field(default_factory=list)  # given to the method: scored by no row


class MethodRun:
    """The method-specific part of one run; the shared loop calls ``prepare`` once, then
    ``predict_case`` per test case, then reads ``timings`` and ``extra`` into ``run.json``."""

    variant: Any  # a frozen record with a ``name`` and ``definition()``
    backbone: str = "none"
    shots: int | None = None

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.timings: dict[str, float] = {}
        self.extra: dict[str, Any] = {}

    def parameters(self) -> dict[str, Any]:
        """Method-specific settings for ``run.json`` ``parameters`` (beside the shared ones)."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """What made the run besides the data (weights, the collection, a label budget)."""
        return {}

    def prepare(self, writer: RunWriter, case_ids: list[str]) -> None:
        """Expensive work before the first case (training, exporting), writing into the run folder."""

    def predict_case(self, volume: Volume, extent: range) -> CasePrediction:
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    """A registered method. Subclasses set the class variables and override ``start``.

    ``section_type`` is the typed dataclass of the method's profile section (key ``section_key``):
    unknown keys there fail when the profile loads.
    """

    name: ClassVar[str]  # in run folders and metric rows
    command: ClassVar[str]  # `fewsam run <command>`
    description: ClassVar[str]
    section_key: ClassVar[str]
    section_type: ClassVar[type]
    notebook: ClassVar[str | None] = None
    rank: ClassVar[int] = 50  # report order: lower first
    uses_backbone: ClassVar[bool] = True
    default_variant: ClassVar[str] = "default"
    # Where the report puts the method: "prompted" (a prompt on every test slice: reference lines
    # in the label-efficiency figure, ``reference_variants`` of them, the first in the headline),
    # "few_shot" (the curve over the collection's labelled slices, the headline's subject),
    # "supervised" (points at the labelled slices of a label budget), or "other".
    report_role: ClassVar[str] = "other"
    reference_variants: ClassVar[tuple[str, ...]] = ()

    def draw_example(
        self,
        ax: Any,
        meta: dict[str, Any],
        case_id: str,
        slice_index: int,
        mask: np.ndarray,
        value: int,
        planar: bool = False,
    ) -> None:
        """Draw on a run's example prediction what made it, beyond the image (nothing by default).

        ``planar``: the slice is a 2D image, drawn as displayed (see report.drawing)."""

    def labelled_slices(self, meta: dict[str, Any]) -> int | None:
        """How many labelled training slices a finished run learnt from (``run.json``); None if none."""
        return None

    def needs_backbone(self, variant: str) -> bool:
        """Whether runs of ``variant`` go through a SAM encoder (and carry a backbone and encoder path)."""
        return self.uses_backbone

    def variant_names(self) -> list[str]:
        """The registered variants (for ``--help`` and error messages)."""
        return [self.default_variant]

    def resolve_variant(self, name: str, section: Any) -> Any:
        """The variant record ``name`` names, with the profile section's settings applied."""
        raise NotImplementedError

    def plan(self, manifest: str, section: Any, backbones: list[str], profile: str) -> list[PlannedRun]:
        """Every run of this method the section asks for on one dataset, in a stable order."""
        return [
            PlannedRun(self.name, manifest, backbone, variant, seed, profile, shots)
            for backbone in (backbones if self.uses_backbone else ["none"])
            for variant in getattr(section, "variants", (self.default_variant,))
            for shots in getattr(section, "shots", (None,))
            for seed in getattr(section, "seeds", (0,))
        ]

    def shots_of(self, run: PlannedRun, manifest: Manifest, profile: Profile) -> int | None:
        """The ``shots`` a run's folder and rows carry (nnU-Net: the labelled slices of its budget)."""
        return run.shots

    def check_request(self, run: PlannedRun) -> None:
        """Refuse a request that cannot make sense for this method, before any work."""
        if self.needs_backbone(run.variant) and run.backbone in (None, "none"):
            raise FewsamError(f"{self.command} runs need --backbone")

    def start(self, context: RunContext) -> MethodRun:
        raise NotImplementedError

    def label(self, variant: str, shots: int | None, budget: str | None = None) -> str:
        """How the report names a row of this method."""
        return f"{self.name} {variant}"

    def variant_order(self, variant: str) -> int:
        """Sort order of a variant within the method's rows of the report."""
        return 0

    def add_run_options(self, parser: Any) -> None:
        """Options of ``fewsam run <command>`` beyond the shared ones (manifest, seed, profile ...)."""
        parser.add_argument(
            "--variant",
            default=self.default_variant,
            help=f"{', '.join(self.variant_names())} (default {self.default_variant})",
        )
        if self.uses_backbone:
            parser.add_argument("--backbone", required=True, help="mobile_sam, lite_medsam, sam_vit_b ...")

    def run_from_options(self, options: Any) -> PlannedRun:
        """The run that ``fewsam run <command>``'s parsed options ask for."""
        return PlannedRun(
            self.name,
            options.manifest,
            getattr(options, "backbone", "none"),
            options.variant,
            options.seed,
            options.profile,
            getattr(options, "shots", None),
            getattr(options, "budget", None),
        )

    def command_options(self, run: PlannedRun) -> list[str]:
        """The ``fewsam run`` options that reproduce ``run`` (besides manifest, seed, profile)."""
        options = ["--variant", run.variant]
        if self.needs_backbone(run.variant):
            options += ["--backbone", run.backbone]
        if run.shots is not None:
            options += ["--shots", str(run.shots)]
        return options

    def notebook_parameters(self, run: PlannedRun) -> dict[str, Any]:
        """The method's notebook ``parameters`` cell values for ``run`` (besides the shared ones)."""
        parameters: dict[str, Any] = {"variant": run.variant}
        if self.needs_backbone(run.variant):
            parameters["backbone"] = run.backbone
        if run.shots is not None:
            parameters["shots"] = run.shots
        return parameters


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known everywhere; its name and command must be new."""
    for known in METHODS.values():
        if known.name == method.name or known.command == method.command:
            raise ValueError(f"method '{method.name}' ({method.command}) is already registered")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """A registered method by name (``sam_prompting``) or command (``prompting``)."""
    from . import load_builtin_methods

    load_builtin_methods()
    for method in METHODS.values():
        if name == method.command:
            return method
    return lookup(METHODS, name, "method")


def registered_methods() -> list[Method]:
    """Every method, in report order."""
    from . import load_builtin_methods

    load_builtin_methods()
    return sorted(METHODS.values(), key=lambda method: (method.rank, method.name))


def settings_hash(settings: Any) -> str:
    """A short, stable hash of a variant's settings, for names that cannot say everything."""
    text = json.dumps(settings if isinstance(settings, dict) else asdict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
