"""Regenerate the bundled text corpus from the Python standard library's own docstrings.

Run: `python tools/make_corpus.py > scimoe/data/corpus/stdlib_docs.txt`. The shipped file was made
with CPython 3.11.7; it is real English technical prose (PSF-licensed), needs no download, and is
small enough to tokenize in a second. Documents are separated by blank lines.
"""
import importlib
import inspect
import sys

MODULES = [
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "glob", "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools",
    "json", "logging", "mailbox", "math", "numbers", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
]


def documents():
    seen = set()
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in objects:
            for member in [obj] + ([m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)] if inspect.isclass(obj) else []):
                doc = inspect.getdoc(member)
                if not doc or doc in seen or len(doc) < 80:
                    continue
                seen.add(doc)
                yield " ".join(doc.split())


if __name__ == "__main__":
    for doc in documents():
        sys.stdout.write(doc + "\n\n")
