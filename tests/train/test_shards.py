"""Layout-independent tensor files: `python -m pytest tests/train/test_shards.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.checkpoint import shards


def _write(tmp_path, name: str, entries: dict) -> str:
    path = tmp_path / name
    path.write_bytes(shards.encode(entries))
    return str(path)


def _pieces(full: torch.Tensor, dim: int, parts: int) -> list[tuple[str, torch.Tensor, shards.Placement]]:
    out = []
    for index, local in enumerate(full.chunk(parts, dim=dim)):
        where = shards.placement(local, (dim, index, parts))
        out.append((shards.entry_key("w", where), local, where))
    return out


def test_any_slicing_reads_back_from_any_other(tmp_path):
    full = torch.arange(8 * 6, dtype=torch.float32).view(8, 6)
    # Saved as 4 row slices in two files (as 4 ep ranks would), read as 3 column slices (another layout).
    saved = _pieces(full, 0, 4)
    files = [_write(tmp_path, f"f{i}.safetensors", {k: ("w", t, w) for k, t, w in saved[2 * i:2 * i + 2]})
             for i in range(2)]
    index = shards.ShardIndex(files)
    assert torch.equal(index.full("w"), full)
    for index_c, local in enumerate(full.chunk(3, dim=1)):
        where = shards.placement(local, (1, index_c, 3))
        assert torch.equal(index.read("w", where, tuple(local.shape)), local)


def test_scalars_and_unsharded_tensors_round_trip(tmp_path):
    step = torch.tensor(7.0)
    norm = torch.randn(5)
    entries = {"s": ("s", step, shards.placement(step, None)), "n": ("n", norm, shards.placement(norm, None))}
    index = shards.ShardIndex([_write(tmp_path, "a.safetensors", entries)])
    assert float(index.full("s")) == 7.0 and torch.equal(index.full("n"), norm)


def test_missing_pieces_and_wrong_shapes_are_named(tmp_path):
    full = torch.randn(4, 2)
    saved = _pieces(full, 0, 2)[:1]  # the file holding rows 2..3 is gone
    index = shards.ShardIndex([_write(tmp_path, "a.safetensors", {k: ("w", t, w) for k, t, w in saved})])
    with pytest.raises(ValueError, match="pieces of 'w' cover 4 of the 8"):
        index.full("w")
    with pytest.raises(ValueError, match=r"'w' is \[4, 2\] in the checkpoint but \[4, 3\]"):
        index.read("w", shards.Placement((4, 3), (0, 0)), (4, 3))
    with pytest.raises(KeyError, match="no tensor 'x'"):
        index.full("x")


def test_replicas_are_written_by_the_lowest_rank_only():
    assert shards.choose_writers([["a", "b@2"], ["a", "c"], ["c"]]) == {"a": 0, "b@2": 0, "c": 1}


def test_glu_weights_cut_over_expert_and_tensor_parallel_ranks_reassemble(tmp_path):
    """gate_up [E, 2F, H] with gate rows first: an etp rank holds its F/etp slice of the gate and of the up
    half, an ep rank its experts; four such ranks' pieces give back the full tensor, and any cut of it."""
    full = torch.arange(4 * 8 * 2, dtype=torch.float32).view(4, 8, 2)  # E=4, F=4, H=2
    files = []
    for ep_rank in range(2):
        for etp_rank in range(2):
            experts = full[2 * ep_rank:2 * ep_rank + 2]
            gate, up = experts[:, :4], experts[:, 4:]
            local = torch.cat([gate[:, 2 * etp_rank:2 * etp_rank + 2], up[:, 2 * etp_rank:2 * etp_rank + 2]], dim=1)
            shard = shards.Shard(((0, ep_rank, 2), (1, etp_rank, 2)), glu_dim=1)
            entries = {shards.entry_key("w", where): ("w", view, where) for view, where in shards.pieces(local, shard)}
            files.append(_write(tmp_path, f"r{ep_rank}{etp_rank}.safetensors", entries))
    index = shards.ShardIndex(files)
    assert torch.equal(index.full("w"), full)
    one_rank = shards.Shard(((1, 1, 2),), glu_dim=1)  # etp2 rank 1, no ep: all experts
    want = torch.cat([full[:, 2:4], full[:, 6:8]], dim=1)
    assert torch.equal(shards.read_local(index, "w", (4, 4, 2), one_rank), want)
