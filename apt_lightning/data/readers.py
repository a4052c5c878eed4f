"""Reading one local data file: decode it, scan its structure, parse it with pandas, check it.

pandas stays the parser (so valid files read exactly as they always have), but it is never trusted to
notice broken files: a CSV quote left open makes it swallow the following lines into one field, and it
reports other faults without naming the file. So each text file is first decoded strictly (a bad byte
names its line and offset) and scanned the way pandas' C parser splits it, one record at a time: where
every record starts, how many fields it has, and whether a quoted field runs over line breaks. The scan's
faults are reported with the file and line; its record count is then checked against the rows pandas
returned, and ``validation.check_frame`` checks columns, text and labels, naming lines through the scan.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from apt_lightning.data.tasks import TaskSpec
from apt_lightning.data.validation import (
    DataEncodingError,
    EmptyDataError,
    LabelError,
    MalformedDataError,
    Rows,
    check_frame,
)

EXTENSIONS = ("tsv", "jsonl", "json", "csv", "parquet")
_START, _FIELD, _QUOTED, _QUOTE_IN_QUOTED = range(4)  # the C parser's states that matter here
_EMPTY_FIX = "write the split's rows into it, or point data_dir at the folder that has them"


def parse_file(path: Path, task: TaskSpec, what: str) -> tuple[pd.DataFrame, Rows]:
    """Decode and parse one data file (``what``: the split, for messages) with the structural checks
    (encoding, quoting, field counts, JSON lines); the column and label checks are `check_frame`'s."""
    ext = path.suffix[1:]
    if ext == "parquet":
        if path.stat().st_size == 0:
            raise EmptyDataError(path, "the file is empty (0 bytes)", _EMPTY_FIX, what=what)
        frame = _parse(path, what, "Parquet", lambda: pd.read_parquet(path))
        return frame, Rows(path, what, len(frame))
    if ext not in ("tsv", "csv"):
        return parse_json_file(path, what)
    text = _decode(path, what)
    if not text.strip():
        raise EmptyDataError(path, "the file is empty", _EMPTY_FIX, what=what)
    return _read_delimited(path, text, task, what, "\t" if ext == "tsv" else ",")


def parse_json_file(path: Path, what: str) -> tuple[pd.DataFrame, Rows]:
    """Decode and parse a .json / .jsonl file, a JSON array of records or JSON lines, with `parse_file`'s
    structural checks (encoding, empty file, a line or record that is not a JSON object)."""
    text = _decode(path, what)
    if not text.strip():
        raise EmptyDataError(path, "the file is empty", _EMPTY_FIX, what=what)
    if text.lstrip().startswith("["):
        return _read_json_array(path, text, what)
    return _read_json_lines(path, text, what)


def has_label(frame: pd.DataFrame, task: TaskSpec) -> bool:
    """Whether a parsed file has the task's label column (under its name or a GLUE TSV alias)."""
    return task.label_column in frame.columns or any(
        new == task.label_column and old in frame.columns for old, new in task.tsv_aliases.items()
    )


def read_split(path: Path, task: TaskSpec, what: str, labels_optional: bool = False) -> pd.DataFrame:
    """Read and check one data file; return the task's text columns and ``label`` (ids, or floats for
    regression). With `labels_optional`, a file without a label column (GLUE's public test files) passes
    the same checks and comes back without ``label``. Raises a ``DataFileError`` subclass."""
    frame, rows = parse_file(path, task, what)
    if labels_optional and not has_label(frame, task):
        placeholder = 0.0 if task.is_regression else 0
        return check_frame(frame.assign(**{task.label_column: placeholder}), task, rows).drop(columns="label")
    return check_frame(frame, task, rows)


def label_names_in(path: Path, task: TaskSpec, what: str) -> tuple[str, ...] | None:
    """The class names a classification file's string labels give (sorted), for a task given only
    ``num_labels``; None when its labels are class ids (or it has no label column: `read_split` says so).
    Their number must be the task's ``num_labels`` (else a ``LabelError`` naming the file)."""
    frame, rows = parse_file(path, task, what)
    frame = frame.rename(columns={o: n for o, n in task.tsv_aliases.items() if n not in frame.columns})
    if task.label_column not in frame.columns:
        return None
    labels = frame[task.label_column].dropna().astype(str).str.strip()
    labels = labels[labels != ""]
    if pd.to_numeric(labels, errors="coerce").notna().all():
        return None
    names = tuple(sorted(set(labels)))
    if len(names) != task.num_labels:
        raise rows.error(
            LabelError,
            f"column {task.label_column!r} has {len(names)} distinct labels {list(names)[:20]} but task "
            f"{task.name!r} has num_labels={task.num_labels}",
            "give the task's label_names (in class-id order), or correct num_labels",
            line=rows.header_line,
        )
    return names


def _decode(path: Path, what: str) -> str:
    """The file as text (UTF-8; a BOM, as MRPC's TSVs have, dropped); a bad byte names its line and offset."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line_start = data.rfind(b"\n", 0, offset) + 1
        raise DataEncodingError(
            path,
            f"byte 0x{data[offset]:02x} at byte offset {offset} (column {offset - line_start + 1}) is not "
            f"UTF-8 ({err.reason})",
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.tsv > out.tsv` for Latin-1)",
            line=data.count(b"\n", 0, offset) + 1,
            what=what,
        ) from None


def _parse(path: Path, what: str, kind: str, read: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    try:
        return read()
    except (ValueError, OSError) as err:  # pandas' ParserError and pyarrow's errors are among these
        raise MalformedDataError(
            path,
            f"not a readable {kind} file ({type(err).__name__}: {err})",
            f"re-export it as {kind}",
            what=what,
        ) from err


# ------------------------------------------------------------------------------ TSV and CSV
def _read_delimited(path: Path, text: str, task: TaskSpec, what: str, sep: str) -> tuple[pd.DataFrame, Rows]:
    quoted = sep == ","  # GLUE TSVs contain unbalanced quotes, so quoting is off for TSV
    starts, fields, header = _scan_delimited(path, text, sep, quoted, what)
    headerless = sep == "\t" and bool(task.tsv_columns) and not set(task.text_columns) <= set(header)
    expected = len(task.tsv_columns) if headerless else fields[0]
    for line, count in zip(starts[0 if headerless else 1 :], fields[0 if headerless else 1 :], strict=True):
        if count != expected:
            raise MalformedDataError(
                path, *_field_count_problem(sep, count, expected, headerless), line, what
            )
    if quoted:
        read = lambda: pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)  # noqa: E731
    else:
        read = lambda: pd.read_csv(  # noqa: E731
            io.StringIO(text),
            sep="\t",
            quoting=csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
            header=None if headerless else 0,
            names=task.tsv_columns if headerless else None,
        )
    frame = _parse(path, what, "CSV" if quoted else "TSV", read)
    data_lines = tuple(starts if headerless else starts[1:])
    return frame, Rows(path, what, len(data_lines), data_lines, header_line=None if headerless else starts[0])


def _field_count_problem(sep: str, count: int, expected: int, headerless: bool) -> tuple[str, str]:
    name = "tab" if sep == "\t" else "comma"
    reference = (
        f"the task's headerless GLUE TSV has {expected}" if headerless else f"the header has {expected}"
    )
    problem = f"{count} {name}-separated field(s) where {reference}"
    if count > expected:
        fix = (
            "replace the tab inside the text with a space (or remove the extra column)"
            if sep == "\t"
            else 'quote text that contains commas ("like, this") or remove the extra column'
        )
    else:
        fix = "fill in the missing field(s), or join the row if a line break inside its text split it"
    return problem, fix


def _scan_delimited(
    path: Path, text: str, sep: str, quoted: bool, what: str
) -> tuple[list[int], list[int], list[str]]:
    """Start line and field count of every record as pandas' C parser splits ``text`` (blank lines, and
    lines of spaces/tabs other than ``sep``, skipped), and the first record's fields (the header, unquoted
    only). A record that runs over several lines (an open quote) is an error naming where it opened."""
    lines = io.StringIO(text, newline="").readlines()  # split at \n, \r\n and \r, as pandas splits
    blank = " \t".replace(sep, "")
    starts: list[int] = []
    fields: list[int] = []
    for i, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if not body.strip(blank):
            continue
        count, state, opened = 1, _START, 0
        if quoted and '"' in body:
            count, state, opened = _scan_quoted(body, sep, count, state, opened)
        else:
            count += body.count(sep)
        if state == _QUOTED:  # the quote is still open at the line break: pandas would read on
            raise _open_quote(path, what, lines, i, opened, sep)
        starts.append(i + 1)
        fields.append(count)
    header = lines[starts[0] - 1].rstrip("\r\n").split(sep) if starts else []
    return starts, fields, header


def _scan_quoted(body: str, sep: str, count: int, state: int, opened: int) -> tuple[int, int, int]:
    """Advance the field count and quote state over one line (CSV quoting: "" inside quotes is a quote)."""
    for col, ch in enumerate(body, 1):
        if state == _START:
            if ch == '"':
                state, opened = _QUOTED, col
            elif ch == sep:
                count += 1
            else:
                state = _FIELD
        elif state == _FIELD:
            if ch == sep:
                count, state = count + 1, _START
        elif state == _QUOTED:
            if ch == '"':
                state = _QUOTE_IN_QUOTED
        elif ch == '"':  # "" inside a quoted field
            state = _QUOTED
        elif ch == sep:
            count, state = count + 1, _START
        else:  # text after the closing quote joins the field, as pandas does
            state = _FIELD
    return count, state, opened


def _open_quote(
    path: Path, what: str, lines: list[str], start: int, opened: int, sep: str
) -> MalformedDataError:
    """The error for a quoted field opened on line ``start + 1`` that the line does not close: how many
    lines pandas would swallow into it (up to the next quote that closes it, or the end of the file)."""
    count, state, _ = 1, _QUOTED, opened
    end = start + 1
    while end < len(lines) and state == _QUOTED:
        count, state, _ = _scan_quoted(lines[end].rstrip("\r\n"), sep, count, _QUOTED, 0)
        end += 1
    if state == _QUOTED and end == start + 1:
        swallowed = "is never closed: the file ends first"
    elif state == _QUOTED:
        swallowed = f"runs to the end of the file, swallowing the {end - start - 1} line(s) after it"
    else:
        swallowed = f"swallows {end - start - 1} line(s) into one field (it closes on line {end})"
    return MalformedDataError(
        path,
        f"unclosed quote opened here (column {opened}) {swallowed}",
        'fix the quoting: close the quote on this line, write a quote inside a quoted field as "", or '
        "don't start an unquoted field with a quote; if the text really spans lines, replace its line "
        "breaks with spaces",
        line=start + 1,
        what=what,
    )


# ------------------------------------------------------------------------------ JSON
def _read_json_lines(path: Path, text: str, what: str) -> tuple[pd.DataFrame, Rows]:
    lines = []
    for number, line in enumerate(text.split("\n"), 1):  # pandas splits JSON lines at \n, skips blanks
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MalformedDataError(
                path,
                f"not valid JSON ({err.msg} at column {err.colno})",
                'write one JSON object per line, e.g. {"sentence": "a fine film", "label": 1}',
                line=number,
                what=what,
            ) from None
        if not isinstance(record, dict):
            raise MalformedDataError(
                path,
                f"a JSON {type(record).__name__}, not an object",
                'write one JSON object per line, e.g. {"sentence": "a fine film", "label": 1}',
                line=number,
                what=what,
            )
        lines.append(number)
    read = lambda: pd.read_json(io.StringIO(text), lines=True, dtype=False, convert_dates=False)  # noqa: E731
    return _parse(path, what, "JSON lines", read), Rows(path, what, len(lines), tuple(lines))


def _read_json_array(path: Path, text: str, what: str) -> tuple[pd.DataFrame, Rows]:
    fix = 'write a JSON array of objects, e.g. [{"sentence": "a fine film", "label": 1}], or JSON lines'
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedDataError(
            path, f"not valid JSON ({err.msg} at column {err.colno})", fix, line=err.lineno, what=what
        ) from None
    if not isinstance(records, list):
        raise MalformedDataError(path, f"a JSON {type(records).__name__}, not an array", fix, what=what)
    for index, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise MalformedDataError(
                path, f"record {index} is a JSON {type(record).__name__}, not an object", fix, what=what
            )
    read = lambda: pd.read_json(io.StringIO(text), dtype=False, convert_dates=False)  # noqa: E731
    return _parse(path, what, "JSON", read), Rows(path, what, len(records), unit="record")
