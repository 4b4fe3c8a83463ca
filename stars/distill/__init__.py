"""stars.distill."""
