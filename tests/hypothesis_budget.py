"""Per-property example budgets that follow the Hypothesis profile (profiles: ``conftest.py``).

A property states the examples it needs in the everyday profiles (``ci``, ``dev``) with
``@examples(n)``; under ``thorough`` every property runs at least :data:`THOROUGH_EXAMPLES`.
Everything else (derandomization, database, deadline) comes from the loaded profile, which
``conftest.py`` loads before any test module is imported.
"""

from __future__ import annotations

from hypothesis import settings

THOROUGH_EXAMPLES = 1000
"""The least number of examples each property runs under the ``thorough`` profile."""


def examples(n: int) -> settings:
    """``settings(max_examples=n)``, raised to :data:`THOROUGH_EXAMPLES` under ``thorough``."""
    if settings.get_current_profile_name() == "thorough":
        n = max(n, THOROUGH_EXAMPLES)
    return settings(max_examples=n)
