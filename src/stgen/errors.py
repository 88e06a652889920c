"""Exceptions raised by stgen at its input boundaries.

Every error that a user can cause (a bad file, an unknown section, a gene
missing from a panel) is raised as :class:`InputError`, whose message names the
offending file or value and the problem, so the CLI can print one clear line
instead of a traceback.
"""

from __future__ import annotations


class StgenError(Exception):
    """Base class of all errors raised deliberately by stgen."""


class InputError(StgenError, ValueError):
    """A user-supplied input (file, section name, option value) is invalid.

    The message always names the input (path or value) and what is wrong.
    """


class LowResolutionImageWarning(UserWarning):
    """A section's spot patches come from a downsampled image (e.g. Visium's ``tissue_hires_image.png``)
    because no full-resolution image was given: they cover the right tissue but hold less detail."""
