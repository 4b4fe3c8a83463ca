"""stars.neurons."""
