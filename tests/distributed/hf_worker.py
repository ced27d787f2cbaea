"""Starting from a Hugging Face folder in parallel layouts, launched by tests/distributed/test_hf_load.py as
`torchrun --standalone --nproc_per_node=N tests/distributed/hf_worker.py SPEC.json`.

For each layout: a short run with `checkpoint.init_weights=hf:FOLDER` (its losses), and the peak resident memory
of this rank while the session builds the model and reads the folder, against the same session initialised from
the seed (the whole model on every rank). Rank 0 writes SPEC's `out` JSON.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from scimoe.parallel.dims import ParallelDims  # noqa: E402
from tests.distributed.launching import report, start  # noqa: E402
from scimoe.train.pretrain import pretrain  # noqa: E402
from scimoe.train.session import Session  # noqa: E402
from tests.distributed.test_hf_load import hf_run_config  # noqa: E402
from tests.peak_memory import peak_rss_during  # noqa: E402


def run(spec: dict, rank: int, world: int) -> dict:
    out = {}
    for layout in spec["layouts"]:
        cfg = hf_run_config(spec["folder"], layout, spec["model"])
        dims = ParallelDims.from_config(cfg.parallel, world, rank).build_groups()
        name = layout["name"]
        if spec.get("memory"):
            results = {}
            import deepspeed.utils.groups  # noqa: F401  (imported once before measuring: modules are not the model)
            import megatron.core.tensor_parallel  # noqa: F401
            for start in ("seed", "hf", "hf"):  # the first hf start warms the allocator and the readers' code
                cfg.checkpoint.init_weights = f"hf:{spec['folder']}" if start == "hf" else ""
                dims.barrier()

                def build():
                    with Session(cfg, os.path.join(spec["workdir"], f"{name}_{start}_{rank}"), dims) as session:
                        session.resume()
                        return sum(p.numel() * p.element_size() for p in session.model.parameters())
                own, extra = peak_rss_during(build)
                results[start] = {"extra_bytes": extra, "own_bytes": own}
            out[name] = dims.all_gather_object(results)
        else:
            records = pretrain(cfg, os.path.join(spec["workdir"], name), dims=dims).records
            out[name] = [r["loss"] for r in records]
    return out


def run_released(spec: dict, rank: int, world: int) -> dict:
    """The released-code fixture (tests/model/test_released_model.py) in `spec["layout"]`: its logits, gathered,
    against the released code's."""
    from scimoe.parallel.parallelize import parallelize
    from scimoe.model import build_model
    from scimoe.checkpoint import contents, storage
    from scimoe.train.session import materialize
    from tests.model.test_released_model import FIXTURE
    from safetensors.torch import load_file

    from scimoe.config import ParallelConfig
    from scimoe.checkpoint.hf_index import read_config

    cfg = read_config(FIXTURE)
    layout = spec["layout"]
    parallel = ParallelConfig(tp=layout.get("tp", 1), ep=layout.get("ep", 1))
    dims = ParallelDims.from_config(parallel, world, rank).build_groups()
    with torch.device("meta"):
        model = build_model(cfg)
        parallelize(model, dims)
    model = materialize(model, torch.device("cpu")).eval()
    contents.load_hf_weights(FIXTURE, model, cfg, dims)
    want = load_file(FIXTURE + "_expected.safetensors")
    ids = want["input_ids"]
    with torch.no_grad():
        out = model(ids, torch.arange(ids.shape[1]).expand_as(ids), images=[want["image"]],
                    series=[(want["series"], float(want["rate"]))])
        logits = model.comm.full_logits(out.logits)
    routes = [a.indices.sort(-1).values.tolist() for a in out.moe]
    return {"logits_max_diff": float((logits - want["logits"]).abs().max()),
            "routes_equal": all(r == want[f"routes_{i}"].sort(-1).values.tolist() for i, r in enumerate(routes))}


def main() -> None:
    spec, rank, world = start()
    results = run_released(spec, rank, world) if spec.get("released") else run(spec, rank, world)
    report(spec, rank, results)


if __name__ == "__main__":
    main()
