"""A small multimodal fixture: real series that statsmodels ships (sunspots, CO2, Nile flow, El Niño), synthetic
images (coloured shapes) with captions, and one record of each bad kind. Used by tests/data/test_multimodal.py
and tests/train/test_multimodal_train.py."""
from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("square", "circle")
YEAR = 1 / (365.25 * 86400)


def _image(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def real_series() -> dict[str, tuple[np.ndarray, float, str]]:
    import statsmodels.api as sm

    sun = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    co2 = sm.datasets.co2.load_pandas().data["co2"].interpolate().bfill().to_numpy()
    nile = sm.datasets.nile.load_pandas().data["volume"].to_numpy()
    elnino = sm.datasets.elnino.load_pandas().data.iloc[:, 1:].to_numpy().reshape(-1)
    return {"yearly sunspot numbers": (sun, YEAR, "sunspots"), "weekly CO2 at Mauna Loa": (co2, 52 * YEAR, "co2"),
            "yearly Nile flow": (nile, YEAR, "nile"), "monthly El Nino sea temperature": (elnino, 12 * YEAR, "elnino")}


def write_fixture(folder: str, repeats: int = 6, bad: bool = True) -> str:
    """Write images, series files and `samples.jsonl` under `folder`; returns the JSONL path."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for r in range(repeats):
        for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
            size = [(64, 64), (96, 64), (64, 128)][(i + r) % 3]
            name = f"{colour}_{shape}_{r}.png"
            _image(colour, shape, size).save(os.path.join(folder, name))
            image = {"type": "image", "path": name}
            if (i + r) % 4 == 0:  # some inline, as base64 bytes
                buf = io.BytesIO()
                _image(colour, shape, size).save(buf, format="PNG")
                image = {"type": "image", "bytes": base64.b64encode(buf.getvalue()).decode()}
            records.append({"segments": [{"type": "text", "text": "Picture:"}, image,
                                         {"type": "text", "text": f"a {colour} {shape} on a white background."}]})
        for j, (caption, (values, rate, key)) in enumerate(real_series().items()):
            if j % 3 == 0:
                series = {"type": "time_series", "values": values.tolist(), "sampling_rate": rate, "channels": [key]}
            elif j % 3 == 1:
                np.save(os.path.join(folder, f"{key}.npy"), values)
                series = {"type": "time_series", "path": f"{key}.npy", "sampling_rate": rate}
            else:
                with open(os.path.join(folder, f"{key}.csv"), "w") as f:
                    f.write(f"{key}\n" + "\n".join(str(v) for v in values))
                series = {"type": "time_series", "path": f"{key}.csv", "sampling_rate": rate}
            records.append({"segments": [{"type": "text", "text": "Series:"}, series,
                                         {"type": "text", "text": f"{caption}, {len(values)} points."}]})
    lines = [json.dumps(r) for r in records]
    if bad:
        lines += [
            "{this is not json",
            json.dumps({"segments": [{"type": "image", "path": "missing.png"}]}),
            json.dumps({"segments": [{"type": "time_series", "values": [1.0, float("nan")], "sampling_rate": 1.0}]}),
            json.dumps({"segments": [{"type": "time_series", "values": [[[1.0]]], "sampling_rate": 1.0}]}),
            json.dumps({"segments": [{"type": "text", "text": "   "}]}),
            json.dumps({"segments": [{"type": "time_series", "values": [1.0, 2.0], "sampling_rate": 0}]}),
        ]
    path = os.path.join(folder, "samples.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
