from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stgen.errors import InputError
from stgen.evaluation.plots import plot_corr_heatmaps, plot_metric_bars, plot_spatial_maps

PNG = b"\x89PNG\r\n\x1a\n"


def _data(n=50, g=6):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(n, 2))
    t = rng.gamma(2.0, size=(n, g))
    preds = {"ridge": t + rng.normal(size=t.shape), "hinge": t * 0.5}
    names = [f"G{i}" for i in range(g)]
    return xy, t, preds, names


def _is_png(p):
    b = p.read_bytes()
    return len(b) > 100 and b[:8] == PNG


def test_spatial_maps(tmp_path):
    xy, t, preds, names = _data()
    out = tmp_path / "sub" / "maps.png"
    plot_spatial_maps(xy, t, preds, ["G0", "NOPE", "G3"], names, out, title="sec A")
    assert _is_png(out)
    with pytest.raises(InputError, match="none of the requested"):
        plot_spatial_maps(xy, t, preds, ["X", "Y"], names, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(InputError):
        plot_spatial_maps(xy[:10], t, preds, ["G0"], names, tmp_path / "bad.png")


def test_corr_heatmaps(tmp_path):
    xy, t, preds, names = _data()
    t[:, 2] = 1.0  # constant gene: displayed as 0, must not crash
    out = tmp_path / "corr.png"
    plot_corr_heatmaps(t, preds, names, out, max_genes=4)
    assert _is_png(out)
    with pytest.raises(InputError):
        plot_corr_heatmaps(t, preds, names[:3], tmp_path / "bad.png")


def test_metric_bars(tmp_path):
    df = pd.DataFrame(
        {"section": ["A1", "A1", "B1", "B1"], "model": ["ridge", "hinge"] * 2, "pcc50": [0.3, 0.5, 0.2, 0.4]}
    )
    out = tmp_path / "bars.png"
    plot_metric_bars(df, "pcc50", out)
    assert _is_png(out)
    with pytest.raises(InputError, match="mse"):
        plot_metric_bars(df, "mse", tmp_path / "bad.png")


def test_uncertainty_maps_draws_and_names_bad_input(tmp_path):

    from stgen.evaluation.plots import plot_uncertainty_maps

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(40, 2))
    t = rng.uniform(0, 4, size=(40, 3))
    sd = rng.uniform(0.1, 1, size=(40, 3))
    plot_uncertainty_maps(xy, t, t + 0.1, sd, ["g0", "g2", "nope"], ["g0", "g1", "g2"], tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000
    with pytest.raises(InputError, match="sd"):
        plot_uncertainty_maps(xy, t, t, sd[:-1], ["g0"], ["g0", "g1", "g2"], tmp_path / "v.png")
    with pytest.raises(InputError, match="none of the requested genes"):
        plot_uncertainty_maps(xy, t, t, sd, ["x"], ["g0", "g1", "g2"], tmp_path / "w.png")
