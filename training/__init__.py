"""tfloop training package."""
