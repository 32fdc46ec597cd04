"""tfloop export package."""
