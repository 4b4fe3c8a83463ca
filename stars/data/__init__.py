"""stars.data."""
