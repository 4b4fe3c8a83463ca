"""The registry of synthesis methods: one config class per method, and the union of them.

A method is two things:

- its **config** here: a :class:`MethodConfig` subclass with ``kind: Literal["<kind>"]``,
  its fields (what ``synthesis:`` accepts in a run config) and its hooks: the weights of its
  own terms in the generator objective, how it is built, and what it asks of the run (a
  warm-up without KD, synthesis up front, the budget ``stars synthesize`` spends);
- its **implementation**, ``stars/synthesis/methods/<kind>.py``: the synthesizer (behind
  :class:`~stars.synthesis.protocols.Synthesizer`), imported by the config's
  :meth:`~MethodConfig.build` when the run builds it.

Adding a method is its implementation module plus its config class here and one line in
:data:`SynthesisConfig`. This module imports no torch (the run configuration is built from
it, and ``stars --help`` stays fast). mypy proves that every member of the union can be
built: :data:`SynthesisConfig`'s members all derive :class:`MethodConfig`, whose hooks the
pipeline calls without a ``match`` on the kind.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, get_args

from pydantic import Field, Tag

from stars.config_base import Frozen, NonNegFloat, PosFloat, PosInt, kind_of
from stars.errors import StarsError
from stars.synthesis.weights import TermWeights

if TYPE_CHECKING:
    from stars.synthesis.synthesizers import SynthesisContext, SynthesizerBase

__all__ = [
    "KINDS",
    "METHODS",
    "CMISynthesis",
    "DAFLSynthesis",
    "DFADSynthesis",
    "DeepInversionSynthesis",
    "FastSynthesis",
    "MethodConfig",
    "NAYERSynthesis",
    "SynthesisConfig",
    "WarmupMomentumMethod",
]


class MethodConfig(Frozen):
    """What every synthesis method's config holds and answers.

    Subclasses set ``kind`` to a ``Literal`` and implement :meth:`term_weights` and
    :meth:`build`; the other hooks have the defaults of a method without warm-up, run
    interleaved with KD.
    """

    kind: str
    batch_size: PosInt = 256
    """Images per synthesized batch."""
    bn_weight: NonNegFloat = 10.0
    """lambda_bn: BN statistics matching (DeepInversion)."""
    oh_weight: NonNegFloat = 0.4
    """lambda_oh: cross-entropy of the teacher on the sampled labels."""
    memory_size: PosInt = 51200
    """Images kept in the memory bank the student reads from (oldest dropped first)."""

    steps_field: ClassVar[str | None] = None
    """The field holding the optimization steps per batch (what ``stars synthesize
    --steps`` scales); None: the method has none."""

    @abstractmethod
    def term_weights(self) -> TermWeights:
        """The weights of the method's own terms in the generator objective."""

    @abstractmethod
    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        """The method's synthesizer over the shared context (teacher, objective, bank,
        random generator); imports the implementation module. It implements
        :class:`~stars.synthesis.protocols.Synthesizer` by deriving
        :class:`~stars.synthesis.synthesizers.SynthesizerBase`."""

    @property
    def matching_momentum(self) -> float:
        """Momentum of the batch statistics that BN matching compares (0: raw)."""
        return 0.0

    @property
    def kd_warmup_epochs(self) -> int:
        """Epochs at the start of a run that synthesize without KD steps."""
        return 0

    @property
    def synthesize_upfront(self) -> bool:
        """Every batch of the run is synthesized before the first KD step."""
        return False

    def teacher_only_warmup(self, *, epochs: int, per_epoch: int) -> int:
        """Batches ``stars synthesize`` (the teacher alone, no student) drops before it
        keeps any, for a run of ``epochs`` x ``per_epoch`` synthesis steps.

        Raises:
            StarsError: the method cannot learn from the teacher alone.
        """
        del epochs, per_epoch
        return 0

    @property
    def steps_per_batch(self) -> int:
        """The value of :attr:`steps_field` (1 when there is none)."""
        return 1 if self.steps_field is None else int(getattr(self, self.steps_field))


class DeepInversionSynthesis(MethodConfig):
    """DeepInversion (Yin et al., CVPR 2020): images optimized directly in pixel space."""

    kind: Literal["deepinversion"] = "deepinversion"
    iterations: PosInt = 2000
    lr: PosFloat = 0.1
    bn_weight: NonNegFloat = 10.0
    oh_weight: NonNegFloat = 1.0
    adv_weight: NonNegFloat = 0.0
    """Adaptive DeepInversion's competition term; 0 is plain DeepInversion."""
    tv_l1_weight: NonNegFloat = 0.0
    tv_l2_weight: NonNegFloat = 2.5e-5
    l2_weight: NonNegFloat = 3e-8
    jitter: Annotated[int, Field(ge=0)] = 2
    flip: bool = True
    synthesize_first: bool = True
    """DeepInversion's protocol: every batch (``distill.epochs x synthesis_steps_per_epoch``)
    is synthesized before the first KD step, against the untrained student. ``false``
    interleaves them as Fast does (``synthesis_steps_per_epoch`` batches, then the epoch's KD
    steps), so that the student-dependent terms (``adv_weight``, STARS's RCA) see a student
    that learns. Same budget either way."""

    steps_field: ClassVar[str | None] = "iterations"

    def term_weights(self) -> TermWeights:
        return TermWeights(
            bn=self.bn_weight,
            oh=self.oh_weight,
            adv=self.adv_weight,
            tv_l1=self.tv_l1_weight,
            tv_l2=self.tv_l2_weight,
            l2=self.l2_weight,
        )

    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        from stars.synthesis.methods.deepinversion import DeepInversionSynthesizer

        return DeepInversionSynthesizer(
            ctx, iterations=self.iterations, lr=self.lr, jitter=self.jitter, flip=self.flip
        )

    @property
    def synthesize_upfront(self) -> bool:
        return self.synthesize_first


class DAFLSynthesis(MethodConfig):
    """DAFL (Chen et al., ICCV 2019): a generator trained on one-hot, activation and
    information-entropy losses."""

    kind: Literal["dafl"] = "dafl"
    nz: PosInt = 256
    lr_g: PosFloat = 1e-3
    g_steps: PosInt = 1
    bn_weight: NonNegFloat = 0.0
    oh_weight: NonNegFloat = 1.0
    act_weight: NonNegFloat = 0.1
    ie_weight: NonNegFloat = 5.0

    steps_field: ClassVar[str | None] = "g_steps"

    def term_weights(self) -> TermWeights:
        return TermWeights(
            bn=self.bn_weight,
            oh=self.oh_weight,
            act=self.act_weight,
            ie=self.ie_weight,
            pseudo_labels=True,
        )

    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        from stars.synthesis.methods.dafl import DAFLSynthesizer

        return DAFLSynthesizer(ctx, nz=self.nz, lr_g=self.lr_g, g_steps=self.g_steps)

    def teacher_only_warmup(self, *, epochs: int, per_epoch: int) -> int:
        # The persistent generator learns over the whole run: its images are kept after it.
        return epochs * per_epoch


class DFADSynthesis(MethodConfig):
    """DFAD (Fang et al., 2019): a generator maximizing the teacher-student L1 discrepancy."""

    kind: Literal["dfad"] = "dfad"
    nz: PosInt = 256
    lr_g: PosFloat = 1e-3
    g_steps: PosInt = 1
    bn_weight: NonNegFloat = 0.0
    oh_weight: NonNegFloat = 0.0

    steps_field: ClassVar[str | None] = "g_steps"

    def term_weights(self) -> TermWeights:
        return TermWeights(bn=self.bn_weight, oh=self.oh_weight, dfad=1.0)

    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        from stars.synthesis.methods.dfad import DFADSynthesizer

        return DFADSynthesizer(ctx, nz=self.nz, lr_g=self.lr_g, g_steps=self.g_steps)

    def teacher_only_warmup(self, *, epochs: int, per_epoch: int) -> int:
        if self.bn_weight == 0 and self.oh_weight == 0:
            raise StarsError(
                "synthesis.kind dfad learns only against a student (bn_weight and "
                "oh_weight are 0), so it cannot synthesize from the teacher alone; set "
                "--set synthesis.bn_weight=10 (or oh_weight), or export a finished run's "
                "memory bank with --from-run RUN_DIR"
            )
        return epochs * per_epoch


class WarmupMomentumMethod(MethodConfig):
    """A method with Fast's BN momentum and warm-up (Fast, NAYER): BN matching compares
    momentum-blended batch statistics, and the first ``warmup_epochs`` synthesize without the
    adversarial term and without KD (``stars synthesize`` drops their batches)."""

    bn_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    """Momentum of the batch statistics used in BN matching (Fast's ``bn_mmt``); 0 = none."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 20
    """Epochs of synthesis without the adversarial term and without KD (Fast's ``warmup``)."""

    @property
    def matching_momentum(self) -> float:
        return self.bn_momentum

    @property
    def kd_warmup_epochs(self) -> int:
        return self.warmup_epochs

    def teacher_only_warmup(self, *, epochs: int, per_epoch: int) -> int:
        del epochs
        return self.warmup_epochs * per_epoch


class FastSynthesis(WarmupMomentumMethod):
    """Fast (Fang et al., AAAI 2022): a meta-learned generator, a few steps per batch from
    the shared initialization, BN + CE + adversarial masked KL, and a memory bank."""

    kind: Literal["fast"] = "fast"
    nz: PosInt = 256
    g_steps: PosInt = 10
    lr_g: PosFloat = 4e-3
    lr_z: PosFloat = 0.01
    adv_weight: NonNegFloat = 1.1
    bn_weight: NonNegFloat = 10.0
    oh_weight: NonNegFloat = 0.4
    meta: bool = True
    """Reptile-style meta update of the shared generator (Fast's ``is_maml``)."""
    reset_l0: bool = True

    steps_field: ClassVar[str | None] = "g_steps"

    def term_weights(self) -> TermWeights:
        return TermWeights(bn=self.bn_weight, oh=self.oh_weight, adv=self.adv_weight)

    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        from stars.synthesis.methods.fast import FastSynthesizer

        return FastSynthesizer(
            ctx,
            nz=self.nz,
            lr_g=self.lr_g,
            lr_z=self.lr_z,
            g_steps=self.g_steps,
            meta=self.meta,
            reset_l0=self.reset_l0,
            warmup_epochs=self.warmup_epochs,
        )


class CMISynthesis(MethodConfig):
    """CMI (Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Transfer",
    IJCAI 2021): a generator re-initialized for every batch and optimized with its latent on
    BN + CE + adversarial terms plus a contrastive term (InfoNCE over the teacher's BN-input
    instance means of a local vs a global crop, against a bank of earlier batches' features,
    through a projection head trained alongside). Defaults: the reference code's CIFAR-10
    from-scratch script (``scripts/cmi/scratch_cmi_cifar10_wrn402_wrn161.sh``)."""

    kind: Literal["cmi"] = "cmi"
    nz: PosInt = 256
    iterations: PosInt = 200
    """Generator steps per batch, from a fresh generator and latent (CMI's ``g_steps``)."""
    lr_g: PosFloat = 1e-3
    """Adam learning rate of the generator and of the latent (betas 0.5/0.999)."""
    bn_weight: NonNegFloat = 1.0
    oh_weight: NonNegFloat = 1.0
    adv_weight: NonNegFloat = 0.5
    """The adversarial masked KL against the student (CMI's ``adv``)."""
    cr_weight: NonNegFloat = 0.8
    """lambda_cr: the contrastive term (0: CMI's inversion loss alone)."""
    cr_temperature: PosFloat = 0.1
    """tau of the contrastive InfoNCE (CMI's ``cr_T``)."""
    head_dim: PosInt = 256
    """Output size of the projection head."""
    lr_head: PosFloat | None = None
    """Adam learning rate of the projection head; None: ``lr_g`` (as CMI)."""
    feature_bank_size: PosInt = 40960
    """(local, global) feature pairs of earlier batches kept as negatives (CMI's
    ``bank_size``)."""
    n_negatives: PosInt = 4096
    """Cached pairs drawn from the feature bank per step (CMI's ``n_neg``)."""

    steps_field: ClassVar[str | None] = "iterations"

    def term_weights(self) -> TermWeights:
        return TermWeights(bn=self.bn_weight, oh=self.oh_weight, adv=self.adv_weight)

    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        from stars.synthesis.methods.cmi import CMISynthesizer

        return CMISynthesizer(
            ctx,
            nz=self.nz,
            lr_g=self.lr_g,
            iterations=self.iterations,
            cr_weight=self.cr_weight,
            cr_temperature=self.cr_temperature,
            head_dim=self.head_dim,
            feature_bank_size=self.feature_bank_size,
            n_negatives=self.n_negatives,
            lr_head=self.lr_head,
        )


class NAYERSynthesis(WarmupMomentumMethod):
    """NAYER (Tran et al., "NAYER: Noisy Layer Data Generation for Efficient and Effective
    Data-free Knowledge Distillation", CVPR 2024): class embeddings through a noisy layer
    redrawn for every batch into a generator body kept across batches, a few steps per batch
    on BN + CE + adversarial masked KL (stars/synthesis/methods/nayer.py; the class
    embeddings stand in for NAYER's CLIP text features). Defaults: the reference code's
    CIFAR-10 script (``scripts/nayer_100.sh``: g_steps 30, 40 for CIFAR-100)."""

    kind: Literal["nayer"] = "nayer"
    batch_size: PosInt = 400
    g_steps: PosInt = 30
    """Generator steps per batch, from freshly drawn noisy layers."""
    lr_g: PosFloat = 4e-3
    """Adam learning rate of the generator (betas 0.5/0.999, a fresh optimizer per batch)."""
    bn_weight: NonNegFloat = 10.0
    oh_weight: NonNegFloat = 0.5
    adv_weight: NonNegFloat = 1.33
    g_life: PosInt | None = 10
    """Re-initialize the generator's body every this many epochs, counted from the end of
    the warm-up (NAYER's ``g_life``); None: never."""
    noise_dim: PosInt = 1000
    """Width of the noisy layer (NAYER's ``le_emb_size``)."""
    embed_dim: PosInt = 512
    """Size of the class embeddings (CLIP ViT-B/32's text features)."""
    embedding: Literal["random", "learned"] = "random"
    """The text-encoder substitute: fixed N(0, 1) rows drawn from the seed, or the same rows
    trained with the generator."""
    labels: Literal["balanced", "uniform"] = "balanced"
    """``balanced``: NAYER's labels (every class ``batch_size // K`` times, the rest drawn);
    ``uniform``: the shared uniform draw (the labels ``stars synthesize`` asks for)."""

    steps_field: ClassVar[str | None] = "g_steps"

    def term_weights(self) -> TermWeights:
        return TermWeights(bn=self.bn_weight, oh=self.oh_weight, adv=self.adv_weight)

    def build(self, ctx: SynthesisContext) -> SynthesizerBase:
        from stars.synthesis.methods.nayer import NAYERSynthesizer

        return NAYERSynthesizer(
            ctx,
            lr_g=self.lr_g,
            g_steps=self.g_steps,
            warmup_epochs=self.warmup_epochs,
            g_life=self.g_life,
            noise_dim=self.noise_dim,
            embed_dim=self.embed_dim,
            embedding=self.embedding,
            labels=self.labels,
        )


# The registration: one line per method.
SynthesisConfig = Annotated[
    Annotated[DeepInversionSynthesis, Tag("deepinversion")]
    | Annotated[DAFLSynthesis, Tag("dafl")]
    | Annotated[DFADSynthesis, Tag("dfad")]
    | Annotated[CMISynthesis, Tag("cmi")]
    | Annotated[NAYERSynthesis, Tag("nayer")]
    | Annotated[FastSynthesis, Tag("fast")],
    kind_of("fast"),
]

METHODS: dict[str, type[MethodConfig]] = {
    str(member.model_fields["kind"].default): member
    for member in (get_args(tagged)[0] for tagged in get_args(get_args(SynthesisConfig)[0]))
}
"""Every registered method's config class by its ``kind``, in the union's order."""

KINDS: tuple[str, ...] = tuple(METHODS)
"""Every registered ``synthesis.kind``."""
