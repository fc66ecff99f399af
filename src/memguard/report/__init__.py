"""HTML reports built from results.json alone."""
