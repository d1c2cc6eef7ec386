"""The training engine: a loop that owns the step count and calls small, tested features."""
