"""External (foundation-model) expression backbones for HINGE: ``cellfm:PATH`` and ``scgpt:DIR``.

A backbone *spec* names where HINGE's frozen expression model comes from:

* ``default`` - the embedded small CellFM-architecture backbone, pre-trained by
  ``stgen pretrain`` (:func:`stgen.backbones.pretrain.get_backbone`);
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
from typing import Sequence
import torch
import torch.nn as nn
from stgen.errors import InputError
from stgen.utils.io import sha256_file


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
        from stgen.backbones.cellfm_convert import load_cellfm

        bb = load_cellfm(path)
    elif kind == "scgpt":
        from stgen.backbones.scgpt_load import load_scgpt

        bb = load_scgpt(path)
    else:
        raise InputError(f"not an external backbone kind: {kind!r}")
    meta = {"kind": kind, "path": str(path.resolve()), "weights": str(wf.resolve()), "sha256": digest,
            "config": bb.config.to_dict(), "n_genes": len(bb.genes)}
    return bb.eval(), meta


def genes_in_vocabulary(backbone: nn.Module, genes: Sequence[str]) -> torch.Tensor:
    """(G,) bool: which of ``genes`` the backbone's ``gene_index`` knows (its vocabulary, with its aliases)."""
    known = []
    for g in genes:
        try:
            backbone.gene_index([g])
            known.append(True)
        except InputError:
            known.append(False)
    return torch.tensor(known, dtype=torch.bool)


@torch.no_grad()
def contextual_gene_states(backbone: nn.Module, genes: Sequence[str], values: torch.Tensor,
                           batch_size: int = 64) -> torch.Tensor:
    """Per-spot contextual gene states: the backbone's last-layer gene tokens when it reads a spot's expression.

    FLAG's GFM alignment targets (App. F.2.2, scGPT value-binned contextualisation, applied to any backbone here):
    every gene of ``genes`` is visible with its value, the backbone runs to its last block and the gene tokens are
    kept, special tokens (CellFM's and scGPT's cls) dropped.

    Parameters
    ----------
    genes : G gene symbols, all in the backbone vocabulary (:func:`genes_in_vocabulary`; InputError otherwise).
    values : (N, G) expression in the backbone's units (log2(count+1), as HINGE feeds it).
    batch_size : spots per forward pass (memory).

    Returns (N, G, E) float32 on the CPU, E the backbone width. The backbone is not changed (eval, no gradients).
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.ndim != 2 or values.shape[1] != len(genes):
        raise InputError(f"expression for contextual gene states must be (N, {len(genes)}), got {tuple(values.shape)}")
    idx = backbone.gene_index(list(genes))
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters())
        out = []
        for s in range(0, len(values), batch_size):
            v = values[s : s + batch_size].to(param.device, param.dtype)
            h = backbone.encode(v, idx.to(param.device), torch.ones_like(v, dtype=torch.bool))
            out.append(h[:, h.shape[1] - len(genes):].float().cpu())  # gene tokens are last (cls first)
    finally:
        backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(genes), backbone.config.dim)


def gene_token_embeddings(backbone: nn.Module, genes: Sequence[str]) -> torch.Tensor:
    """The backbone's gene-token embedding rows of ``genes``: (G, E) float32, detached copy.

    These are FLAG's frozen per-gene GFM embeddings (Sec. 3.5; the static token
    table, not per-spot contextual states). The table is ``gene_emb`` of the
    embedded :class:`~stgen.backbones.embedded.ExpressionBackbone` (an
    ``nn.Embedding``) and of :class:`~stgen.backbones.cellfm.CellFMBackbone` (a
    parameter whose row ``i + 1`` is gene ``i``), and the raw
    ``encoder.embedding`` rows of :class:`~stgen.backbones.scgpt.ScGPTBackbone`
    (before its LayerNorm); rows are found through the backbone's
    ``gene_index``, which raises InputError naming genes missing from its
    vocabulary. InputError for any other backbone type.
    """
    from stgen.backbones.embedded import ExpressionBackbone
    from stgen.backbones.cellfm import CellFMBackbone
    from stgen.backbones.scgpt import ScGPTBackbone

    if isinstance(backbone, ExpressionBackbone):
        table = backbone.gene_emb.weight
    elif isinstance(backbone, CellFMBackbone):
        table = backbone.gene_emb
    elif isinstance(backbone, ScGPTBackbone):
        table = backbone.encoder.embedding.weight
    else:
        raise InputError(f"no gene-token embedding table known for a backbone of type {type(backbone).__name__}")
    idx = backbone.gene_index(list(genes)).to(table.device)
    return table.detach()[idx].float().cpu().clone()
