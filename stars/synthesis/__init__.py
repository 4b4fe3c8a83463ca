"""stars.synthesis."""
