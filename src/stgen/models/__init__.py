"""Layer 8: one package per model, each a :class:`~stgen.models.base.SpotModel` (see :mod:`stgen.models.registry`)."""
