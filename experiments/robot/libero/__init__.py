"""LIBERO (and synthetic) closed-loop evaluation: runner, simulator workers, results."""
