"""cloudfs: mount cloud object storage as a directory (FUSE layer, CLI, config)."""

__version__ = "0.1.0"
