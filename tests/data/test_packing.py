"""Long multimodal documents are split between items, never inside one: `python -m pytest tests/data/test_packing.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.data.multimodal import multimodal_rows
from scimoe.data.packing import Document, PackReport, pack
from scimoe.model.timeseries import ts_token_count
from scimoe.model.vision import image_token_count
from tests.data.mm_fixture import write_fixture
from tests.data.test_multimodal import _cfg

IMG, TS = 90, 91


def _doc(layout: str, where: str = "doc") -> Document:
    """`t5 i4 t2 s3`: 5 text tokens, an image of 4 placeholders, 2 text, a series of 3 (its payload names it)."""
    tokens, media, images, series = [], [], [], []
    for item in layout.split():
        kind, n = item[0], int(item[1:])
        if kind == "t":
            tokens += list(range(1, n + 1))
            continue
        media.append((len(tokens), len(tokens) + n, "image" if kind == "i" else "time_series"))
        (images if kind == "i" else series).append(f"{kind}{len(media)}")
        tokens += [IMG if kind == "i" else TS] * n
    return Document(tokens, [t not in (IMG, TS) for t in tokens], images, series, where, media)


def _row_media_matches(rows, r: int) -> bool:
    ids = rows.input_ids[r].tolist()
    return ids.count(IMG) == 4 * len(rows.images[r]) and ids.count(TS) == 3 * len(rows.series[r])


def test_a_document_longer_than_a_row_is_split_before_the_item_that_does_not_fit():
    report = PackReport()
    rows = pack([_doc("t5 i4 t2 s3 t1"), _doc("t3 i4")], seq_len=8, pad_id=0, overflow="split", report=report)
    assert rows.input_ids.tolist() == [
        [1, 2, 3, 4, 5, 0, 0, 0],         # the image (4) does not fit in the 3 left: the row closes early
        [IMG] * 4 + [1, 2] + [0, 0],      # the series (3) does not fit in the 2 left
        [TS] * 3 + [1, 1, 2, 3, 0],       # the end of document 1 (its last token), then document 2's text
        [IMG] * 4 + [0] * 4]
    assert rows.images == [[], ["i1"], [], ["i1"]] and rows.series == [[], [], ["s2"], []]
    assert rows.positions[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]  # a continued segment starts at 0
    assert rows.positions[2].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert rows.labels[0].tolist()[4] == -100  # the segment's last token: its next token is in another row
    assert all(_row_media_matches(rows, r) for r in range(len(rows)))
    assert report.documents == 2 and not report.skipped_items and not report.dropped


def test_an_item_longer_than_a_row_is_skipped_and_counted_and_the_rest_kept():
    report = PackReport()
    rows = pack([_doc("t2 i4 t1 s3 t2", where="data.jsonl: document 4")], seq_len=3, pad_id=0, report=report)
    assert report.skipped_items == ["data.jsonl: document 4: image 1 of the document has 4 tokens, "
                                    "more than train.seq_len (3)"]
    assert rows.input_ids.tolist() == [[1, 2, 1], [TS] * 3, [1, 2, 0]]
    assert rows.images == [[], [], []] and rows.series == [[], ["s2"], []]


def test_splitting_needs_the_item_spans_and_truncation_refuses_media():
    doc = _doc("t2 i4")
    with pytest.raises(ValueError, match="doc: splitting needs the token span"):
        pack([Document(doc.tokens, doc.trained, doc.images, where="doc")], 4, 0, "split")
    with pytest.raises(ValueError, match="doc: a document with images or series cannot be truncated"):
        pack([doc], 4, 0, "truncate")


def test_long_multimodal_records_are_kept_and_every_row_feeds_its_encoders(tmp_path):
    from scimoe.model import build_model

    path = write_fixture(str(tmp_path), repeats=1)
    cfg = _cfg(path, seq_len=32)
    rows = multimodal_rows(cfg, str(tmp_path / "run"))
    model = build_model(cfg.model, seed=0)
    image_rows = 0
    for r in range(len(rows)):
        ids = rows.input_ids[r]
        with torch.no_grad():
            assert int((ids == cfg.model.image_token_id).sum()) == sum(len(model.vision(i)) for i in rows.images[r])
            assert int((ids == cfg.model.ts_token_id).sum()) == sum(len(model.timeseries(*s)) for s in rows.series[r])
        image_rows += bool(rows.images[r])
    whole = multimodal_rows(_cfg(path, seq_len=1024), str(tmp_path / "run"))  # every record fits a row here
    fits = [i for row in whole.images for i in row if image_token_count(*i.shape[1:]) <= 32]
    fitting_series = [s for row in whole.series for s in row if ts_token_count(len(s[0]), s[1]) <= 32]
    # Nothing is lost at 32 tokens a row but the items longer than a row (documents are split, not dropped).
    assert image_rows > 1 and len(fitting_series) < sum(len(r) for r in whole.series)  # some series are too long
    assert sorted(i.shape for row in rows.images for i in row) == sorted(i.shape for i in fits)
    assert sorted(len(s[0]) for row in rows.series for s in row) == sorted(len(s[0]) for s in fitting_series)
