"""3D Slicer markups files (``.mrk.json``) for predicted landmarks.

The file is a markups point list ("Fiducial") following Slicer's markups JSON schema
v1.0.3. Positions are written in **LPS** millimetres (``"coordinateSystem": "LPS"``), the
convention Slicer itself uses on disk; Slicer converts them to its internal RAS when loading.
Each control point is labelled with the landmark name; its description carries the
uncertainty and quality flag when there are any.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .geometry import ras_lps
from .fileio import write_json_atomic

__all__ = ["MARKUPS_SCHEMA", "markups_document", "read_markups_ras", "write_markups"]

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/"
                  "Markups/Resources/Schema/markups-schema-v1.0.3.json#")
# Slicer's default orientation of a control point stored in LPS (identity in RAS)
_LPS_ORIENTATION = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]


def markups_document(labels: Sequence[str], positions_ras: Any,
                     descriptions: Sequence[str] | None = None,
                     color: Sequence[float] = (1.0, 0.5, 0.0),
                     ) -> dict:
    """A markups point-list document for ``labels`` at ``positions_ras`` (K, 3) world RAS mm.

    Points with a non-finite coordinate are written with ``positionStatus: "missing"``.
    """
    pos = ras_lps(np.asarray(positions_ras, dtype=np.float64).reshape(-1, 3))
    if len(labels) != len(pos):
        raise ValueError(f"{len(labels)} labels for {len(pos)} positions")
    descriptions = list(descriptions) if descriptions is not None else [""] * len(labels)
    points = []
    for i, (label, p, desc) in enumerate(zip(labels, pos, descriptions), start=1):
        defined = bool(np.all(np.isfinite(p)))
        points.append({
            "id": str(i),
            "label": str(label),
            "description": str(desc),
            "associatedNodeID": "",
            "position": [float(v) for v in p] if defined else [0.0, 0.0, 0.0],
            "orientation": list(_LPS_ORIENTATION),
            "selected": True,
            "locked": True,
            "visibility": True,
            "positionStatus": "defined" if defined else "missing",
        })
    markup: dict[str, Any] = {
        "type": "Fiducial",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": True,
        "fixedNumberOfControlPoints": True,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(points),
        "controlPoints": points,
        "measurements": [],
        "display": {
            "visibility": True,
            "opacity": 1.0,
            "color": [float(c) for c in color],
            "selectedColor": [float(c) for c in color],
            "propertiesLabelVisibility": True,
            "pointLabelsVisibility": True,
            "textScale": 3.0,
            "glyphType": "Sphere3D",
            "glyphScale": 3.0,
            "glyphSize": 5.0,
            "useGlyphScale": True,
        },
    }
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}


def write_markups(path: Any, labels: Sequence[str], positions_ras: Any,
                  descriptions: Sequence[str] | None = None) -> None:
    """Write :func:`markups_document` to ``path`` (``*.mrk.json``) atomically."""
    write_json_atomic(markups_document(labels, positions_ras, descriptions), path)


def read_markups_ras(doc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{label: position (3,) world RAS mm}`` of the first point list of a markups document
    (LPS or RAS on disk)."""
    markup = doc["markups"][0]
    out = {}
    for cp in markup["controlPoints"]:
        p = np.asarray(cp["position"], dtype=np.float64)
        out[cp["label"]] = ras_lps(p) if markup.get("coordinateSystem", "LPS") == "LPS" else p
    return out
