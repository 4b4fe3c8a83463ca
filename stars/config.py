"""The run configuration: one frozen pydantic tree, loaded from YAML plus ``--set`` overrides.

Every model is frozen and forbids unknown keys; variants (datasets, neurons, synthesis
methods, optimizers, schedules) are discriminated unions on ``kind``. Defaults follow the
Fast-DFKD CIFAR protocol (Fang et al., AAAI 2022; ``zju-vipa/Fast-Datafree``) where
``docs/design.md`` is silent.

Loading is :func:`load_config` (distillation runs) or :func:`load_teacher_config`
(``stars train-teacher``). Every problem a user can cause (a missing file, a YAML syntax
error, an unknown key, a wrong type, an out-of-range number, an unknown ``kind``, a bad
``--set``) raises :class:`ConfigError`, whose message names the field's path, the value given
and what is allowed. The CLI turns it into exit code 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from stars.config_base import Frozen as _Frozen
from stars.config_base import NonNegFloat, PosFloat, PosInt, Probability
from stars.config_base import kind_of as _kind_of
from stars.errors import StarsError
from stars.synthesis.methods import (
    KINDS as SYNTHESIS_KINDS,
)
from stars.synthesis.methods import (
    DAFLSynthesis,
    DeepInversionSynthesis,
    DFADSynthesis,
    FastSynthesis,
    MethodConfig,
    SynthesisConfig,
)

__all__ = [
    "SYNTHESIS_KINDS",
    "AdamOptimizer",
    "CifarData",
    "ConfigError",
    "ConstantSchedule",
    "CosineSchedule",
    "DAFLSynthesis",
    "DFADSynthesis",
    "DataConfig",
    "DeepInversionSynthesis",
    "DistillConfig",
    "EvalConfig",
    "FastSynthesis",
    "ImageFolderData",
    "MethodConfig",
    "NeuronConfig",
    "NeuronKind",
    "OneCycleSchedule",
    "OptimizerConfig",
    "RCAConfig",
    "RunConfig",
    "SGDOptimizer",
    "ScheduleConfig",
    "SpikeTARConfig",
    "StarsConfig",
    "StepSchedule",
    "StudentConfig",
    "SynthesisConfig",
    "TARConfig",
    "TeacherConfig",
    "TeacherTrainConfig",
    "TrainConfig",
    "WeightSchedule",
    "apply_overrides",
    "load_any_config",
    "load_config",
    "load_teacher_config",
    "parse_override",
]


class ConfigError(StarsError, ValueError):
    """A configuration problem the user can fix; the message says where and how."""


TeacherArch = Literal[
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet18",
    "resnet34",
    "vgg11",
    "vgg13",
    "vgg16",
    "wrn16_2",
    "wrn40_2",
    "wrn16_1",
    "wrn40_1",
    "vgg8_cmi",
    "vgg11_cmi",
    "vgg13_cmi",
]
NeuronKind = Literal["lif", "if", "plif"]
"""The spiking neuron kinds (every `match` on them ends in `assert_never`)."""

StudentArch = Literal[
    "spiking_resnet18",
    "spiking_resnet19",
    "spiking_resnet20",
    "spiking_vgg11",
    "spiking_vgg16",
    "spiking_tiny",
    "spiking_vgg11_avg",
    "spiking_vgg16_avg",
    "spiking_tiny_avg",
]

# ----------------------------------------------------------------------------- data


class CifarData(_Frozen):
    """CIFAR-10 or CIFAR-100.

    ``root`` holds either torchvision's pickled batches (``cifar-10-batches-py`` /
    ``cifar-100-python``) or an ImageFolder tree with ``train/`` and ``test/`` class folders
    (what ``shared/data/cifar10/materialize.py`` writes); ``format: auto`` picks whichever is
    there. ``download`` lets torchvision fetch the pickled batches when neither is present.
    """

    kind: Literal["cifar10", "cifar100"] = "cifar10"
    root: Path = Path("data/cifar10")
    download: bool = False
    format: Literal["auto", "torchvision", "imagefolder"] = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0

    @property
    def num_classes(self) -> int:
        return 10 if self.kind == "cifar10" else 100

    @property
    def image_size(self) -> int:
        return 32


class ImageFolderData(_Frozen):
    """Any ImageFolder tree: ``root/<train_dir>/<class>/*`` and ``root/<test_dir>/<class>/*``.

    Tiny-ImageNet fits as shipped with ``test_dir: val``: a split folder holding ``images/``
    and ``val_annotations.txt`` is labelled from that file (classes from ``train_dir``).
    """

    kind: Literal["imagefolder"] = "imagefolder"
    root: Path
    train_dir: str = "train"
    test_dir: str | None = "val"
    num_classes: PosInt
    image_size: Annotated[int, Field(ge=8)] = 64
    mean: tuple[float, float, float] = (0.4802, 0.4481, 0.3975)
    std: tuple[PosFloat, PosFloat, PosFloat] = (0.2770, 0.2691, 0.2821)
    num_workers: Annotated[int, Field(ge=0)] = 0


DataConfig = Annotated[
    Annotated[CifarData, Tag("cifar")] | Annotated[ImageFolderData, Tag("imagefolder")],
    _kind_of("cifar10", {"cifar10": "cifar", "cifar100": "cifar"}),
]

# ----------------------------------------------------------------------------- models


class TeacherConfig(_Frozen):
    """The ANN teacher. ``checkpoint: null`` means the teacher bundled with stars
    (CIFAR-10 ResNet-20), which only exists for ``arch: resnet20`` on CIFAR-10."""

    arch: TeacherArch = "resnet20"
    checkpoint: Path | None = None


class NeuronConfig(_Frozen):
    """A multi-step spiking neuron (spikingjelly 2.x), docs/design.md section 5.

    ``v_reset: null`` selects soft reset (subtract the threshold); a number is a hard reset
    to that potential. ``tau`` is ignored by ``if``; for ``plif`` it is the initial tau.
    """

    kind: NeuronKind = "lif"
    tau: Annotated[float, Field(gt=1.0)] = 2.0
    v_threshold: PosFloat = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = False
    surrogate: Literal["atan", "sigmoid"] = "atan"
    surrogate_alpha: PosFloat = 2.0
    backend: Literal["auto", "torch", "cupy", "triton"] = "auto"
    """spikingjelly 2 picks its CUDA kernels (then Triton, then torch) itself on GPU: ``auto``;
    ``torch`` forces the pure-PyTorch path; ``cupy`` (its CUDA kernels) / ``triton`` warn
    when spikingjelly picked another one."""

    @model_validator(mode="after")
    def _reset_below_threshold(self) -> NeuronConfig:
        if self.v_reset is not None and self.v_reset >= self.v_threshold:
            raise ValueError(
                f"v_reset ({self.v_reset}) must be below v_threshold ({self.v_threshold})"
            )
        return self


class StudentConfig(_Frozen):
    """The spiking student: architecture, time steps ``T`` (direct encoding) and neuron."""

    arch: StudentArch = "spiking_resnet18"
    T: Annotated[int, Field(ge=1, le=64)] = 4
    neuron: NeuronConfig = NeuronConfig()
    encoder_v_threshold: PosFloat | None = None
    """The threshold of the encoder's neurons alone (the first spiking layer, which turns the
    direct encoder's currents into spikes); every other neuron keeps ``neuron.v_threshold``.
    null: ``neuron.v_threshold`` everywhere. A control for where the student fires
    (benchmarks/README.md, the encoder-only firing control)."""

    @model_validator(mode="after")
    def _encoder_reset_below_threshold(self) -> StudentConfig:
        vth, v_reset = self.encoder_v_threshold, self.neuron.v_reset
        if vth is not None and v_reset is not None and v_reset >= vth:
            raise ValueError(
                f"neuron.v_reset ({v_reset}) must be below encoder_v_threshold ({vth})"
            )
        return self


# ----------------------------------------------------------------------------- synthesis


# ----------------------------------------------------------------------------- STARS


class RCAConfig(_Frozen):
    """Relational Consistency Alignment (STARS), docs/design.md section 4."""

    weight: NonNegFloat = 0.0
    """lambda_rca in the generator objective."""
    role: Literal["adversarial", "align"] = "adversarial"
    """``adversarial``: the generator maximizes L_rca (gated to agreed samples); ``align``:
    it minimizes it."""
    features: Literal["penultimate", "logits"] = "penultimate"
    student_weight: NonNegFloat = 0.0
    """beta_rca in the student objective."""
    delta: PosFloat = 1e-4
    """Safe-norm constant: n(z) = z / sqrt(|z|^2 + delta)."""
    grad_ratio: PosFloat | None = None
    """Calibrate lambda_rca once (docs/design.md section 4): at the first synthesis step where the
    student takes part, the generator's RCA weight is set so that RCA's gradient norm on the
    images is this fraction of the weighted BN term's, then kept (and checkpointed). ``weight``
    must be > 0 (it switches the term on). None: ``weight`` is used as is."""
    recalibrate_every: PosInt | None = None
    """With ``grad_ratio``: measure the ratio again every this many generator steps and
    reset lambda_rca to it, so the weight follows the student as it learns (the first
    measurement often comes before any KD step, against an untrained student, and rests on
    the few samples it happens to agree on). None: calibrate once."""

    student_per_step: bool = False
    """KD side: apply RCA at every time step (``mean_t L_rca(z_T, z_S,t)`` on the per-step
    features or logits) instead of on their time average."""

    @model_validator(mode="after")
    def _recalibration_needs_a_ratio(self) -> RCAConfig:
        if self.recalibrate_every is not None and self.grad_ratio is None:
            raise ValueError("recalibrate_every needs grad_ratio (the ratio to keep)")
        return self


class TARConfig(_Frozen):
    """Tail-Aware Regularization (STARS), docs/design.md section 4."""

    weight: NonNegFloat = 0.0
    kappas: tuple[PosFloat, ...] = (1.0, 2.0)
    tau_rel: PosFloat = 0.1
    source: Literal["gaussian-bn", "laplace-bn", "quantile", "student-vth"] = "gaussian-bn"
    tail_masses: tuple[Probability, ...] = (0.159, 0.023)
    """Target tail masses for ``source: quantile`` (one threshold per mass)."""
    site: Literal["teacher", "student"] = "teacher"
    layers: tuple[int, ...] | None = None
    """Only these BN layers (indices in forward order, negative from the end: ``[-1]`` is
    the last); null = every layer."""

    @field_validator("kappas", "tail_masses")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("must hold at least one value")
        return v


class SpikeTARConfig(_Frozen):
    """Spike-aware TAR (STARS): the student's soft threshold crossings at chosen spiking
    layers against the teacher's tail exceedances at paired BN layers, on the same batch
    (docs/design.md section 4.6; :mod:`stars.synthesis.spike_tar`)."""

    weight: NonNegFloat = 0.0
    """lambda in the generator objective (0: off in synthesis)."""
    role: Literal["adversarial", "align"] = "adversarial"
    """``adversarial``: the generator maximizes the mismatch (on the samples the student
    classifies like the teacher when ``gate``), seeking images whose crossings the student
    has not learned; ``align``: it minimizes it."""
    student_weight: NonNegFloat = 0.0
    """beta in the student objective: the student minimizes the mismatch during KD."""
    stages: tuple[int, ...] | None = None
    """Student spiking layers (indices in forward order, negative from the end), each paired
    with a teacher BN layer by relative depth; null = every spiking layer."""
    pairs: tuple[tuple[int, int], ...] | None = None
    """Explicit ``[student layer, teacher BN layer]`` pairs (replaces ``stages``)."""
    tau_rel: PosFloat = 0.2
    """Student temperature: ``sigmoid((H - V_th) / (tau_rel * V_th))``."""
    target: Literal["teacher", "gaussian", "laplace"] = "teacher"
    """``teacher``: the teacher's soft exceedance on the same batch; ``gaussian`` /
    ``laplace``: the constant tail mass above ``kappa`` standard deviations of that law."""
    threshold: Literal["bn", "batch-quantile"] = "bn"
    """Teacher thresholds: ``bn``: ``running_mean + kappa * std`` per channel;
    ``batch-quantile``: the batch's own per-channel ``1 - tail_mass`` quantile."""
    kappa: NonNegFloat = 1.0
    tail_mass: Probability = 0.1
    teacher_tau_rel: PosFloat = 0.1
    """Teacher temperature: ``tau_c = teacher_tau_rel * sqrt(running_var_c + eps)``."""
    granularity: Literal["batch", "sample", "spatial"] = "spatial"
    """What is compared: per position (maps pooled to the coarser grid), per sample, or the
    whole batch."""
    normalize: bool = True
    """Divide each side by its mean: only the pattern of crossings must agree, not the
    firing level."""
    gate: bool = True
    """Adversarial role: only samples the student classifies like the teacher."""

    @model_validator(mode="after")
    def _consistent(self) -> SpikeTARConfig:
        if self.pairs is not None and self.stages is not None:
            raise ValueError("give stages or pairs, not both")
        if self.granularity == "batch" and self.normalize:
            raise ValueError(
                "normalize needs granularity 'sample' or 'spatial' (a normalized "
                "batch mean is always 1)"
            )
        if self.target != "teacher" and self.normalize:
            raise ValueError(f"target {self.target!r} is a constant: use normalize: false")
        if self.target != "teacher" and self.threshold != "bn":
            raise ValueError("threshold applies to target 'teacher' only")
        return self


class WeightSchedule(_Frozen):
    """A factor in ``[0, 1]`` on every STARS weight of the generator objective, by epoch
    ``e`` (0-based): ``constant`` 1; ``step`` 1 before ``end_epoch``, then 0; ``linear``
    ``max(0, 1 - e / end_epoch)``; ``cosine`` ``(1 + cos(pi min(e / end_epoch, 1))) / 2``.
    The student's weights (``student_weight``) are not scheduled."""

    kind: Literal["constant", "step", "linear", "cosine"] = "constant"
    end_epoch: PosInt | None = None

    @model_validator(mode="after")
    def _needs_end(self) -> WeightSchedule:
        if self.kind != "constant" and self.end_epoch is None:
            raise ValueError(f"schedule {self.kind!r} needs end_epoch")
        return self

    def factor(self, epoch: int) -> float:
        """The factor at 0-based ``epoch``."""
        if self.kind == "constant" or self.end_epoch is None:
            return 1.0
        frac = min(max(epoch, 0) / self.end_epoch, 1.0)
        if self.kind == "step":
            return 1.0 if epoch < self.end_epoch else 0.0
        if self.kind == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))


class StarsConfig(_Frozen):
    """The STARS plug-in. Every weight 0 (the default) is the plain baseline."""

    rca: RCAConfig = RCAConfig()
    tar: TARConfig = TARConfig()
    spike_tar: SpikeTARConfig = SpikeTARConfig()
    schedule: WeightSchedule = WeightSchedule()

    @property
    def enabled(self) -> bool:
        return (
            self.rca.weight > 0
            or self.rca.student_weight > 0
            or self.tar.weight > 0
            or self.spike_tar.weight > 0
            or self.spike_tar.student_weight > 0
        )


# ----------------------------------------------------------------------------- training


class SGDOptimizer(_Frozen):
    kind: Literal["sgd"] = "sgd"
    lr: PosFloat = 0.2
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: NonNegFloat = 1e-4
    nesterov: bool = False


class AdamOptimizer(_Frozen):
    kind: Literal["adam", "adamw"] = "adam"
    lr: PosFloat = 1e-3
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    weight_decay: NonNegFloat = 0.0


OptimizerConfig = Annotated[
    Annotated[SGDOptimizer, Tag("sgd")] | Annotated[AdamOptimizer, Tag("adam")],
    _kind_of("sgd", {"adamw": "adam"}),
]


class CosineSchedule(_Frozen):
    kind: Literal["cosine"] = "cosine"
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    min_lr: NonNegFloat = 0.0


class StepSchedule(_Frozen):
    kind: Literal["step"] = "step"
    milestones: tuple[PosInt, ...] = (100, 150)
    gamma: Probability = 0.1
    warmup_epochs: Annotated[int, Field(ge=0)] = 0


class OneCycleSchedule(_Frozen):
    kind: Literal["onecycle"] = "onecycle"
    pct_start: Probability = 0.25


class ConstantSchedule(_Frozen):
    kind: Literal["constant"] = "constant"
    warmup_epochs: Annotated[int, Field(ge=0)] = 0


ScheduleConfig = Annotated[
    Annotated[CosineSchedule, Tag("cosine")]
    | Annotated[StepSchedule, Tag("step")]
    | Annotated[OneCycleSchedule, Tag("onecycle")]
    | Annotated[ConstantSchedule, Tag("constant")],
    _kind_of("cosine"),
]


class DistillConfig(_Frozen):
    """The student's side: Fast-style alternation of synthesis and KD per epoch."""

    epochs: PosInt = 220
    synthesis_steps_per_epoch: Annotated[int, Field(ge=0)] = 1
    """Synthesized batches added to the memory bank each epoch (DeepInversion: all batches
    are made before the first KD step unless ``synthesis.synthesize_first`` is false)."""
    kd_steps_per_epoch: Annotated[int, Field(ge=0)] = 400
    batch_size: PosInt = 256
    optimizer: OptimizerConfig = SGDOptimizer()
    schedule: ScheduleConfig = CosineSchedule()
    temperature: PosFloat = 20.0
    loss: Literal["kd", "tet"] = "kd"
    max_bad_steps: PosInt = 10
    """Non-finite steps in a row before the run stops with a checkpoint."""


class EvalConfig(_Frozen):
    """Evaluation of the student (and the teacher, for reference) on real images."""

    enabled: bool = True
    every_epochs: PosInt = 10
    batch_size: PosInt = 256
    """Images per loaded batch."""
    forward_batch: PosInt | Literal["auto"] = "auto"
    """Images per forward: each loaded batch is split into forwards of at most this many
    (top-1 does not change; only the speed). ``auto``: on CPU, as many as keep
    ``T x images x H x W`` within 2^18 (64 images for a T = 4 student on 32 px, 256 for the
    teacher; :func:`stars.evaluation.forward_batch`), because forwards of 500 spiking images
    spill the cache and ran 1.85x slower than forwards of 50; elsewhere the loaded batch."""
    max_images: PosInt | None = None
    """Evaluate on a fixed random subset of N images (quick checks); null = the whole split."""
    split: Literal["test", "val"] = "test"
    """``val``: a fixed subset of ``val_size`` *training* images (same for every seed and run),
    for tuning without touching the test split; ``test``: the test split."""
    val_size: PosInt = 5000


class SWAConfig(_Frozen):
    """Stochastic weight averaging (Izmailov et al., UAI 2018; ``torch.optim.swa_utils``):
    from epoch ``start_epoch`` on, the learning rate anneals to ``lr`` over
    ``anneal_epochs`` and stays there, the weights after each epoch are averaged, and the
    saved (and evaluated) teacher is the average, with its BN statistics recomputed on the
    training images."""

    start_epoch: Annotated[int, Field(ge=0)] = 0
    """Epochs of the normal schedule before averaging starts (0 = average from the start)."""
    lr: PosFloat = 0.01
    anneal_epochs: Annotated[int, Field(ge=0)] = 1


class TrainConfig(_Frozen):
    """Supervised training of an ANN teacher on real data (``stars train-teacher``)."""

    epochs: PosInt = 200
    batch_size: PosInt = 128
    optimizer: OptimizerConfig = SGDOptimizer(
        lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    schedule: ScheduleConfig = CosineSchedule()
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    max_train_images: PosInt | None = None
    """Train on the first N images only (quick checks); null = the whole split."""
    swa: SWAConfig | None = None
    """null = no weight averaging."""
    init_from: Path | None = None
    """Start from these weights (a ``teacher.safetensors`` of an earlier run, same arch and
    classes) instead of a random init: fine-tuning, or a second (warm-restart) schedule.
    null = random init."""


# ----------------------------------------------------------------------------- runs


Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]


class _RunCommon(_Frozen):
    seed: Annotated[int, Field(ge=0)] = 0
    device: Device = "auto"
    """``auto`` = CUDA when available, else CPU."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    output_dir: Path = Path("runs")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    """Run directory name under ``output_dir``; null = ``<command>-<timestamp>``."""
    compile: bool = False
    """``torch.compile``: the teacher's forwards, and the student's (on CPU its neurons'
    recurrence only, :func:`stars.neurons.fused.compiled_multi_step`; elsewhere its forwards
    too), and the synthesis objective's BN statistics
    (:func:`stars.synthesis.priors.compiled_batch_stats`). Falls back to eager with a warning
    if compiling fails."""
    tensorboard: bool = False
    """Also write ``metrics.jsonl``'s scalars (and, for ``distill``, the synthetic grid) as
    TensorBoard events in ``RUN_DIR/tensorboard`` (:mod:`stars.tensorboard_log`)."""


class RunConfig(_RunCommon):
    """A data-free distillation run (``stars distill``)."""

    channels_last: bool | Literal["generator"] = False
    """Convolutions in channels-last memory format. ``true``: the teacher, the student and
    the synthesizer's generator (faster on GPUs with tensor cores; on this project's CPU the
    spiking student ran slower, benchmarks/README.md); ``generator``: the generator alone,
    whose convolutions are most of a synthesis step (its images come out in the usual
    layout). Not bit-identical to ``false``: oneDNN sums in another order."""
    data: DataConfig = CifarData()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    synthesis: SynthesisConfig = FastSynthesis()
    stars: StarsConfig = StarsConfig()
    distill: DistillConfig = DistillConfig()
    evaluation: EvalConfig = EvalConfig()


class TeacherTrainConfig(_RunCommon):
    """Supervised training of an ANN teacher (``stars train-teacher``)."""

    channels_last: bool = False
    """The teacher's convolutions in channels-last memory format (faster on GPUs with tensor
    cores)."""
    data: DataConfig = CifarData()
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig(every_epochs=1)


# ----------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its path and a YAML-parsed value (``6`` -> int 6,
    ``[1, 2]`` -> list, ``null`` -> None, ``abc`` -> str)."""
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set student.T=6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``a.b.c=value`` override applied in order."""
    import copy

    out = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``path: message (given: value)``."""
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "<root>"
        msg = err["msg"]
        etype = err["type"]
        given = err.get("input")
        if etype == "extra_forbidden":
            msg = "unknown key (not a field of this section; see `stars config schema`)"
        elif etype == "union_tag_invalid":
            ctx = err.get("ctx") or {}
            msg = f"unknown kind {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
            given = None
        elif etype == "union_tag_not_found":
            msg = "missing `kind`, needed to choose the variant"
            given = None
        line = f"  {loc}: {msg}"
        if given is not None and not isinstance(given, dict):
            line += f" (given: {given!r})"
        lines.append(line)
    return "\n".join(lines)


def _is_union_tag(part: int | str) -> bool:
    # pydantic puts the chosen tag ('fast', 'cifar10', ...) into the location of errors
    # inside a discriminated union; users know the path without it.
    return isinstance(part, str) and part in _UNION_TAGS


_UNION_TAGS = {
    "cifar",
    "cifar10",
    "cifar100",
    "imagefolder",
    *SYNTHESIS_KINDS,
    "sgd",
    "adam",
    "adamw",
    "cosine",
    "step",
    "onecycle",
    "constant",
}


def _validate(model: type[M], tree: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_tree(model: type[M], path: Path | None, overrides: list[str] | None = None) -> M:
    """Load ``path`` (or the defaults when None), apply overrides, validate as one tree."""
    tree = _read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides or []))
    return _validate(model, tree, str(path) if path is not None else "config")


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a distillation run config; raises :class:`ConfigError` on any bad input."""
    return load_tree(RunConfig, path, overrides)


def load_teacher_config(
    path: Path | None, overrides: list[str] | None = None
) -> TeacherTrainConfig:
    """Load a teacher-training config; raises :class:`ConfigError` on any bad input."""
    return load_tree(TeacherTrainConfig, path, overrides)


def load_any_config(
    path: Path, overrides: list[str] | None = None
) -> RunConfig | TeacherTrainConfig:
    """Load a distillation or a teacher-training config, told apart by its sections.

    A section only a teacher-training config has (``train``) makes it one; a section only a
    distillation run has (``student``, ``synthesis``, ``stars``, ``distill``) or neither makes
    it a run config. Both kinds at once is a :class:`ConfigError` naming them.
    """
    tree = apply_overrides(_read_yaml(path), list(overrides or []))
    teacher_fields, run_fields = set(TeacherTrainConfig.model_fields), set(RunConfig.model_fields)
    teacher_only = sorted(set(tree) & (teacher_fields - run_fields))
    run_only = sorted(set(tree) & (run_fields - teacher_fields))
    if teacher_only and run_only:
        raise ConfigError(
            f"{path}: has sections of a teacher-training config ({', '.join(teacher_only)}) and "
            f"of a distillation run ({', '.join(run_only)}); a config is one or the other"
        )
    model: type[RunConfig] | type[TeacherTrainConfig] = (
        TeacherTrainConfig if teacher_only else RunConfig
    )
    return _validate(model, tree, str(path))


def dump_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML that :func:`load_tree` reads back to an equal model."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
