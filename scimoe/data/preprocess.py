"""`scimoe-preprocess`: tokenize text into Megatron `.bin/.idx` files or packed shards.

With a progress bar and a summary of what was skipped.

Run: `scimoe-preprocess corpus.jsonl more.parquet notes.txt --out data/corpus [--tokenizer tok.json |
--vocab-size 4096] [--text-key text] [--pack 4096]`. Inputs: .jsonl records
(`--text-key`, read line by line), .parquet columns (HF datasets), .txt paragraphs (blank-line separated); a binary
file is refused by name (exit 2). Without --tokenizer a byte-level
BPE is trained on the inputs and saved as OUT.tokenizer.json. Every document ends with EOS. Records that
are not JSON or have no text are skipped and listed (file:line). `--pack N` also writes
OUT.packed.safetensors (input_ids, positions, labels of N-token rows). Then train with
`scimoe-train data.source=indexed data.path=OUT data.tokenizer=OUT.tokenizer.json`.
`--multimodal` turns multimodal records into tar shards that training streams instead (OUT is then a folder;
scimoe/data/mm_preprocess.py: `--model`, `--override`, `--shard-mb`).
Tested by `python -m pytest tests/data/test_indexed.py tests/data/test_stream.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from scimoe.data.indexed import write_indexed
from scimoe.data.packing import pack_documents
from scimoe.data.tokenizer import EOS, load_tokenizer, train_bpe


def refuse_binary(path: str) -> None:
    """ValueError naming `path` when it is not a text file (a NUL byte in its first 64 KiB)."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if b"\0" in head:
        raise ValueError(f"{path}: not a text file (a NUL byte at offset {head.index(0)}); inputs are .jsonl records, "
                         ".parquet columns or .txt paragraphs")


def read_texts(path: str, text_key: str, skipped: list[str]) -> list[str]:
    from datasets import load_dataset

    if path.endswith(".parquet"):
        try:
            rows = load_dataset("parquet", data_files=path, split="train")
        except Exception as err:  # noqa: BLE001 (datasets wraps pyarrow's errors in its own)
            raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from err
        texts = []
        for i, row in enumerate(rows, 1):
            value = row.get(text_key)
            if isinstance(value, str) and value.strip():
                texts.append(value)
            else:
                skipped.append(f"{path}:{i}: no text in column '{text_key}'")
        return texts
    refuse_binary(path)
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            return [p.strip() for p in f.read().split("\n\n") if p.strip()]
    texts = []
    with open(path, "rb") as f:  # JSON lines, each decoded on its own so that one bad line is one skipped record
        lines = f.readlines()
    for i, encoded in enumerate(lines, 1):
        try:
            raw = encoded.decode("utf-8")
        except UnicodeDecodeError as err:
            skipped.append(f"{path}:{i}: not UTF-8 text ({err.reason} at byte {err.start})")
            continue
        if not raw.strip():
            continue
        try:
            value = json.loads(raw).get(text_key)
        except (ValueError, AttributeError) as err:
            skipped.append(f"{path}:{i}: not a JSON object ({err})")
            continue
        if isinstance(value, str) and value.strip():
            texts.append(value)
        else:
            skipped.append(f"{path}:{i}: no text under '{text_key}'")
    return texts


def preprocess(inputs: list[str], out: str, tokenizer: str | None, vocab_size: int, text_key: str = "text",
               pack: int = 0, progress: bool = True) -> dict:
    skipped: list[str] = []
    texts = [t for path in inputs for t in read_texts(path, text_key, skipped)]
    if not texts:
        raise ValueError(f"no text found in {', '.join(inputs)}" + (f" (first problem: {skipped[0]})" if skipped else ""))
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if tokenizer:
        tok = load_tokenizer(tokenizer, vocab_size, size_key="--vocab-size")
    else:
        tok = train_bpe(texts, vocab_size)
        tok.save(f"{out}.tokenizer.json")
    eos = tok.token_to_id(EOS)
    documents = []
    for start in tqdm(range(0, len(texts), 1024), desc="tokenizing", unit="batch", disable=not progress):
        documents.extend(enc.ids + [eos] for enc in tok.encode_batch(texts[start:start + 1024]))
    summary = write_indexed(out, documents, tok.get_vocab_size())
    if pack:
        from safetensors.torch import save_file

        rows = pack_documents(documents, pack, eos)
        save_file({"input_ids": rows.input_ids, "positions": rows.positions, "labels": rows.labels},
                  f"{out}.packed.safetensors")
        summary["packed_rows"] = len(rows)
    summary["skipped"] = len(skipped)
    summary["skipped_records"] = skipped
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scimoe-preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help=".jsonl, .parquet or .txt files")
    parser.add_argument("--out", required=True, help="output prefix: OUT.bin, OUT.idx")
    parser.add_argument("--tokenizer", help="a tokenizers JSON file (default: train a BPE, save OUT.tokenizer.json)")
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--pack", type=int, default=0, help="also write rows of this many tokens")
    parser.add_argument("--multimodal", action="store_true", help="multimodal records → tar shards in folder OUT")
    parser.add_argument("--model", default="tiny_mm", help="--multimodal: the model preset whose image and series "
                        "sizes decide placeholder counts")
    parser.add_argument("--override", action="append", default=[], help="--multimodal: a model.* override, repeatable")
    parser.add_argument("--shard-mb", type=float, default=256, help="--multimodal: about this many MiB per shard")
    args = parser.parse_args(argv)
    try:
        if args.multimodal:
            from scimoe.data.mm_preprocess import preprocess_multimodal

            summary = preprocess_multimodal(args.inputs, args.out, args.tokenizer, args.vocab_size, args.model,
                                            args.override, args.shard_mb)
        else:
            summary = preprocess(args.inputs, args.out, args.tokenizer, args.vocab_size, args.text_key, args.pack)
    except (ValueError, FileNotFoundError) as err:
        print(f"scimoe-preprocess: {err}", file=sys.stderr)
        sys.exit(2)
    for line in summary.pop("skipped_records")[:50]:
        print(f"skipped {line}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
