"""External (foundation-model) expression backbones for HINGE: ``cellfm:PATH`` and ``scgpt:DIR``.

A backbone *spec* names where HINGE's frozen expression model comes from:

* ``default`` - the embedded small CellFM-architecture backbone, pre-trained by
  ``stgen pretrain`` (:func:`stgen.pipeline.get_backbone`);
* ``cellfm:PATH`` - a CellFM checkpoint converted by ``stgen convert cellfm``
  (``PATH`` = the ``.safetensors`` file, its ``.json`` sidecar beside it);
* ``scgpt:DIR`` - a released scGPT model directory (``best_model.pt``,
  ``args.json``, ``vocab.json``).

A run trained on an external backbone does not copy the (up to 3 GB) backbone
into RUN_DIR: ``run.json`` records the spec, the weight file and its SHA-256,
and :func:`load_external_backbone` refuses a file whose content changed.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..errors import InputError
from ..io import sha256_file

KINDS = ("default", "cellfm", "scgpt")


def parse_backbone_spec(spec: str) -> tuple[str, Path | None]:
    """``"default"`` -> ``("default", None)``; ``"cellfm:/x.safetensors"`` -> ``("cellfm", Path)``.

    Raises InputError for an unknown kind, a missing path, or a path that does not exist.
    """
    kind, sep, path = (spec or "").partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise InputError(f"unknown backbone {spec!r}: use default, cellfm:PATH.safetensors or scgpt:MODEL_DIR")
    if kind == "default":
        if path:
            raise InputError(f"backbone {spec!r}: the default backbone takes no path")
        return kind, None
    if not path:
        raise InputError(f"backbone {spec!r}: give a path, e.g. {kind}:/models/{'CellFM_800M.safetensors' if kind == 'cellfm' else 'scGPT_human'}")
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"backbone {spec!r}: {p} does not exist")
    return kind, p


def weight_file(kind: str, path: Path) -> Path:
    """The file whose bytes define the backbone's weights (hashed into run.json)."""
    if kind == "cellfm":
        return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    return path / "best_model.pt"


def load_external_backbone(kind: str, path: Path, expect_sha256: str | None = None) -> tuple[nn.Module, dict]:
    """Load a ``cellfm``/``scgpt`` backbone (eval mode) and describe it for run.json.

    Returns ``(backbone, meta)`` with ``meta = {kind, path, weights, sha256, config, n_genes}``.
    With ``expect_sha256`` the weight file must hash to it (InputError otherwise).
    """
    wf = weight_file(kind, path)
    if not wf.is_file():
        raise InputError(f"{kind} backbone: weight file {wf} not found")
    digest = sha256_file(wf)
    if expect_sha256 is not None and digest != expect_sha256:
        raise InputError(f"{wf} changed since the run was trained (SHA-256 {digest[:12]}... != {expect_sha256[:12]}...)")
    if kind == "cellfm":
        from .cellfm import load_cellfm

        bb = load_cellfm(path)
    elif kind == "scgpt":
        from .scgpt import load_scgpt

        bb = load_scgpt(path)
    else:
        raise InputError(f"not an external backbone kind: {kind!r}")
    meta = {"kind": kind, "path": str(path.resolve()), "weights": str(wf.resolve()), "sha256": digest,
            "config": bb.config.to_dict(), "n_genes": len(bb.genes)}
    return bb.eval(), meta
