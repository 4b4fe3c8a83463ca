"""``stars synthesize CONFIG --num N --out DIR``: synthetic images from the teacher alone."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.console import Console

from stars.config import RunConfig
from stars.models.factory import build_teacher
from stars.pipeline import data_geometry, save_grid, synthesizer_for
from stars.runtime import progress_bar, resolve_device, seed_everything

__all__ = ["synthesize_images"]


def synthesize_images(cfg: RunConfig, *, num: int, out: Path, console: Console) -> Path:
    """Run the configured synthesizer (no student: adversarial terms are off) until ``num``
    images exist; write ``out/images/<class>/<i>.png`` and ``out/grid.png``."""
    device = resolve_device(cfg.device)
    geo = data_geometry(cfg)
    seed_everything(cfg.seed)
    teacher = build_teacher(
        cfg.teacher, num_classes=geo.num_classes, image_size=geo.image_size, dataset=geo.name
    ).to(device)
    synth = synthesizer_for(cfg, teacher, geo, device)
    synth.ctx.bank.capacity = max(synth.ctx.bank.capacity, num)
    batches = -(-num // cfg.synthesis.batch_size)
    with progress_bar(console) as bar:
        task = bar.add_task("synthesize", total=batches, info="")
        for _ in range(batches):
            step = synth.synthesize(None)
            bar.update(task, advance=1, info=f"bn {step.losses.get('bn', 0.0):.2f}")
    bank = synth.ctx.bank
    pixels, labels = bank.pixels()[:num], bank.labels()[:num]
    for i, (img, y) in enumerate(zip(pixels, labels, strict=True)):
        folder = out / "images" / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"{i:06d}.png")
    save_grid(pixels, labels, out / "grid.png")
    console.print(f"wrote {num} images to {out / 'images'} and a grid to {out / 'grid.png'}")
    return out
