"""The model, its folder format, and training."""
