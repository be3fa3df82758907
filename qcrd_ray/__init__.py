"""qcrd-ray: Quality-guided Contrastive Rationale Distillation (arXiv 2405.13014) on Ray."""

__version__ = "0.1.0"
