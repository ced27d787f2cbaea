"""Streamed multimodal shards: `scimoe-preprocess --multimodal`, the tar reader, the streaming loader's exact resume,
blends, bad shards / members, and flat memory over a data set larger than the memory it is given.
Run: `python -m pytest tests/data/test_stream.py`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from scimoe.config import ConfigError, compose_config
from scimoe.data import stream, tar_shards
from scimoe.data.mm_preprocess import preprocess_multimodal
from scimoe.data.preprocess import main
from scimoe.data.stream import StreamLoader
from scimoe.train.pretrain import pretrain
from tests.data.mm_fixture import write_fixture

SMALL = ["model=tiny_mm", "data=shards", "train.seq_len=256", "train.global_batch=4", "train.micro_batch=2",
         "train.lr=1e-3", "train.warmup_steps=2", "logger=none", "checkpoint.resume=never", "data.workers=0",
         "data.prefetch=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The multimodal fixture (with its bad records) as two shard folders of several small shards each."""
    tmp = tmp_path_factory.mktemp("shards")
    fixture = write_fixture(str(tmp / "fixture"), repeats=2)
    first = preprocess_multimodal([fixture], str(tmp / "a"), None, 384, shard_mb=0.01, progress=False)
    main(["--multimodal", fixture, "--out", str(tmp / "b"), "--tokenizer", str(tmp / "a" / "tokenizer.json"),
          "--shard-mb", "0.01"])  # the command line, with the first folder's tokenizer
    return {"a": str(tmp / "a"), "b": str(tmp / "b"), "summary": first}


def config(*overrides: str):
    return compose_config([*SMALL, *overrides])


def batches_equal(x: list[dict], y: list[dict]) -> bool:
    for a, b in zip(x, y, strict=True):
        for key in ("input_ids", "positions", "labels"):
            if not torch.equal(a[key], b[key]):
                return False
        if len(a["images"]) != len(b["images"]) or len(a["series"]) != len(b["series"]):
            return False
        if not all(torch.equal(i, j) for i, j in zip(a["images"], b["images"])):
            return False
        if not all(torch.equal(i[0], j[0]) and i[1] == j[1] for i, j in zip(a["series"], b["series"])):
            return False
    return True


def test_preprocess_writes_webdataset_shards_and_names_the_bad_records(shards):
    import webdataset

    summary, index = shards["summary"], tar_shards.read_index(shards["a"])
    assert summary["skipped"] == 6 and all(":2" in line for line in summary["skipped_records"])  # lines 21-26
    assert summary["shards"] == len(index["shards"]) > 2 and summary["samples"] == index["samples"] == 20
    names = [os.path.join(shards["a"], s["name"]) for s in index["shards"]]
    ours = [raw for name in names for raw in tar_shards.read_samples(name)]
    theirs = list(webdataset.WebDataset(names, shardshuffle=False))
    assert [r.key for r in ours] == [t["__key__"] for t in theirs] == [f"{i:09d}" for i in range(20)]
    for raw, sample in zip(ours, theirs):
        assert set(raw.members) == {k for k in sample if not k.startswith("__")}
        meta = json.loads(raw.members["json"])
        assert [m[3] for m in meta["media"]] == sorted(k for k in raw.members if k != "json")
    kinds = {m[2] for r in ours for m in json.loads(r.members["json"])["media"]}
    assert kinds == {"image", "time_series"}
    resumed = list(tar_shards.read_samples(names[0], ours[1].offset))  # from a sample's byte offset
    assert [r.key for r in resumed] == [r.key for r in ours[1:len(resumed) + 1]]


def test_streamed_training_sees_images_and_series_from_the_first_step(shards, tmp_path):
    run = pretrain(config(f"data.path={shards['a']}", "train.steps=2", "data.workers=2"), str(tmp_path / "run"))
    tokens = run.records[0]["tokens_by_modality"]
    assert tokens["image"] > 0 and tokens["time_series"] > 0 and tokens["text"] > 0
    assert os.path.exists(tmp_path / "run" / "tokenizer.json")


def test_the_loader_resumes_at_the_next_row_without_reading_earlier_shards(shards, tmp_path, monkeypatch):
    """A blend of two folders: ten steps straight through equal five steps, a state, and five steps of a fresh
    loader from that state; the fresh loader's first read starts at the saved byte of the saved shard."""
    cfg = config(f"data.blend=[0.7,{shards['a']},0.3,{shards['b']}]", "data.path=null")
    straight = StreamLoader(cfg, str(tmp_path / "r1"), 0, 1)
    steps = [straight.next_step() for _ in range(10)]
    first = StreamLoader(cfg, str(tmp_path / "r2"), 0, 1)
    for _ in range(5):
        first.next_step()
    state = first.state_dict()
    assert len({id(s) for s in first.sources}) == 2 and state["states"][0]["rows"] == 5 * 4
    assert any(c["offset"] > 0 for c in state["states"][0]["sources"])
    reads = []
    plain = tar_shards.read_samples
    monkeypatch.setattr(stream, "read_samples", lambda shard, offset=0: reads.append((shard, offset)) or plain(shard, offset))
    resumed = StreamLoader(cfg, str(tmp_path / "r3"), 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    later = [resumed.next_step() for _ in range(5)]
    assert batches_equal([mb for step in steps[5:] for mb in step], [mb for step in later for mb in step])
    for source, cursor in zip(resumed.sources, state["states"][0]["sources"]):
        shard = os.path.join(source.path, source.order(cursor["epoch"])[cursor["shard"]])
        opened = [offset for name, offset in reads if name.startswith(source.path)]
        assert reads[[name for name, _ in reads].index(shard)][1] == cursor["offset"] == opened[0]
    a, b = (source.rows for source in straight.sources)  # the blend's weights decide where rows come from
    assert a + b == 40 and 0.5 < a / 40 < 0.9, (a, b)


def test_workers_decode_what_the_training_process_would(shards, tmp_path):
    inline = StreamLoader(config(f"data.path={shards['a']}"), str(tmp_path / "a"), 0, 1)
    pooled = StreamLoader(config(f"data.path={shards['a']}", "data.workers=2"), str(tmp_path / "b"), 0, 1)
    try:
        assert batches_equal([mb for _ in range(3) for mb in inline.next_step()],
                             [mb for _ in range(3) for mb in pooled.next_step()])
    finally:
        pooled.close()


def test_replicas_read_their_own_shards_and_must_match_on_resume(shards, tmp_path):
    cfg = config(f"data.path={shards['a']}")
    loaders = [StreamLoader(cfg, str(tmp_path / f"r{r}"), r, 2, gather=None) for r in range(2)]
    assert set(loaders[0].sources[0].mine).isdisjoint(loaders[1].sources[0].mine)
    ids = [torch.cat([mb["input_ids"] for mb in loader.next_step()]) for loader in loaders]
    assert not torch.equal(ids[0], ids[1])
    loaders[0].gather = lambda mine: [mine, dict(mine, replica=1)]
    state = loaders[0].state_dict()
    alone = StreamLoader(cfg, str(tmp_path / "one"), 0, 1)
    with pytest.raises(ValueError, match="saved by 2 data-parallel replicas, this run has 1"):
        alone.load_state_dict(state)
    with pytest.raises(ConfigError, match="fewer than the 64 data-parallel replicas"):
        StreamLoader(config(f"data.path={shards['a']}", "train.global_batch=128", "train.micro_batch=1"),
                     str(tmp_path / "x"), 0, 64)
    with pytest.raises(ConfigError, match="model.vision.max_pixels"):
        StreamLoader(config(f"data.path={shards['a']}", "model.vision.max_pixels=4096"), str(tmp_path / "y"), 0, 1)


def test_a_run_resumes_its_stream_exactly(shards, tmp_path):
    straight = pretrain(config(f"data.path={shards['a']}", "train.steps=6"), str(tmp_path / "straight"))
    pretrain(config(f"data.path={shards['a']}", "train.steps=6", "checkpoint.every=3", "train.exit_after_steps=3"),
             str(tmp_path / "stopped"))
    resumed = pretrain(config(f"data.path={shards['a']}", "train.steps=6", "checkpoint.resume=auto"),
                       str(tmp_path / "stopped"))
    assert [r["step"] for r in resumed.records] == [4, 5, 6]
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in straight.records[3:]]


def _damage(folder: str, tmp_path) -> dict[str, str]:
    """A copy of `folder` with shard 0 cut inside a member, an image of a later shard overwritten with noise (same
    length: its header stays valid) and the second header of a third shard corrupted."""
    import shutil

    copy = str(tmp_path / "damaged")
    shutil.copytree(folder, copy)
    names = [s["name"] for s in tar_shards.read_index(copy)["shards"]]
    first = list(tar_shards.read_samples(os.path.join(copy, names[0])))
    with open(os.path.join(copy, names[0]), "r+b") as f:
        f.truncate(first[-1].offset + 700)  # inside the last sample's first member
    read = {name: list(tar_shards.read_samples(os.path.join(copy, name))) for name in names[1:]}
    with_image = next(name for name in names[1:] if any(k.endswith("png") for r in read[name] for k in r.members))
    victim = next(r for r in read[with_image] if any(k.endswith("png") for k in r.members))
    member = next(k for k in victim.members if k.endswith("png"))
    with open(os.path.join(copy, with_image), "r+b") as f:
        data = f.read()
        at = data.index(victim.members[member], victim.offset)
        f.seek(at)
        f.write(bytes(np.random.default_rng(0).integers(0, 256, len(victim.members[member]), dtype=np.uint8)))
    header = next(name for name in names[1:] if name != with_image and len(read[name]) >= 2)
    third = read[header]
    with open(os.path.join(copy, header), "r+b") as f:
        f.seek(third[1].offset + 148)  # the checksum field of the second sample's first header
        f.write(b"0000000\0")
    return {"path": copy, "truncated": f"{names[0]}: member {first[-1].key}.json truncated",
            "image": f"{with_image}:{victim.key}: member {member}: unreadable image",
            "header": f"{header}: corrupt tar header at byte {third[1].offset}"}


def test_bad_shards_and_members_are_skipped_counted_and_named(shards, tmp_path):
    damaged = _damage(shards["a"], tmp_path)
    loader = StreamLoader(config(f"data.path={damaged['path']}", "data.max_bad_fraction=0.5"), str(tmp_path / "r"), 0, 1)
    for _ in range(12):  # more than an epoch
        loader.next_step()
    bad = loader.bad.bad
    for what in ("truncated", "image", "header"):
        assert any(damaged[what] in line for line in bad), (what, bad)
    assert any("more than train.seq_len (256)" in line for line in loader.bad.skipped_items)
    strict = StreamLoader(config(f"data.path={damaged['path']}", "data.max_bad_fraction=0.01"), str(tmp_path / "s"), 0, 1)
    with pytest.raises(ValueError, match=r"streamed samples are bad \(first: .*\), more than data.max_bad_fraction=0.01"):
        for _ in range(12):
            strict.next_step()


def test_a_data_set_larger_than_the_memory_it_is_given_trains_with_flat_memory(tmp_path):
    """120 noise photographs of 1400×1400 pixels (JPEG, ~2.5 MB each: ~300 MB of shards, more than five times
    the 48 MiB of resident-memory growth the run is allowed) stream through training: after the first steps the
    process's resident memory (the metrics' memory_gib) stays flat while every shard is read."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
        lines.append(json.dumps({"segments": [{"type": "text", "text": f"photo number {i} of noise"},
                                              {"type": "image", "path": f"{i}.jpg"}]}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    small = ["model.vision.max_pixels=4096", "model.vision.min_pixels=1024"]
    summary = preprocess_multimodal([str(folder / "samples.jsonl")], str(tmp_path / "big"), None, 300,
                                    overrides=small, shard_mb=16, progress=False)
    for name in folder.iterdir():
        name.unlink()  # only the shards remain
    size = sum(s["bytes"] for s in tar_shards.read_index(str(tmp_path / "big"))["shards"])
    budget = 48 * 2**20
    assert summary["samples"] == 120 and size > 5 * budget
    cfg = config(f"data.path={tmp_path / 'big'}", "train.seq_len=64", "train.global_batch=2", "train.micro_batch=2",
                 "train.steps=24", *small)
    import psutil

    before = psutil.Process().memory_info().rss
    run = pretrain(cfg, str(tmp_path / "run"))
    rss = [r["memory_gib"] * 2**30 for r in run.records]
    images = sum(r["tokens_by_modality"]["image"] for r in run.records) // 4  # 4 tokens per 64×64 image
    assert images >= 120, images  # every photograph was read at least once
    assert max(rss[4:]) - rss[3] < budget, [round(r / 2**20) for r in rss]
    # the whole run (model, optimizer, loader) grows the process by less than the data it streamed (measured:
    # ~155 MiB for 264 MiB of shards; a loader holding the samples would add all of them)
    assert max(rss) - before < size, (before, max(rss), size)
