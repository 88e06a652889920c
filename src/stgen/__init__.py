"""stgen: spatial gene expression generation from H&E histology.

Flow: data (Her2ST reader, targets, HMHVG panel) -> patches -> features
(EfficientNet-Lite0) -> model (HINGE on a frozen expression backbone, or the
ridge baseline) -> samples -> metrics and plots.
"""

__version__ = "0.1.0"
