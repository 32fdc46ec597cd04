"""tfloop pipeline package."""
