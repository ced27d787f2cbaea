"""A small multimodal data set of real images and real measured series, made from files that ship inside
matplotlib and statsmodels, so that `scimoe-train model=tiny_mm` trains on images and series with no download.

Run: `python -m scimoe.data.demo FOLDER` writes FOLDER/demo.jsonl and its media; training writes the set into
its run folder by itself (`data=demo_mm`, the default data of `model=tiny_mm`). Tested by
`python -m pytest tests/data/test_demo.py`.

The images are matplotlib's sample photographs, an MRI slice and two elevation maps, each whole and cropped,
scaled to at most 96 pixels a side (a few tokens each at the tiny preset). The series are measurements:
sunspot counts, Mauna Loa CO2, the Nile's flow, El Niño sea temperatures, US macro-economic aggregates
(statsmodels), four EEG channels and a share price (matplotlib), cut into windows, with their true sampling
rates. Each record's text describes its item and states facts computed from it (extremes, means, trends), so
there is something to learn from the pairing. The set is the same on every machine and every call.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile

import numpy as np

DAY = 86400.0
YEAR = 365.25 * DAY
MAX_SIDE = 96


def _sample(name: str) -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "sample_data", name)


def _images() -> list[tuple[str, np.ndarray]]:
    """(description, uint8 RGB array) of each source image."""
    from PIL import Image

    def rgb(name: str) -> np.ndarray:
        with Image.open(_sample(name)) as im:
            return np.asarray(im.convert("RGB"))

    def gray(values: np.ndarray) -> np.ndarray:
        v = values.astype(np.float64)
        v = (v - v.min()) / max(v.max() - v.min(), 1e-12) * 255
        return np.repeat(v.astype(np.uint8)[..., None], 3, axis=2)

    with gzip.open(_sample("s1045.ima.gz")) as f:
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    return [
        ("a photograph of the computer scientist Grace Hopper in uniform", rgb("grace_hopper.jpg")),
        ("a photograph of a blue present box", rgb("Minduka_Present_Blue_Pack.png")),
        ("the matplotlib logo", rgb("logo2.png")),
        ("a magnetic resonance image, one slice of a human head", gray(mri)),
        ("an elevation map of the Jacksboro fault, brighter is higher", gray(np.load(_sample("jacksboro_fault_dem.npz"))["elevation"])),
        ("a topography and bathymetry map, brighter is higher", gray(np.load(_sample("topobathy.npz"))["topo"])),
    ]


def _series() -> list[tuple[str, str, np.ndarray, np.ndarray, float]]:
    """(description, unit, time labels, values [L, C], sampling rate in Hz) of each source series."""
    import statsmodels.api as sm

    sun = sm.datasets.sunspots.load_pandas().data
    co2 = sm.datasets.co2.load_pandas().data["co2"].interpolate().bfill()
    nile = sm.datasets.nile.load_pandas().data
    nino = sm.datasets.elnino.load_pandas().data
    macro = sm.datasets.macrodata.load_pandas().data
    eeg = np.fromfile(_sample("eeg.dat"), dtype=np.float64).reshape(800, 4)
    goog = np.load(_sample("goog.npz"), allow_pickle=True)["price_data"]
    months = np.array([f"{int(y)}-{m:02d}" for y in nino["YEAR"] for m in range(1, 13)])
    return [
        ("yearly sunspot numbers", "sunspots", sun["YEAR"].astype(int).to_numpy(), sun[["SUNACTIVITY"]].to_numpy(), 1 / YEAR),
        ("weekly atmospheric CO2 at Mauna Loa", "ppm", np.array([str(d.date()) for d in co2.index]), co2.to_numpy()[:, None], 1 / (7 * DAY)),
        ("the yearly flow of the Nile at Aswan", "10^8 m^3", nile["year"].astype(int).to_numpy(), nile[["volume"]].to_numpy(), 1 / YEAR),
        ("monthly sea surface temperatures of the El Niño region", "°C", months, nino.iloc[:, 1:].to_numpy().reshape(-1, 1), 12 / YEAR),
        ("quarterly US real GDP, consumption and investment", "billion dollars",
         np.array([f"{int(y)}Q{int(q)}" for y, q in zip(macro["year"], macro["quarter"])]),
         macro[["realgdp", "realcons", "realinv"]].to_numpy(), 4 / YEAR),
        ("four EEG channels", "mV", np.array([f"{t:.2f} s" for t in np.arange(800) / 80]), eeg, 80.0),
        ("the daily closing price of Google shares", "dollars", np.array([str(d) for d in goog["date"]]),
         goog["adj_close"][:, None], 1 / DAY),
    ]


def _windows(length: int, size: int) -> list[tuple[int, int]]:
    if length <= size:
        return [(0, length)]
    count = int(np.ceil(length / size))
    starts = np.linspace(0, length - size, count).astype(int)
    return [(int(s), int(s) + size) for s in starts]


def _series_text(description: str, unit: str, labels: np.ndarray, values: np.ndarray) -> tuple[str, str]:
    first = values[:, 0]
    top, low = int(first.argmax()), int(first.argmin())
    trend = "rises" if first[-len(first) // 4:].mean() > first[: len(first) // 4].mean() else "falls"
    before = f"Here are {description} from {labels[0]} to {labels[-1]}:"
    after = (f" The highest value is {first[top]:.1f} {unit} at {labels[top]}, the lowest {first[low]:.1f} at "
             f"{labels[low]}; the mean is {first.mean():.1f}, and the series {trend} over the window.")
    return before, after


def _records(folder: str) -> list[dict]:
    from PIL import Image

    records: list[dict] = []
    for i, (description, pixels) in enumerate(_images()):
        h, w = pixels.shape[:2]
        crops = {"all": pixels, "the left half": pixels[:, : w // 2], "the top half": pixels[: h // 2]}
        for j, (part, crop) in enumerate(crops.items()):
            image = Image.fromarray(np.ascontiguousarray(crop))
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            name = f"image_{i}_{j}.png"
            image.save(os.path.join(folder, name))
            brightness = np.asarray(image, dtype=np.float64).mean() / 255
            means = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
            colour = ("in grey tones" if np.ptp(means) < 1 else
                      f"its strongest colour is {('red', 'green', 'blue')[int(means.argmax())]}")
            records.append({"segments": [
                {"type": "text", "text": f"This picture shows {part} of {description}."},
                {"type": "image", "path": name},
                {"type": "text", "text": f" Its mean brightness is {brightness:.2f} and {colour}."}]})
    for i, (description, unit, labels, values, rate) in enumerate(_series()):
        for j, (start, end) in enumerate(_windows(len(values), 160)):
            name = f"series_{i}_{j}.npy"
            np.save(os.path.join(folder, name), values[start:end].astype(np.float32))
            before, after = _series_text(description, unit, labels[start:end], values[start:end])
            records.append({"segments": [{"type": "text", "text": before},
                                         {"type": "time_series", "path": name, "sampling_rate": rate},
                                         {"type": "text", "text": after}]})
    # Interleaved: the MRI slice with the EEG recorded beside it (matplotlib's own example pairs them).
    mri = next(r for r in records if r["segments"][1].get("path") == "image_3_0.png")
    eeg = [r for r in records if r["segments"][0]["text"].startswith("Here are four EEG")]
    for r in eeg:
        records.append({"segments": mri["segments"] + r["segments"]})
    order = np.random.default_rng(0).permutation(len(records))
    return [records[k] for k in order]


def write_demo_set(folder: str) -> str:
    """The demo set in `folder` (written once; every rank of a launch may call this at the same time), and the
    path of its demo.jsonl."""
    path = os.path.join(folder, "demo.jsonl")
    if os.path.exists(path):
        return path
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo_data.", dir=parent)
    with open(os.path.join(staging, "demo.jsonl"), "w") as f:
        for record in _records(staging):
            f.write(json.dumps(record) + "\n")
    try:
        os.rename(staging, folder)
    except OSError as err:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.exists(path):  # not a lost race: nobody wrote the set, so the error is real
            raise OSError(err.errno, f"cannot write the demo data set into {folder}: {err.strerror}") from err
        # another rank was first: its copy is the same
    return path


def demo_rows(cfg, run_dir: str):
    """The `multimodal_demo` data source: the demo set, written into `<run_dir>/demo_data`, read as `multimodal`."""
    import dataclasses

    from scimoe.data.multimodal import multimodal_rows

    path = write_demo_set(os.path.join(run_dir, "demo_data"))
    return multimodal_rows(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path)), run_dir)


if __name__ == "__main__":
    print(write_demo_set(sys.argv[1] if len(sys.argv) > 1 else "demo_data"))
