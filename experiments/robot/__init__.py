"""Policy-side helpers for closed-loop robot evaluation (observations in, environment actions out)."""
