"""stars: ANN-to-SNN data-free knowledge distillation with STARS (arXiv 2605.27409)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
