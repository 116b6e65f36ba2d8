"""Reading source documents: plain text, JSONL and their .gz versions, with a bad-input policy.

Documents ("units") in order:
  *.jsonl / *.json / *.ndjson[.gz]   one JSON object per line, the document is its `text_field`
  anything else (text)[.gz]          txt_docs="paragraph": documents are separated by blank lines (the
                                     BERT pretraining convention); "line": one document per line;
                                     "file": the whole file is one document
Reading returns raw bytes; decode_unit() turns them into text (it runs in the tokenizer processes).
Bad input (missing file, truncated .gz, invalid UTF-8 / JSON) is skipped and counted in an InputReport,
or raises BadInputError naming the file and line when the report is strict.
"""
from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

TXT_DOC_MODES = ("paragraph", "line", "file")
MAX_EXAMPLES = 20  # bad inputs listed in the report; the rest are only counted


class BadInputError(ValueError):
    """Bad source input under the strict policy; the message names the file (and line)."""


class BadDocument(ValueError):
    """One document could not be decoded; the reason is the message."""


class InputReport:
    """Counts of what was skipped; strict=True turns the first problem into BadInputError."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.bad_files: list[str] = []
        self.bad_documents = 0
        self.empty_documents = 0
        self.examples: list[str] = []

    def bad_file(self, path, reason: str) -> None:
        if self.strict:
            raise BadInputError(f"{path}: {reason}")
        self.bad_files.append(f"{path}: {reason}")

    def bad_document(self, where: str, reason: str) -> None:
        if self.strict:
            raise BadInputError(f"{where}: {reason}")
        self.bad_documents += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        return {"bad_files": list(self.bad_files), "bad_documents": self.bad_documents,
                "empty_documents": self.empty_documents, "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, d: dict, strict: bool = False) -> InputReport:
        r = cls(strict)
        r.bad_files, r.bad_documents = list(d["bad_files"]), d["bad_documents"]
        r.empty_documents, r.examples = d["empty_documents"], list(d["examples"])
        return r

    def summary(self) -> str:
        return (f"{len(self.bad_files)} bad file(s), {self.bad_documents} bad document(s), "
                f"{self.empty_documents} empty document(s) skipped")


# ---------------------------------------------------------------------- files
def expand_inputs(patterns: list[str], *, strict: bool = False,
                  report: InputReport | None = None) -> list[Path]:
    """Sorted, de-duplicated files matching the patterns (globs or plain paths; ** recurses)."""
    report = report or InputReport(strict)
    found: set[Path] = set()
    for pattern in patterns:
        if any(c in pattern for c in "*?["):  # a glob
            matches = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not matches:
                report.bad_file(pattern, "no file matches this pattern")
            found.update(matches)
        elif Path(pattern).is_file():
            found.add(Path(pattern))
        else:
            report.bad_file(pattern, "missing file")
    if not found:
        raise BadInputError(f"no input files: {patterns} matched nothing")
    return sorted(found, key=str)


def input_kind(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def iter_units(path: Path, *, txt_docs: str = "paragraph", report: InputReport,
               start_unit: int = 0) -> Iterator[tuple[int, int, bytes, int]]:
    """(unit index, first line number, raw bytes, bytes read so far) for each document of one file.

    The first start_unit units are read but not returned (resuming an interrupted build).
    A truncated or corrupt .gz ends the file early: what was read before stays, the file is reported.
    """
    if txt_docs not in TXT_DOC_MODES:
        raise ValueError(f"txt_docs: must be one of {TXT_DOC_MODES}, got {txt_docs!r}")
    mode = "line" if input_kind(path) == "jsonl" else txt_docs
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed by the `with raw` below)
    except OSError as e:
        report.bad_file(path, f"cannot open ({e.strerror or e})")
        return
    with raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
        unit, para, para_line = 0, [], 0
        try:
            if mode == "file":
                data = stream.read()
                if data.strip() and unit >= start_unit:
                    yield 0, 1, data, raw.tell()
                return
            for line_no, line in enumerate(stream, 1):
                line = line.rstrip(b"\r\n")
                if mode == "line":
                    if line.strip():
                        if unit >= start_unit:
                            yield unit, line_no, line, raw.tell()
                        unit += 1
                elif line.strip():
                    if not para:
                        para_line = line_no
                    para.append(line)
                elif para:
                    if unit >= start_unit:
                        yield unit, para_line, b"\n".join(para), raw.tell()
                    unit, para = unit + 1, []
            if para and unit >= start_unit:
                yield unit, para_line, b"\n".join(para), raw.tell()
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            report.bad_file(path, f"corrupt or truncated compressed file ({e}); kept the {unit} document(s) "
                                  f"before the damage")


def decode_unit(raw: bytes, kind: str, text_field: str = "text") -> str:
    """The text of a raw unit; raises BadDocument with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadDocument(f"invalid UTF-8 at byte {e.start}") from None
    if kind != "jsonl":
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadDocument(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise BadDocument(f"no string field {text_field!r}")
    text = obj[text_field]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadDocument("invalid unicode (lone surrogate escape)") from None
    return text


def iter_documents(paths: list[Path], *, text_field: str = "text", txt_docs: str = "paragraph",
                   strict: bool = False, report: InputReport | None = None) -> Iterator[str]:
    """Decoded documents of all files in order, bad ones skipped (or raising when strict)."""
    report = report or InputReport(strict)
    for path in paths:
        kind = input_kind(path)
        for _, line_no, raw, _ in iter_units(path, txt_docs=txt_docs, report=report):
            try:
                text = decode_unit(raw, kind, text_field)
            except BadDocument as e:
                report.bad_document(f"{path}:{line_no}", str(e))
                continue
            if text:
                yield text
