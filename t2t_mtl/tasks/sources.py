"""Rows for a task: from the bundled samples, local JSONL/CSV/Parquet files or a hub dataset.

Files are read with `datasets` (memory-mapped Arrow cache), so a big source is not held in Python
memory: `Rows` keeps only the indices of the valid rows and maps each row on access. Every row is
checked once, up front, against the template's `fields` and by rendering it with every variant;
bad rows are skipped and counted, or fail the run (`bad_rows="fail"`), each reported as
`file:row` the user can find in their file. Rows are numbered as an editor shows them, from 1, in
every format: JSONL by line; CSV by the first line of the record, the header being line 1;
Parquet, JSON arrays and hub splits by position. What cannot be read is never a library's
traceback or log line: a line that is not UTF-8 or not a JSON object, a CSV record with another
number of fields than the header, is a bad row; an empty, truncated or corrupt file a DataError at
the file (`_read_file`; `datasets`' logging and warnings are silenced while it reads).

Of a `tasks.task.Task` this module reads only `name`, `fields` (name -> object with `.type`,
`.required`), `label_field`, `label_set()`, `tagging`, `entity_types`, `source`,
`source_missing`, `samples`, `variants` and `render` (type-only import).

Label maps (`labels`) turn raw values into label names; values they do not name pass through. For
NER tag lists (`Task.tagging`) a map may name whole tags (`"1": B-person`) or rename entity types
(`PER: person` turns `B-PER`/`I-PER` into `B-person`/`I-person`), so it never has to list `O`
(`parsing.split_tag_map`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import difflib
import json
import logging
import math
import random
import re
import warnings
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2t_mtl.core.config import SourceConfig
from t2t_mtl.core.errors import DataError, Problem, RepeatTally, T2TError, did_you_mean
from t2t_mtl.core.records import Record
from t2t_mtl.tasks.parsing import OUTSIDE, split_tag_map, tag_type, type_name_problem

if TYPE_CHECKING:
    from datasets import Dataset

    from t2t_mtl.tasks.schema import Variant
    from t2t_mtl.tasks.task import Task

__all__ = [
    "FORMATS",
    "MAX_SHOWN",
    "Rows",
    "load_rows",
    "map_row",
    "render_row",
    "row_render_problem",
]

FORMATS = {
    "jsonl": "json",
    "json": "json",
    "csv": "csv",
    "parquet": "parquet",
}  # extension -> datasets builder
MAX_SHOWN = 20  # problems listed in an error; the rest are counted


@dataclass
class Resolved:
    """The effective source of one split: where to read, plus the mapping to apply."""

    hub: str | None = None
    name: str | None = None
    path: Path | None = None
    split_name: str = ""  # hub split or file stem
    columns: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    format: str | None = None
    revision: str | None = None  # hub revision (script datasets: the "refs/convert/parquet" copy)
    at: tuple[str, int | None] | None = None  # where the path is declared (a template's line)


def resolve(template: Task, source: SourceConfig | None, split: str) -> Resolved:
    """Decide where rows of `split` come from: the override, else bundled samples, else the template's source."""
    tsrc = template.source or {}
    if source is not None:
        splits = source.splits or {}
        return Resolved(
            source.hub,
            source.name,
            Path(source.path).expanduser() if source.path else None,
            splits.get(split, split),
            dict(source.columns if source.columns is not None else tsrc.get("columns") or {}),
            dict(source.labels if source.labels is not None else tsrc.get("labels") or {}),
            source.format,
            source.revision,
        )
    cols, labels = dict(tsrc.get("columns") or {}), dict(tsrc.get("labels") or {})
    samples = template.samples
    if samples is not None and _find_split_file(samples, split, None) is not None:
        # Bundled samples are stored per canonical split name, in the hub dataset's own schema.
        return Resolved(path=samples, split_name=split, columns=cols, labels=labels)
    splits = tsrc.get("splits") or {}
    missing = getattr(template, "source_missing", None)
    if tsrc.get("path") and missing is not None:
        raise DataError(missing)  # at the template's source.path line, with the paths tried
    if tsrc.get("hub") or tsrc.get("path"):
        return Resolved(
            tsrc.get("hub"),
            tsrc.get("name"),
            Path(tsrc["path"]) if tsrc.get("path") else None,
            str(splits.get(split, split)),
            cols,
            labels,
            tsrc.get("format"),
            tsrc.get("revision"),
            template.where(("source", "path")) if tsrc.get("path") else None,
        )
    have = f" (bundled samples in {samples} have no '{split}' split)" if samples else ""
    raise DataError(
        Problem(
            str(template.path),
            None,
            f"task '{template.name}' has no data for split '{split}'{have}",
            "give a source: `tasks[i].source.path` in the run config or `--source PATH` in preview",
        )
    )


def training_file_for(template: Task, source: SourceConfig | None, split: str) -> Path | None:
    """The file `split` is read from when it is the very file the `train` split is read from (a
    `source.path` that is one file serves every split), else None. Evaluating such a split scores
    the rows the task trained on."""
    if split == "train":
        return None
    try:
        a, b = resolve(template, source, split), resolve(template, source, "train")
    except T2TError:
        return None
    if a.path is None or b.path is None or not a.path.is_file():
        return None
    return a.path if a.path.resolve() == b.path.resolve() else None


def _find_split_file(folder: Path, stem: str, fmt: str | None) -> Path | None:
    if not folder.is_dir():
        return None
    exts = [e for e in FORMATS if fmt is None or e == fmt or (fmt == "jsonl" and e == "json")]
    for ext in exts:
        f = folder / f"{stem}.{ext}"
        if f.is_file():
            return f
    return None


# ------------------------------------------------------------------ reading


class _Backend:
    """Raw rows of one file or hub split, plus how to name a row's location.

    Rows are numbered as an editor shows them, from 1, in every format: a JSONL row by its line, a
    CSV row by the first line of its record (the header is line 1, so the first row is usually
    line 2), a Parquet, JSON-array or hub row by its position (the first row is row 1).
    """

    def __init__(
        self,
        data: Dataset | list[dict],
        desc: str,
        kind: str,
        file: Path | None = None,
        lines: Sequence[int] | None = None,
    ):
        self.data, self.desc, self.kind, self.file = data, desc, kind, file
        # Line (row number) of each row; computed lazily for JSONL and CSV files read by datasets.
        self._lines = lines
        self._offsets: array | None = None  # byte offset of each row's line (`written_keys`)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, i: int) -> dict:
        return dict(self.data[int(i)])

    def batches(self, size: int = 1000) -> Iterator[list[dict]]:
        if isinstance(self.data, list):
            for s in range(0, len(self.data), size):
                yield self.data[s : s + size]
            return
        for batch in self.data.iter(batch_size=size):
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            yield [{k: batch[k][j] for k in keys} for j in range(n)]

    def written_keys(self, i: int) -> set[str] | None:
        """The keys row `i` has in its file, for a JSONL file read by `datasets` (which gives every
        row every column, a missing one as None); None for other sources or an unreadable line.
        Tells "the row has no such key" from "the key is null"."""
        if self.kind != "jsonl" or isinstance(self.data, list) or self.file is None:
            return None
        if self._offsets is None:
            offsets, pos = array("q"), 0
            with open(self.file, "rb") as f:
                for ln in f:
                    if ln.strip():
                        offsets.append(pos)
                    pos += len(ln)
            self._offsets = offsets
        if i >= len(self._offsets):
            return None
        with open(self.file, "rb") as f:
            f.seek(self._offsets[i])
            try:
                obj = json.loads(f.readline().decode("utf-8").lstrip("\ufeff"))
            except ValueError:
                return None
        return set(obj) if isinstance(obj, dict) else None

    def location(self, i: int) -> tuple[str, int]:
        if self._lines is None and self.kind == "jsonl":
            with open(self.file, "rb") as f:  # the reader skips blank lines: count the real ones
                self._lines = [n for n, ln in enumerate(f, 1) if ln.strip()]
        elif self._lines is None and self.kind == "csv":
            self._lines = array(
                "q", (first for first, rec, _ in _csv_records(self.file) if rec is not None)
            )
        if self._lines is not None and i < len(self._lines):
            return self.desc, int(self._lines[i])
        return self.desc, i + 1


# ------------------------------------------------------------------ reading files


@contextlib.contextmanager
def _quiet() -> Iterator[Any]:
    """`datasets` (imported here: slow, pyarrow and pandas) with its logging, progress bars and the
    warnings of the libraries under it silenced while a source is read: when reading fails, the
    project's own `file:line` message is what the user sees, not library noise repeating it."""
    import datasets

    datasets.disable_progress_bars()
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _NOISY_LOGGERS)]
    for lg, _ in saved:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield datasets
    finally:
        for lg, level in saved:
            lg.setLevel(level)


_NOISY_LOGGERS = ("datasets", "fsspec", "huggingface_hub", "filelock", "pyarrow")


def _utf8_problem(raw: bytes, e: UnicodeDecodeError) -> str:
    """What is wrong with a line that is not UTF-8, naming the byte and its column."""
    col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
    return f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col}"


def _text_file_state(file: Path) -> tuple[bool, bool]:
    """(whether the file is valid UTF-8, whether it holds anything but whitespace), read in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    content = False
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            content = content or bool(chunk.strip())
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                return False, True
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False, content
    return True, content


def _empty_file(file: Path, what: str = "rows") -> DataError:
    """A file without rows: at its line 1, where the first row (or the header) should be."""
    return DataError(
        Problem(str(file), 1, f"the file is empty: no {what}", "is it the right file?")
    )


def _scan_jsonl(file: Path, problems: list[tuple[str, int, str]]) -> _Backend:
    """Plain-Python JSONL reader for files `datasets` rejects: every line that is not UTF-8, not
    valid JSON or not a JSON object is a problem at its line; the others are the rows."""
    rows, lines = [], []
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                ln = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append((str(file), n, _utf8_problem(raw, e)))
                continue
            if n == 1:
                ln = ln.lstrip("\ufeff")  # a byte-order mark written by some editors
            if not ln.strip():
                continue
            text = ln.rstrip(
                "\r\n"
            )  # else an unclosed object is "wrong" at the next line's column 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                where = (
                    'at the end of the line: a closing } or " is missing'
                    if e.pos >= len(text.rstrip())
                    else f"column {e.colno}"
                )
                problems.append((str(file), n, f"not valid JSON: {e.msg} ({where})"))
                continue
            except (ValueError, RecursionError) as e:  # numbers too long, nesting too deep
                problems.append((str(file), n, f"not valid JSON: {e}"))
                continue
            if not isinstance(obj, dict):
                problems.append((str(file), n, f"expected a JSON object, got {_json_kind(obj)}"))
                continue
            rows.append(obj)
            lines.append(n)
    if not rows and not problems:
        raise _empty_file(file)
    return _Backend(rows, str(file), "jsonl", file, lines)


def _json_kind(obj: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return kinds.get(type(obj), "a number")


def _read_json_array(file: Path, problems: list[tuple[str, int, str]]) -> _Backend:
    """A `.json` file holding one array of row objects (rows numbered by position, from 1)."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1  # the line holding the bad byte
        col = len(raw[start : e.start].decode("utf-8", errors="replace")) + 1
        raise DataError(
            Problem(
                str(file),
                raw[: e.start].count(b"\n") + 1,
                f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col}",
            )
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            Problem(str(file), e.lineno, f"not valid JSON: {e.msg} (column {e.colno})")
        ) from None
    except (ValueError, RecursionError) as e:
        raise DataError(Problem(str(file), None, f"not valid JSON: {e}")) from None
    if not isinstance(obj, list):
        raise DataError(
            Problem(
                str(file),
                1,
                f"expected an array of row objects, got {_json_kind(obj)}",
                "or write one JSON object per line (JSON lines, .jsonl)",
            )
        )
    rows, lines = [], []
    for i, item in enumerate(obj, 1):
        if isinstance(item, dict):
            rows.append(item)
            lines.append(i)
        else:
            problems.append((str(file), i, f"expected a JSON object, got {_json_kind(item)}"))
    if not obj:
        raise _empty_file(file)
    return _Backend(rows, str(file), "json", file, lines)


def _decoded_lines(file: Path, bad: dict[int, str]) -> Iterator[str]:
    """The file's lines as text; a line that is not UTF-8 is decoded with replacement characters and
    its number recorded in `bad` with what is wrong."""
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad[n] = _utf8_problem(raw, e)
                text = raw.decode("utf-8", errors="replace")
            yield text.lstrip("\ufeff") if n == 1 else text


def _csv_records(file: Path | None) -> Iterator[tuple[int, list[str] | None, str]]:
    """Every data record of a CSV file: (first line, fields or None, problem), the header and blank
    lines left out. A quoted field may span several lines, so records are found with the csv
    module, not by counting lines. A record that is not UTF-8 or has another number of fields than
    the header comes with fields None and the problem."""
    if file is None:
        return
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long documents in one cell
    bad: dict[int, str] = {}
    reader = csv.reader(_decoded_lines(file, bad))
    header: list[str] | None = None
    prev = 0
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield prev + 1, None, f"not valid CSV: {e}"
            prev = reader.line_num
            continue
        first, prev = prev + 1, reader.line_num
        if not rec:  # csv yields [] for a blank line, which the CSV loader skips as well
            continue
        why = next((bad[n] for n in range(first, prev + 1) if n in bad), "")
        if header is None:
            header = rec
            if why:
                yield first, None, f"header: {why}"
            continue
        if not why and len(rec) != len(header):
            unclosed = len(rec) < len(header) and any("," in x or "\n" in x for x in rec)
            why = (
                f"has {len(rec)} field{'s' if len(rec) != 1 else ''}, but the header has "
                f"{len(header)}"
                + (": quote a field that holds a comma" if len(rec) > len(header) else "")
                + (
                    ': a quote (") opened in this record is not closed, so the field runs on '
                    + (f"to line {prev}" if prev > first else "over the commas after it")
                    if unclosed
                    else ""
                )
            )
        yield first, (None if why else rec), why


def _csv_value(text: str, kind: str) -> Any:
    if text == "":
        return None  # an empty cell reads as a missing value, as with the CSV loader
    return int(text) if kind == "int" else float(text) if kind == "float" else text


def _read_csv(file: Path, problems: list[tuple[str, int, str]], ds_mod: Any) -> _Backend:
    """A CSV file: `datasets` reads it when every record is well-formed UTF-8 with as many fields as
    the header; otherwise the bad records are problems at their line and the rest is read here
    (column types inferred as the CSV loader does: int, else float, else text)."""
    with open(file, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise _empty_file(file)
    first = head.lstrip(b"\xef\xbb\xbf").lstrip().split(b"\n", 1)[0].decode("utf-8", "replace")
    if first[:1] in ("{", "["):
        raise DataError(
            Problem(
                str(file),
                1,
                "this .csv file holds JSON, not comma-separated values",
                "rename it to .jsonl or .json, or set source.format: jsonl",
            )
        )
    if "," not in first and any(sep in first for sep in (";", "\t", "|")):
        sep = next(x for x in (";", "\t", "|") if x in first)
        raise DataError(
            Problem(
                str(file),
                1,
                f"the header has no comma but {sep!r}: the file is not comma-separated",
                "write it with commas, or as JSON lines in a .jsonl file",
            )
        )
    starts, broken = array("q"), []
    for first, _rec, why in _csv_records(file):
        if why:
            broken.append((first, why))
        else:
            starts.append(first)
    if not broken:
        try:
            # A cell is text: only an empty cell is missing (pandas would also read N/A, NA,
            # null, None, nan, #N/A ... as missing, and a label named "N/A" would vanish).
            ds = ds_mod.load_dataset(
                "csv",
                data_files=str(file),
                split="train",
                keep_default_na=False,
                na_values=[""],
            )
        except Exception:  # noqa: BLE001 - anything the CSV loader cannot read: read it here
            pass
        else:
            if len(ds) == 0:
                raise _empty_file(file, "rows below the header")
            return _Backend(ds, str(file), "csv", file, starts if len(starts) == len(ds) else None)
    problems.extend((str(file), line, why) for line, why in broken)
    with open(file, newline="", encoding="utf-8", errors="replace") as f:
        try:
            header = next((r for r in csv.reader(f) if r), [])
        except csv.Error:  # reported as a problem of its line by _csv_records
            header = []
    header = [h.lstrip("\ufeff") for h in header]
    records = [(first, rec) for first, rec, why in _csv_records(file) if rec is not None]
    kinds = []
    for j in range(len(header)):
        kind = "int"
        for _, rec in records:
            v = rec[j]
            if v == "":
                continue
            try:
                int(v)
            except ValueError:
                try:
                    if not any(ch.isdigit() for ch in v):
                        raise ValueError(v)  # nan, inf, infinity: words, as pandas reads them here
                    float(v)
                    kind = "float"
                except ValueError:
                    kind = "str"
                    break
        kinds.append(kind)
    rows = [{h: _csv_value(v, k) for h, v, k in zip(header, rec, kinds)} for _, rec in records]
    if not rows and not broken:
        raise _empty_file(file, "rows below the header")
    return _Backend(rows, str(file), "csv", file, [first for first, _ in records])


def _read_file(res: Resolved, file: Path, ext: str, problems: list) -> _Backend:
    """Rows of one local file; anything unreadable is a DataError (or per-row problems) at the
    file and line, never a library traceback."""
    with _quiet() as ds_mod:
        if ext == "csv":
            return _read_csv(file, problems, ds_mod)
        if ext in ("jsonl", "json"):
            utf8, content = _text_file_state(file)
            if not content:
                raise _empty_file(file)
            with open(file, "rb") as fh:  # a .json file may hold JSON lines or one array
                if fh.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip()[:1] == b"[":
                    return _read_json_array(file, problems)
            if not utf8:
                return _scan_jsonl(file, problems)
            try:
                ds = ds_mod.load_dataset("json", data_files=str(file), split="train")
            except Exception:  # noqa: BLE001 - malformed lines: find each one ourselves
                return _scan_jsonl(file, problems)
            if len(ds) == 0:
                return _scan_jsonl(file, problems)
            return _Backend(ds, str(file), "jsonl", file)
        if file.stat().st_size == 0:
            raise _empty_file(file)
        try:
            ds = ds_mod.load_dataset("parquet", data_files=str(file), split="train")
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, not Parquet at all
            if _parquet_rows(file) == 0:  # a valid file with a schema and no rows: datasets fails
                raise _empty_file(file) from None
            raise DataError(
                Problem(
                    str(file),
                    None,
                    f"cannot read the Parquet file: {_first_line(e)}",
                    "is it complete? a truncated or corrupt file must be written again",
                )
            ) from None
        if len(ds) == 0:
            raise _empty_file(file)
        return _Backend(ds, str(file), "parquet", file)


def _parquet_rows(file: Path) -> int | None:
    """The row count a Parquet file's footer states; None when it cannot be read."""
    try:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(file).metadata.num_rows)
    except Exception:  # noqa: BLE001 - not a readable Parquet file
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _open(res: Resolved, split: str, problems: list) -> _Backend:
    if res.path is not None:
        file = res.path
        if res.path.is_dir():
            file = _find_split_file(res.path, res.split_name, res.format)
            if file is None:
                stems = sorted({p.stem for p in res.path.iterdir() if p.suffix[1:] in FORMATS})
                hint = did_you_mean(res.split_name, stems) or (
                    "files there: " + ", ".join(stems)
                    if stems
                    else "the folder holds no data files"
                )
                file, line = res.at or (str(res.path), None)
                raise DataError(
                    Problem(
                        file,
                        line,
                        (f"source.path {res.path}: " if res.at else "")
                        + f"no {res.split_name}.jsonl/.csv/.parquet for split '{split}'",
                        (hint + "; " if hint else "")
                        + f"map it with splits: {{{split}: <file stem>}}",
                    )
                )
        elif not res.path.exists():
            raise DataError(
                Problem(str(res.path), None, "data file or folder not found", "check the path")
            )
        ext = res.format or file.suffix[1:].lower()
        if ext not in FORMATS:
            raise DataError(
                Problem(
                    str(file), None, f"unknown data format '.{ext}'", "use .jsonl, .csv or .parquet"
                )
            )
        try:
            return _read_file(res, file, ext, problems)
        except OSError as e:  # unreadable: permissions, a folder named like a file, ...
            raise DataError(
                Problem(str(file), None, f"cannot read the file: {e.strerror or e}")
            ) from None
    with _quiet() as ds_mod:
        try:
            ds = ds_mod.load_dataset(res.hub, res.name, split=res.split_name, revision=res.revision)
        except Exception as e:  # noqa: BLE001 - offline, unknown dataset, missing config: all
            # end the same way for the user
            what = f"hub dataset '{res.hub}'" + (f" (config '{res.name}')" if res.name else "")
            raise DataError(
                Problem(
                    f"hub:{res.hub}",
                    None,
                    f"cannot load {what}, split '{res.split_name}': {_first_line(e)}",
                    "offline or no access? point the task at local JSONL/CSV/Parquet files "
                    "instead: `source: {path: DIR}` in the run config (tasks[i].source) or "
                    "`--source DIR` in preview",
                )
            ) from None
    return _Backend(ds, f"{res.hub}:{res.split_name}", "hub")


# ------------------------------------------------------------------ mapping + checking


def _label_key(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"  # a JSON boolean, as a quoted labels key writes it
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # CSV/Parquet often store 1 as 1.0
    return str(v)


def _rename_tag(x: Any, renames: dict) -> Any:
    t = tag_type(x)
    return x if t is None or t not in renames else f"{x[:2]}{renames[t]}"


def map_row(
    raw: dict,
    columns: dict,
    labels: dict,
    label_field: str | None,
    fields: dict,
    renames: dict | None = None,
) -> tuple[dict, set]:
    """Rename columns (only those present), map labels, keep declared fields; returns (row, present names).

    `renames` (NER tag lists): entity type renames applied to tags `labels` does not map (see
    `parsing.split_tag_map`, which also gives the `labels` to pass with them).
    """
    row = {k: v for k, v in raw.items() if k not in columns}
    for k, dst in columns.items():
        if k in raw:  # an explicitly renamed column wins over a same-named one
            row[dst] = raw[k]
    for name, spec in fields.items():
        if name in row:
            row[name] = _coerced(row[name], spec.type)
    if (labels or renames) and label_field in row:
        v = row[label_field]
        if isinstance(v, list) and renames:
            row[label_field] = [
                labels[k] if (k := _label_key(x)) in labels else _rename_tag(x, renames) for x in v
            ]
        elif isinstance(v, list):
            row[label_field] = [labels.get(_label_key(x), x) for x in v]
        elif v is not None:
            row[label_field] = labels.get(_label_key(v), v)
    present = {k for k in fields if k in row and row[k] is not None}
    return {k: row.get(k) for k in fields}, present


_BOOL_TEXT = {"true": True, "false": False}


def _coerced(v: Any, ftype: str) -> Any:
    """`v` read as `ftype` where a file format cannot store that type: a list or dict field's text
    that holds a JSON array or object (CSV cells are text: `["EU", "rejects"]`, `{"k": "v"}`), a
    bool field's `true`/`false` text, an int or float field's number written as text (a CSV column
    with one odd cell is read as text), an int field's whole-number float (pandas writes a nullable
    int column as float: 2.0). Anything else is left for the type check to report."""
    if isinstance(v, str):
        text = v.strip()
        if (ftype.startswith("list") and text.startswith("[")) or (
            ftype == "dict" and text.startswith("{")
        ):
            try:
                parsed = json.loads(text)
            except ValueError:
                return v
            return parsed if isinstance(parsed, list if ftype != "dict" else dict) else v
        if ftype == "bool" and text.lower() in _BOOL_TEXT:
            return _BOOL_TEXT[text.lower()]
        if ftype in ("int", "float"):
            try:
                num = float(text)
            except ValueError:
                return v
            if ftype == "float" and math.isfinite(num):
                return num
            if ftype == "int" and re.fullmatch(r"[+-]?\d+", text):
                return int(text)
        return v
    if ftype == "int" and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _tag_problem(name: str, x: Any, tags: list[str] | None) -> tuple[str, str] | None:
    """(message, hint) when `x` is not a BIO tag of the task (any well-formed one when `tags` is None)."""
    if tags is not None and x in tags:
        return None
    etype = tag_type(x)
    if tags is None and (x == OUTSIDE or (etype is not None and not type_name_problem(etype))):
        return None
    known = "" if tags is None else f" ({', '.join(tags)})"
    what = f"tag {x!r} in '{name}' is not a tag of this task{known}"
    if isinstance(x, str) and (x == OUTSIDE or etype is not None):
        why = type_name_problem(etype or "")
        if why:
            return f"{what}: {why}", "rename the type with labels: {OLD: new}"
        close = difflib.get_close_matches(x, tags or [], n=1, cutoff=0.6)
        return what, (
            f"did you mean '{close[0]}'?"
            if close
            else f"declare '{etype}' in entity_types, or rename it with labels: {{{etype}: <type>}}"
        )
    return what, (
        f'map it with labels: {{"{_label_key(x)}": <tag>}}, a tag being O, B-<type> or I-<type>'
    )


def _type_problem(
    name: str,
    v: Any,
    ftype: str,
    required: bool,
    labels: list[str] | None,
    tagging: bool = False,
) -> tuple[str, str] | None:
    """(message, hint) when `v` does not fit `ftype`, else None (`tagging`: labels are BIO tags)."""

    def bad_label(x: Any) -> tuple[str, str] | None:
        if tagging:
            return _tag_problem(name, x, labels)
        if labels is None:
            return (
                None
                if isinstance(x, str)
                else (f"label {x!r} in '{name}' is not a name", "map it with labels:")
            )
        if x in labels:
            return None
        close = difflib.get_close_matches(str(x), labels, n=1, cutoff=0.6)
        return (
            f"label {x!r} not in answer_choices ({', '.join(labels)})",
            f"did you mean '{close[0]}'?"
            if close
            else "map raw values to names with labels: {raw: name}",
        )

    if ftype == "str":
        if not isinstance(v, str):
            return f"field '{name}' should be text, got {type(v).__name__} {v!r:.40}", ""
        if required and not v.strip():
            return f"empty text in field '{name}'", ""
        return None
    if ftype == "label":
        return bad_label(v)
    if ftype in ("list[str]", "list[label]", "list"):
        if not isinstance(v, list):
            return f"field '{name}' should be a list, got {type(v).__name__} {v!r:.40}", (
                'write it as a JSON array, e.g. ["EU", "rejects"] (in a CSV cell too)'
                if isinstance(v, str)
                else ""
            )
        for x in v:
            if ftype == "list[str]" and not isinstance(x, str):
                return f"field '{name}' should hold texts, got {type(x).__name__} {x!r:.40}", ""
            if ftype == "list[label]" and (p := bad_label(x)):
                return p
        return None
    ok = {
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        "bool": lambda x: isinstance(x, bool),
        "dict": lambda x: isinstance(x, dict),
    }
    if ftype in ok and not ok[ftype](v):
        hint = ""
        if ftype in ("int", "float") and isinstance(v, str):
            hint = (
                "write it with a '.' decimal point (3.5, not 3,5), or declare the field str: "
                "`parse: number` reads a number in text, decimal comma included"
                if re.fullmatch(r"\s*[-+]?\d*,\d+\s*", v)
                else f"give the row a number, or declare the field {{type: {ftype}, required: "
                "false} and leave the cell empty"
            )
        return f"field '{name}' should be {ftype}, got {type(v).__name__} {v!r:.40}", hint
    return None


def _closest(word: str, options: list[str]) -> str:
    return (difflib.get_close_matches(word, options, n=1, cutoff=0.0) or options)[0]


def check_row(
    raw: dict, row: dict, present: set, template: Task, columns: dict
) -> list[tuple[str, str, str]]:
    """Every (message, hint, field) for one mapped row: missing fields, wrong types, unknown labels,
    empty text."""
    out = []
    labels = template.label_set()
    tagging = bool(getattr(template, "tagging", False))
    for name, spec in template.fields.items():
        if name not in present:
            src = next((k for k, d in columns.items() if d == name and k in raw), name)
            if spec.required and src in raw:  # the column is there, this row's value is not
                out.append(
                    (
                        f"field '{name}' is empty in this row"
                        + (f" (column '{src}')" if src != name else ""),
                        "fill it in, or leave the row out; bad_rows: skip leaves such rows out",
                        name,
                    )
                )
            elif spec.required and (renamed := [k for k, d in columns.items() if d == name]):
                out.append(
                    (
                        f"missing field '{name}': column "
                        + " / ".join(f"'{k}'" for k in renamed)
                        + f" (mapped to '{name}' by columns) is not in this row",
                        "columns in the row: "
                        + ", ".join(map(str, raw))
                        + "; correct the column's name in the columns: mapping",
                        name,
                    )
                )
            elif spec.required:
                unmapped = [str(k) for k in raw if k not in columns and k not in template.fields]
                hint = (
                    "columns in the row: "
                    + ", ".join(map(str, raw))
                    + (
                        f"; map one with columns: {{{_closest(name, unmapped)}: {name}}}"
                        if unmapped
                        else ""
                    )
                )
                where = getattr(template, "where", None)
                origin = where(("fields", name))[0] if where else str(template.path)
                if origin != str(template.path):  # a field the template did not write itself
                    hint += (
                        f"; '{name}' is declared in {Path(origin).name}, which the template "
                        "includes"
                    )
                    free = [str(k) for k in raw if k not in columns]
                    alike = [  # a column that is a field of the same type (mood: label)
                        k
                        for k in free
                        if k in template.fields and template.fields[k].type == spec.type
                    ]
                    if free and not unmapped:  # every column is a field of the template's own
                        pick = alike[0] if alike else _closest(name, free)
                        hint += f": map a column to it with columns: {{{pick}: {name}}}"
                out.append((f"missing field '{name}'", hint, name))
            continue
        p = _type_problem(name, row[name], spec.type, spec.required, labels, tagging)
        if p:
            out.append((*p, name))
    if tagging and not out:
        out += _tag_count_problem(row, template)
    return out


def _tag_count_problem(row: dict, template: Task) -> list[tuple[str, str, str]]:
    """A tagging row needs one tag per token: the label field's list against the token list (the
    `tokens` field, else the first other list[str] field), as `ner_linearize` and scoring pair them."""
    tags = row.get(template.label_field) if template.label_field else None
    names = ["tokens"] + [n for n, f in template.fields.items() if f.type == "list[str]"]
    name = next(
        (n for n in names if n != template.label_field and isinstance(row.get(n), list)), None
    )
    if not isinstance(tags, list) or name is None:
        return []
    if len(row[name]) != len(tags):
        return [
            (
                f"'{name}' has {len(row[name])} items but '{template.label_field}' has {len(tags)}",
                "a tagged row needs exactly one tag per token: fix the row",
                template.label_field,
            )
        ]
    for tok, tag in zip(row[name], tags):
        # an entity's words are written `TYPE: words | TYPE: words`: an empty token or one holding
        # a separator would make a target that parses back into other entities
        if (
            tag != OUTSIDE
            and isinstance(tok, str)
            and (not tok.strip() or _ENTITY_BREAK.search(tok))
        ):
            return [
                (
                    f"token {tok!r} of an entity ({tag}) in '{name}' cannot be written as an entity "
                    "(empty, or holds | ; or a line break)",
                    "fix the token, or tag it O",
                    name,
                )
            ]
    return []


_ENTITY_BREAK = re.compile(r"[|;\n\r]")


def label_maps(template: Task, labels: dict) -> tuple[dict, dict | None]:
    """(labels, renames) to pass to `map_row` for `template` (renames only for NER tag lists)."""
    if not getattr(template, "tagging", False) or not labels:
        return labels, None
    whole, renames = split_tag_map(labels, template.entity_types)
    return whole, renames or None


class Rows(Sequence):
    """Mapped, validated rows of one task split (a lazy view: rows are mapped when indexed).

    `.skipped` counts bad rows left out, `.problems` holds the first MAX_SHOWN of them;
    `.label_skipped` counts the bad rows with a label outside the task's label set,
    `.render_skipped` those the template cannot render (`.render_first`: the first such failure,
    at the template's line). `.all_bad` is true when rows were read but every one was bad.
    """

    def __init__(
        self,
        backend: _Backend,
        keep: array,
        res: Resolved,
        template: Task,
        split: str,
        skipped: int,
        problems: list[Problem],
        label_skipped: int = 0,
        render_skipped: int = 0,
        render_first: Problem | None = None,
        read: int | None = None,
    ):
        self._b, self._keep, self._res, self._t = backend, keep, res, template
        # Rows looked at when reading stopped at a `limit` before the end (None: all of them).
        self.read = read
        self.split, self.skipped, self.problems = split, skipped, problems
        self.label_skipped = label_skipped
        self.render_skipped, self.render_first = render_skipped, render_first
        self.task = template.name
        self.desc = backend.desc
        # The maps in effect (the source override's, else the template's).
        self.labels, self.columns = res.labels, res.columns
        self._labels, self._renames = label_maps(template, res.labels)

    @property
    def all_bad(self) -> bool:
        """Rows were read, and every one of them was bad."""
        return len(self) == 0 and self.skipped > 0

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row, _ = map_row(
            self._b.get(self._keep[i]),
            self._res.columns,
            self._labels,
            self._t.label_field,
            self._t.fields,
            self._renames,
        )
        return row

    def location(self, i: int) -> tuple[str, int]:
        """(file or hub id, row number as reported in problems) of kept row `i`."""
        return self._b.location(self._keep[i])

    def summary(self) -> str:
        """One line for stderr: `task/split: N bad rows skipped (first: file:line: message)`."""
        text = f"{self.task}/{self.split}: {self.skipped} bad row{'s' if self.skipped != 1 else ''} skipped"
        if self.read is not None:
            text += f" among the {self.read} rows read (reading stopped at the limit)"
        return text + (f" (first: {self.problems[0].format()})" if self.problems else "")


def render_row(
    template: Task,
    rows: Sequence[dict],
    i: int,
    variant: str | Variant | None = None,
    **kw: Any,  # passed on to Task.render: row_id, split, epoch, with_output
) -> Record:
    """`template.render(rows[i], variant, **kw)`; when the template fails on this row, the error
    names the row (`file:row`) and the template line, so the user can tell a broken template from
    one odd row. (`load_rows` leaves rows out that fail, so this is rare: a render over budget.)"""
    try:
        return template.render(rows[i], variant, **kw)
    except T2TError as e:
        where = (
            rows.location(i)
            if hasattr(rows, "location")
            else (f"{getattr(template, 'name', 'task')} rows", i + 1)
        )
        raise type(e)([row_render_problem(where[0], where[1], e)]) from None


def row_render_problem(file: str, line: int | None, e: T2TError) -> Problem:
    """The problem of a row the template cannot render: at the row (`file:line`), naming the
    template's line and what failed there, with the template's hint for that cause."""
    p = e.problems[0]
    at = f"{p.file}:{p.line}" if p.line is not None else p.file
    return Problem(file, line, f"this row fails to render: {p.message} [{at}]", p.hint)


def load_rows(
    template: Task,
    source: SourceConfig | None,
    split: str,
    *,
    bad_rows: str = "skip",
    limit: int | None = None,
    seed: int | str | None = None,
    render: bool = True,
) -> Rows:
    """Rows of `split` for `template`, mapped and checked against its fields.

    `source=None` uses the bundled samples when they have the split, else the template's own source.
    A bad row is one that cannot be read, does not fit the template's fields, or (`render`) that
    some variant of the template cannot render; `bad_rows="fail"` raises DataError listing the bad
    rows, "skip" leaves them out and counts them (each problem at the row's `file:line`).
    `limit`: at most that many good rows; without `seed` the first ones (preview), with `seed` a
    random subset drawn with `(seed, task name)`, the same on every run and machine, in file order
    (training's `max_examples`, evaluation's `eval.limit`: data files are often sorted, by article
    or by label, so the first rows are no sample). Kept rows keep their file's row numbers.
    """
    res = resolve(template, source, split)
    read_problems: list[tuple[str, int, str]] = []
    backend = _open(res, split, read_problems)
    tally = RepeatTally(cap=None if bad_rows == "fail" else MAX_SHOWN)
    for f, n, msg in read_problems:
        tally.add(Problem(f, n, msg))
    bad = len(read_problems)
    label_bad = render_bad = 0
    render_first: Problem | None = None
    keep = array("q")
    labels, renames = label_maps(template, res.labels)
    looked, stopped = 0, False
    for index, raw in _candidates(backend, template.name, limit, seed):
        looked += 1
        row, present = map_row(
            raw, res.columns, labels, template.label_field, template.fields, renames
        )
        found = check_row(raw, row, present, template, res.columns)
        if found and any(v is None for v in raw.values()):
            keys = backend.written_keys(index)  # a None from `datasets`: missing or null?
            if keys is not None:
                raw = {k: v for k, v in raw.items() if k in keys}
                found = check_row(raw, row, present, template, res.columns)
        failure = None
        if not found and render:
            failure = _render_failure(template, row, str(len(keep)), split)
        if found or failure is not None:
            bad += 1
            file, line = backend.location(index)
            if failure is not None:
                render_bad += 1
                render_first = render_first or failure.problems[0]
                new = [row_render_problem(file, line, failure)]
            else:
                label_bad += any(
                    f in present and template.fields[f].type in ("label", "list[label]")
                    for _, _, f in found
                )
                new = [Problem(file, line, msg, hint) for msg, hint, _ in found[:3]]
            for p in new:
                tally.add(p)
        else:
            keep.append(index)
            if limit is not None and len(keep) >= limit:
                stopped = looked < len(backend)
                break
    if seed is not None:
        keep = array("q", sorted(keep))  # a sample keeps the file's order
    # In the file's order: lines that cannot be read are found before the rows are checked.
    problems = tally.problems(order=lambda p: (p.file != backend.desc, p.line or 0))
    if bad and bad_rows == "fail":
        shown = problems[:MAX_SHOWN]
        more = len(problems) - len(shown)
        shown.append(
            Problem(
                f"{template.name}/{split}",
                None,
                f"{bad} bad row(s) in {backend.desc}"
                + (f" ({more} more problems not shown)" if more > 0 else ""),
                "fix them, or skip them with bad_rows: skip (run config train.bad_rows / --bad-rows skip)",
            )
        )
        raise DataError(shown)
    return Rows(
        backend,
        keep,
        res,
        template,
        split,
        bad,
        problems[:MAX_SHOWN],
        label_bad,
        render_bad,
        render_first,
        read=looked if stopped else None,
    )


def _candidates(
    backend: _Backend, task: str, limit: int | None, seed: int | str | None
) -> Iterator[tuple[int, dict]]:
    """(row index, raw row) in the order `load_rows` examines them: file order, or with a `seed`
    and a `limit` below the number of rows, a seeded random order (`random` seeded with a string
    hashes it with SHA-512, so the order is the same in every process and on every machine)."""
    n = len(backend)
    index = 0
    if seed is None or limit is None or limit >= n:
        batches = backend.batches()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a value the reader cannot convert
                raise DataError(
                    Problem(backend.desc, index + 1, f"cannot read this row: {_first_line(e)}")
                ) from None
            for raw in batch:
                yield index, raw
                index += 1
        return
    order = list(range(n))
    random.Random(f"{seed}|{task}").shuffle(order)
    for index in order:
        try:
            raw = backend.get(index)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                Problem(*backend.location(index), f"cannot read this row: {_first_line(e)}")
            ) from None
        yield index, raw


def _render_failure(template: Task, row: dict, row_id: str, split: str) -> T2TError | None:
    """The error of the first variant that cannot render `row` (None when all of them can)."""
    for v in template.variants:
        try:
            template.render(row, v, row_id=row_id, split=split)
        except T2TError as e:
            return e
    return None
