"""tfloop k8s package."""
