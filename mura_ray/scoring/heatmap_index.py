"""The columns of the heatmaps' index: one row per overlay. No Ray, no torch, so the output store can name them."""

from __future__ import annotations

import pyarrow as pa

INDEX_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("study_uri", pa.string()),
        ("heatmap", pa.string()),  # path of the PNG: under explain's --out, or under score's OUT
        ("prob_abnormal", pa.float32()),
        ("peak_x", pa.float32()),  # the map's peak, as a fraction of the model input's side
        ("peak_y", pa.float32()),
        ("layer", pa.string()),
        ("model_id", pa.string()),
        ("error", pa.string()),
    ]
)
