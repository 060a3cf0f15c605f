"""locnet: multi-scale shift-equivariant landmark detection in 3D CT, as a reproducible study."""

__version__ = "0.1.0"
