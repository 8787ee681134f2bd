"""Tumour regions of a heatmap as GeoJSON polygons in level-0 pixels, as QuPath imports them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cancernet.wsi.slide import Plan


def tumour_regions(heatmap: np.ndarray, threshold: float, plan: Plan) -> dict:
    """A FeatureCollection: one Polygon (outline and holes, level-0 x, y; a MultiPolygon where
    cells touch only at a corner) per connected region of cells at or above threshold
    (8-connected), with its maximum and mean probability, cells and area. A cell (row, col)
    covers level-0 x in [col, col + 1) x stride x scale (y alike)."""
    import contourpy

    above = np.nan_to_num(heatmap, nan=0.0) >= threshold
    labels, count = ndimage.label(above, structure=np.ones((3, 3)))
    side = plan.stride * plan.scale  # level-0 pixels per cell
    cell_mm2 = (plan.cell_um / 1000) ** 2
    features = []
    for region in range(1, count + 1):
        inside = labels == region
        # the region's square cells, outlined: filled contours of the 0/1 mask upsampled 2x with
        # nearest neighbours (cell edges then fall on the 0.5 level exactly, corners stay square)
        fine = np.pad(np.kron(inside, np.ones((2, 2))), 1).astype(float)
        ys, xs = (np.arange(n) - 1 for n in fine.shape)
        outlines = contourpy.contour_generator(
            xs, ys, fine, fill_type=contourpy.FillType.OuterOffset, corner_mask=False
        ).filled(0.5, 1.5)
        polygons = [
            [np.round((points[start:stop] + 0.5) / 2 * side, 1).tolist() for start, stop in zip(offsets, offsets[1:])]
            for points, offsets in zip(*outlines)  # fine index -> cell edge -> level-0 px; outline, then holes
        ]
        probs = heatmap[inside]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": polygons[0]}
                if len(polygons) == 1
                else {"type": "MultiPolygon", "coordinates": polygons},  # cells touching at a corner
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "probability_max": float(probs.max()),
                    "probability_mean": float(probs.mean()),
                    "cells": int(inside.sum()),
                    "area_mm2": float(inside.sum() * cell_mm2),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
