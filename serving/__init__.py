"""tfloop serving package."""
