"""scimoe computes what the released Intern-S1-Pro computes: `python -m pytest tests/model/test_released_model.py`.

The fixture (tests/fixtures/released/tiny_model; docs/fixtures.md says how it was made) is a tiny random
Intern-S1-Pro built by the released modeling code (FoPE with clipped frequencies, grouped routing, the vision
tower) and LMDeploy's time-series tower, saved as a Hugging Face folder, with two input rows (an image in one, a
two-channel series in the other) and what the released code computed for them. scimoe reads the folder and
must give the same logits within 2e-6, image and series embeddings within 5e-7 (fp32), and route every token to the same
experts; tests/distributed/test_hf_load.py checks the same in a tp2×ep2 layout.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from scimoe.checkpoint.hf_index import HFIndex, read_config
from scimoe.model import build_model
from scimoe.checkpoint import contents, storage

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "released", "tiny_model")


def released_model():
    cfg = read_config(FIXTURE)
    model = build_model(cfg)
    contents._load_model(HFIndex(FIXTURE, cfg), model, {}, FIXTURE)
    return cfg, model.eval(), load_file(FIXTURE + "_expected.safetensors")


def test_the_fixture_has_what_the_issue_asks_for():
    cfg, model, _ = released_model()
    assert cfg.pos_emb == "fope" and model.rotary.kept < model.rotary.half  # clipped frequencies
    assert cfg.moe.n_groups == 2 and cfg.vision.enabled and cfg.timeseries.enabled
    assert not list(model.rotary.parameters())  # the released FoPE tables are buffers


def test_logits_embeddings_and_routing_match_the_released_code():
    cfg, model, want = released_model()
    ids = want["input_ids"]
    with torch.no_grad():
        image_embeds = model.vision(want["image"])
        ts_embeds = model.timeseries(want["series"], float(want["rate"]))
        out = model(ids, torch.arange(ids.shape[1]).expand_as(ids), images=[want["image"]],
                    series=[(want["series"], float(want["rate"]))])
    diffs = {name: float((got - want[name]).abs().max()) for name, got in
             (("image_embeds", image_embeds), ("ts_embeds", ts_embeds), ("logits", out.logits))}
    print(f"released model: largest differences {diffs}")  # `pytest -s`; 2026-12-08: 7.5e-8, 1.3e-7, 7.5e-7
    assert diffs["image_embeds"] < 5e-7 and diffs["ts_embeds"] < 5e-7, diffs
    assert want["logits"].abs().max() > 0.1  # the comparison means something
    assert diffs["logits"] < 2e-6, diffs
    for layer, aux in enumerate(out.moe):
        assert torch.equal(aux.indices.sort(-1).values, want[f"routes_{layer}"].sort(-1).values), layer
