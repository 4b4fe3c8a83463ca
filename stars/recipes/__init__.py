"""The recipes: what the CLI commands run, each over the library's components.

- :mod:`stars.recipes.distill`: ``stars distill`` (:class:`~stars.recipes.distill.DistillRecipe`:
  setup, synthesis, KD, evaluate, checkpoint, finalize);
- :mod:`stars.recipes.synthesize`: ``stars synthesize`` (a synthetic dataset and its report);
- :mod:`stars.recipes.evaluate`: ``stars evaluate``;
- :mod:`stars.recipes.ablate`: ``stars ablate`` (variants x seeds of a distillation);
- :mod:`stars.recipes.train_teacher`: ``stars train-teacher``.

The CLI (:mod:`stars.cli`) parses arguments, loads the config and calls one recipe; the
library below (config, models, neurons, synthesis, distill) knows nothing of them.
"""
