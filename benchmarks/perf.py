"""Performance benchmark: ratios measured within one run (this machine is shared and noisy).

    python benchmarks/perf.py [--batch 64] [--repeats 7] [--out benchmarks/results/perf.json]

1. Synthesis step with STARS / the same step without (Fast, one generator step, teacher
   ResNet-20, student spiking_tiny at T = 4). The baseline does not measure the inactive
   STARS terms (``measure_inactive = False``), so the ratio is the honest cost of STARS.
   Goal <= 1.10.
2. Spiking student training step / (T x the same architecture's ANN step with ReLU in place
   of the neurons, T = 1): the cost of spiking beyond the T-fold convolution work. Goal <= 1.3.
3. Peak memory of the spiking training step at T = 4 vs the ANN step, two ways, each in a
   fresh process: the peak of live tensor bytes over the step (torch.profiler memory
   events: what the step needs, independent of the allocator) and the growth of the peak
   RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; Linux; includes what the
   allocator keeps). Goal: act above 4.5x.
4. Achieved throughput of the student step as a fraction of the measured fp32 matmul peak.
5. ``--profile``: torch.profiler tables (top operators by self CPU time) of the student KD
   step and of one synthesis step, written next to the JSON (``profile.txt``).

Timings alternate the two sides of each ratio and report medians, so that load from other
processes affects both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stars.config import (
    FastSynthesis,
    RCAConfig,
    StarsConfig,
    StudentConfig,
    TARConfig,
)
from stars.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from stars.distill.spikes import measure_spikes
from stars.models.factory import build_teacher, bundled_teacher_path
from stars.models.students import build_student
from stars.models.teachers import ANNTeacher, build_teacher_arch
from stars.neurons.spikingjelly_neurons import MultiStepNeuron
from stars.runtime import tune_malloc
from stars.synthesis.factory import build_synthesizer


def _teacher() -> ANNTeacher:
    from stars.config import TeacherConfig

    if bundled_teacher_path().is_file():
        return build_teacher(TeacherConfig(arch="resnet20"), num_classes=10)
    torch.manual_seed(0)
    model = build_teacher_arch("resnet20", num_classes=10)
    return model.eval().requires_grad_(False)


def _median_pair(
    a: Callable[[], object], b: Callable[[], object], repeats: int
) -> tuple[float, float]:
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


STARS_ON = StarsConfig(rca=RCAConfig(weight=0.1), tar=TARConfig(weight=10.0))


def _fast_synthesizer(batch: int, stars: StarsConfig) -> Any:
    """One-generator-step Fast synthesis, bundled teacher, CIFAR-10 geometry, CPU."""
    return build_synthesizer(
        FastSynthesis(batch_size=batch, g_steps=1, warmup_epochs=0, memory_size=4 * batch),
        stars,
        teacher=_teacher(),
        num_classes=10,
        image_size=32,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        device=torch.device("cpu"),
        seed=0,
        student_vth=1.0,
    )


def synthesis_ratio(batch: int, repeats: int) -> dict[str, float]:
    student = build_student(StudentConfig(arch="spiking_tiny", T=4), num_classes=10)
    base = _fast_synthesizer(batch, StarsConfig())
    base.ctx.objective.measure_inactive = False
    on = _fast_synthesizer(batch, STARS_ON)
    t_base, t_stars = _median_pair(
        lambda: base.synthesize(student), lambda: on.synthesize(student), repeats
    )
    return {"synthesis_base_s": t_base, "synthesis_stars_s": t_stars, "ratio": t_stars / t_base}


def _ann_twin(student: nn.Module) -> nn.Module:
    """The same network with ReLU in place of every spiking neuron."""
    for name, module in list(student.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MultiStepNeuron):
                setattr(module, child_name, nn.ReLU())
        del name
    return student


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    out = model(x)
    loss = out.float().mean() if out.dim() == 2 else out.float().mean(0).mean()
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    opt.step()


def spiking_ratio(batch: int, repeats: int, T: int = 4) -> dict[str, float]:
    torch.manual_seed(0)
    snn = build_student(StudentConfig(arch="spiking_tiny", T=T), num_classes=10)
    ann = _ann_twin(build_student(StudentConfig(arch="spiking_tiny", T=1), num_classes=10))
    x = torch.randn(batch, 3, 32, 32)
    o1 = torch.optim.SGD(snn.parameters(), lr=1e-3, momentum=0.9)
    o2 = torch.optim.SGD(ann.parameters(), lr=1e-3, momentum=0.9)
    t_snn, t_ann = _median_pair(
        lambda: _train_step(snn, o1, x), lambda: _train_step(ann, o2, x), repeats
    )
    # dense MACs of one forward at T steps (all layers counted as dense work)
    stats = measure_spikes(snn, x[:8], torch.device("cpu"))
    dense_macs = _dense_macs(snn, x[:8]) / 8
    flops_step = 3 * 2 * dense_macs * batch  # forward + backward ~ 3 x forward
    return {
        "snn_step_s": t_snn,
        "ann_step_s": t_ann,
        "T": T,
        "ratio": t_snn / (T * t_ann),
        "dense_gflop_per_step": flops_step / 1e9,
        "achieved_gflops": flops_step / t_snn / 1e9,
        "mean_firing_rate": stats.mean_firing_rate,
    }


def _dense_macs(model: nn.Module, x: torch.Tensor) -> float:
    total = 0.0
    hooks = []

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += out.numel() * k
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


_MEM_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.perf import _ann_twin, _train_step
from stars.config import StudentConfig
from stars.models.students import build_student
T = int(sys.argv[1]); batch = int(sys.argv[2])
torch.manual_seed(0)
m = build_student(StudentConfig(arch="spiking_tiny", T=max(T, 1)), num_classes=10)
if T == 0:
    m = _ann_twin(m)
x = torch.randn(batch, 3, 32, 32)
opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM)
before = status("VmRSS")
_train_step(m, opt, x)  # the first step of a fresh process: RSS growth
rss = (status("VmHWM") - before) / 1024
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    _train_step(m, opt, x)  # a later step: the peak of live tensor bytes
cur = peak = 0
for at, nbytes in sorted(
    (e.start_ns(), e.nbytes())
    for e in prof.profiler.kineto_results.events()
    if e.name() == "[memory]"
):
    cur += nbytes
    peak = max(peak, cur)
print(peak / 2**20, rss)
"""


def peak_memory(batch: int) -> dict[str, float]:
    root = str(Path(__file__).resolve().parents[1])
    out: dict[str, float] = {}
    for label, t in (("snn_T4", 4), ("ann", 0)):
        res = subprocess.run(
            [sys.executable, "-c", _MEM_CHILD.format(root=root), str(t), str(batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        live, rss = res.stdout.strip().splitlines()[-1].split()
        out[f"{label}_live_mib"] = float(live)
        out[f"{label}_rss_mib"] = float(rss)
    out["ratio_live"] = out["snn_T4_live_mib"] / max(out["ann_live_mib"], 1e-9)
    out["ratio_rss"] = out["snn_T4_rss_mib"] / max(out["ann_rss_mib"], 1e-9)
    return out


def profile_tables(batch: int) -> str:
    """torch.profiler tables of the student KD step and one Fast + STARS synthesis step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    snn = build_student(StudentConfig(arch="spiking_tiny", T=4), num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    opt = torch.optim.SGD(snn.parameters(), lr=1e-3, momentum=0.9)
    _train_step(snn, opt, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            _train_step(snn, opt, x)
    kd = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    synth = _fast_synthesizer(batch, STARS_ON)
    synth.synthesize(snn)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        synth.synthesize(snn)
    syn = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return (
        f"# student KD step (spiking_tiny, T=4, batch {batch}), 3 steps\n{kd}\n\n"
        f"# Fast + STARS synthesis step (batch {batch}, g_steps 1)\n{syn}\n"
    )


EPOCH_LEVERS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["precision=bf16"],
    "channels_last": ["channels_last=true"],
    "bf16+channels_last": ["precision=bf16", "channels_last=true"],
    "compile": ["compile=true"],
    "bf16+compile": ["precision=bf16", "compile=true"],
    "bf16+compile+cl-gen": ["precision=bf16", "compile=true", "channels_last=generator"],
    "fp32-no-measure": ["precision=fp32"],
    "bf16+compile+cl-gen-eager-stats": [
        "precision=bf16",
        "compile=true",
        "channels_last=generator",
    ],
    "bf16+compile+cl-gen-nchw-pool": [
        "precision=bf16",
        "compile=true",
        "channels_last=generator",
    ],
    "spike-kd": ["stars.spike_tar.student_weight=1"],
    "spike": ["stars.spike_tar.student_weight=1", "stars.spike_tar.weight=2"],
    "bf16+spike-kd": ["precision=bf16", "stars.spike_tar.student_weight=1"],
    "sresnet20": ["student.arch=spiking_resnet20"],
    "sresnet20+spike-kd": ["student.arch=spiking_resnet20", "stars.spike_tar.student_weight=1"],
    "sresnet20+bf16+compile": [
        "student.arch=spiking_resnet20",
        "precision=bf16",
        "compile=true",
        "channels_last=generator",
    ],
}
"""Levers of the time-to-accuracy issue, as overrides of the paper_table Fast config; the
``spike`` entries are the cost of spike-aware TAR (in KD; in KD and synthesis), the settings
of the session-9 val runs; ``cl-gen`` runs the generator in channels-last memory format
(``channels_last: generator``); ``sresnet20`` is the deeper student (spiking ResNet-20 in place of
``spiking_tiny``), to size a family for it. Levers in :data:`EPOCH_PATCHES` also change the
built components: ``-eager-stats`` takes the synthesis objective's BN statistics eagerly as
before session 14 (to measure ``compiled_batch_stats`` alone); ``-no-measure`` does not
measure the zero-weight terms at all (their cost: before session 14 they were measured at
every generator step, now at a call's last step only); ``-nchw-pool`` puts ``nn.MaxPool2d``
back in the student in place of :class:`stars.models.layers.MaxPool2d` (to measure it
alone)."""


def _eager_stats(comp: Any) -> None:
    comp.synthesizer.objective.compile = False


def _no_measure(comp: Any) -> None:
    comp.synthesizer.objective.measure_inactive = False


def _nchw_pool(comp: Any) -> None:
    from torch import nn

    from stars.models.layers import MaxPool2d

    for module in list(comp.student.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MaxPool2d):
                twin = nn.MaxPool2d(
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    ceil_mode=child.ceil_mode,
                )
                setattr(module, name, twin)


EPOCH_PATCHES: dict[str, Callable[[Any], None]] = {
    "bf16+compile+cl-gen-eager-stats": _eager_stats,
    "fp32-no-measure": _no_measure,
    "bf16+compile+cl-gen-nchw-pool": _nchw_pool,
}


def epoch_ratios(
    levers: list[str], repeats: int, *, kd_steps: int | None = None, config: Path | None = None
) -> dict[str, Any]:
    """Wall time of one distillation epoch per lever, and its ratio to fp32, in one run.

    An epoch is what ``benchmarks/paper_table/fast.yaml`` runs per epoch after the warm-up:
    one synthesized batch (its ``g_steps`` generator steps, adversarial term on) and
    ``kd_steps_per_epoch`` KD steps, on the same components ``stars distill`` builds. The
    levers' epochs alternate (one each, ``repeats`` times, after one warm-up epoch each, which
    also absorbs ``torch.compile``'s compilation) and medians are reported, so load from other
    processes affects all alike.
    """
    import yaml

    from stars.config import RunConfig, apply_overrides
    from stars.pipeline import build_components

    tree = yaml.safe_load((config or Path("benchmarks/paper_table/fast.yaml")).read_text())
    unknown = [name for name in levers if name not in EPOCH_LEVERS]
    if unknown:
        raise SystemExit(f"--epoch-levers: unknown {unknown}; allowed: {list(EPOCH_LEVERS)}")
    comps = {}
    for name in levers:
        cfg_tree = apply_overrides(
            tree, [*EPOCH_LEVERS[name], "synthesis.warmup_epochs=0", "evaluation.enabled=false"]
        )
        comps[name] = build_components(RunConfig.model_validate(cfg_tree))
        comps[name].synthesizer.set_epoch(1)
        if name in EPOCH_PATCHES:
            EPOCH_PATCHES[name](comps[name])
    first = next(iter(comps.values()))
    steps = kd_steps if kd_steps is not None else first.cfg.distill.kd_steps_per_epoch

    def epoch(name: str) -> tuple[float, float]:
        c = comps[name]
        t0 = time.perf_counter()
        c.synthesizer.synthesize(c.student)
        t1 = time.perf_counter()
        for _ in range(steps):
            c.distiller.step(c.synthesizer.sample(c.cfg.distill.batch_size))
        return t1 - t0, time.perf_counter() - t1

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in levers}
    for name in levers:
        epoch(name)  # warm-up (and compilation)
    for _ in range(repeats):
        for name in levers:
            times[name].append(epoch(name))
    out: dict[str, Any] = {"kd_steps": steps, "repeats": repeats}
    ref = None
    for name in levers:
        synth = statistics.median(t[0] for t in times[name])
        kd = statistics.median(t[1] for t in times[name])
        total = statistics.median(t[0] + t[1] for t in times[name])
        ref = total if ref is None else ref
        out[name] = {
            "epoch_s": total,
            "synthesis_s": synth,
            "kd_s": kd,
            "ratio_to_first": total / ref,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/perf.json"))
    p.add_argument("--profile", action="store_true", help="also write profile.txt")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc as it is (the stars CLI tunes it: stars.runtime.tune_malloc)",
    )
    p.add_argument(
        "--epoch-levers",
        type=str,
        default=None,
        help="only the per-epoch time of these levers (comma list, the first is the reference; "
        f"allowed: {','.join(EPOCH_LEVERS)}), written to --out",
    )
    p.add_argument("--kd-steps", type=int, default=None, help="KD steps per measured epoch")
    args = p.parse_args()
    if args.epoch_levers:
        tune_malloc()
        res = {
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "epoch": epoch_ratios(
                args.epoch_levers.split(","), args.repeats, kd_steps=args.kd_steps
            ),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))
        return
    malloc_tuned = False if args.default_malloc else tune_malloc()
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned,
        "batch": args.batch,
    }
    result["synthesis"] = synthesis_ratio(args.batch, args.repeats)
    result["spiking"] = spiking_ratio(args.batch, args.repeats)
    result["memory"] = peak_memory(args.batch)
    peak = matmul_peak()
    result["matmul_peak_gflops"] = peak
    result["spiking"]["fraction_of_matmul_peak"] = result["spiking"]["achieved_gflops"] / peak
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        (args.out.parent / "profile.txt").write_text(profile_tables(args.batch))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
