"""Image-text metrics."""
