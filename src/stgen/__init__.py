"""stgen: spatial gene expression generation from H&E histology.

Flow, one folder per stage (each imports only the ones before it):
``utils`` -> ``image`` (slides, patches) -> ``data`` (readers, targets, HMHVG panel) -> ``features``
(encoders, cache) -> ``nn`` (shared layers) -> ``sampling`` (samplers) -> ``training`` (Lightning loops)
-> ``backbones`` (expression foundation models) -> ``models/<name>`` (HINGE, FLAG, ridge, HiFusion,
ST-Net, BLEEP, Stem, STFlow, TRIPLEX) -> ``evaluation`` (metrics, plots) -> ``workflows`` (fit, predict,
evaluate, benchmark) -> ``cli``.

The Python API (:mod:`stgen.workflows.api`): ``stgen.read``, ``stgen.fit``, ``stgen.predict``,
``stgen.evaluate``; imported on first use, so ``import stgen`` stays light.
"""

__version__ = "0.1.0"

_API = ("read", "fit", "predict", "evaluate", "Run")


def __getattr__(name: str):
    if name in _API:
        from stgen.workflows import api

        return getattr(api, name)
    raise AttributeError(f"module 'stgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
