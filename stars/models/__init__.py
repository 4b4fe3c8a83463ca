"""stars.models."""
