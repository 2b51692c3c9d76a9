"""Reading data files (and Hugging Face datasets) into raw examples.

`read_examples` turns a .jsonl/.json, .csv/.tsv or .parquet file into a list of
{"text": <raw>, "label": <raw>, "row": int} dicts, untouched apart from picking
the two columns; cleaning happens in clean.py. Every problem with the file is
raised as a TunelabError naming the file, the line and the config key to fix,
because users meet these errors before anything else in tunelab.

`read_examples` and `read_records` are where every task's rows come from, so they also read the dataset sources of
hub.py (hf://org/name, a save_to_disk folder, an in-memory dataset) with the same checks and messages; a dataset's
rows are named by their index in the split.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import math
import numbers
import re
from pathlib import Path

from ..errors import TunelabError
from . import hub

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

FORMAT_HINTS = {
    ".jsonl": "one JSON object per line, e.g. {\"text\": \"...\", \"label\": \"pos\"}",
    ".json": "one JSON object per line (JSON lines), e.g. {\"text\": \"...\", \"label\": \"pos\"}",
    ".csv": "a header row naming the columns (e.g. text,label) followed by one row per example",
    ".tsv": "a tab-separated header row naming the columns (e.g. text<TAB>label) followed by one row per example",
    ".parquet": "a table with one row per example and a text and a label column",
}


def read_examples(path: str | Path, text_field: str = "text", label_field: str | None = "label",
                  key: str | None = None, pair_field: str | None = None, label_lists: bool = False,
                  options=None, origin: dict | None = None) -> list[dict]:
    """Read one data file or dataset source. `key` (e.g. "data.train") is the config key named in error messages.
    With label_field=None (texts to predict) no label column is needed and every label is None. `options`: the data
    section, for a dataset source's config, revision and split; `origin`, when given, is filled with where a
    dataset came from (its Hub commit, ...) for the data report."""
    if hub.is_source(path):
        split = hub.open_split(path, key, options)
        _record_origin(origin, split)
        examples = []
        for i, r in split.rows(dataset_columns(split, text_field, label_field, pair_field)):
            ex = {"text": r[text_field], "label": r[label_field] if label_field else None, "row": i}
            if pair_field:
                ex["pair"] = r[pair_field]
            examples.append(ex)
        if not examples:
            raise TunelabError(f"{split.what} has no rows.")
        check_types(examples, split.what, text_field, label_field, "row", pair_field, label_lists)
        return examples
    p = resolve_path(path, key)
    what = describe(path, key)
    ext = p.suffix.lower()
    if p.stat().st_size == 0:
        raise TunelabError(f"{what} is empty. It should hold {FORMAT_HINTS[ext]}.")
    if ext == ".parquet":
        examples = _read_parquet(p, what, text_field, label_field, pair_field)
    else:
        text = decode_utf8(p.read_bytes(), path, what)
        if ext in (".jsonl", ".json"):
            examples = _read_jsonl(text, path, what, text_field, label_field, pair_field)
        else:
            examples = _read_delimited(text, what, "\t" if ext == ".tsv" else ",", text_field, label_field, pair_field)
    if not examples:
        raise TunelabError(f"{what} has no data rows. It should hold {FORMAT_HINTS[ext]}.")
    check_types(examples, what, text_field, label_field, "row" if ext == ".parquet" else "line", pair_field,
                 label_lists)
    return examples


def read_records(path: str | Path, key: str | None = None, options=None, origin: dict | None = None) -> list[dict]:
    """Every column of every row, as {"row": n, "record": {...}} (nested JSON values kept), for tasks whose rows are
    more than a text and a label (sft, causal_lm). A .txt file gives one {"text": paragraph} per blank-line-separated
    paragraph, `row` being the line it starts on. A dataset source (`options`, `origin`: as for read_examples) gives
    its rows by index."""
    if hub.is_source(path):
        split = hub.open_split(path, key, options)
        _record_origin(origin, split)
        return [{"row": i, "record": r} for i, r in split.rows()]
    p = resolve_path(path, key, SUPPORTED_EXTENSIONS + (".txt",))
    what = describe(path, key)
    ext = p.suffix.lower()
    if p.stat().st_size == 0:
        raise TunelabError(f"{what} is empty. It should hold {FORMAT_HINTS.get(ext, 'text')}.")
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            check_unique_columns(pq.read_schema(p).names, "the Parquet schema", what)
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise TunelabError(f"{what} could not be read as Parquet: {str(e).rstrip('.')}. Re-export it (e.g. pandas `df.to_parquet`).") from None
        return [{"row": i, "record": r} for i, r in enumerate(rows, start=1)]
    text = decode_utf8(p.read_bytes(), path, what)
    if ext == ".txt":
        out, start, lines = [], None, []
        for line_no, line in enumerate(text.split("\n") + [""], start=1):
            if line.strip():
                start = start or line_no
                lines.append(line.rstrip())
            elif lines:
                out.append({"row": start, "record": {"text": "\n".join(lines)}})
                start, lines = None, []
        return out
    if ext in (".jsonl", ".json"):
        return [{"row": r["row"], "record": r["record"]} for r in _jsonl_objects(text, path, what)]
    delimiter = "\t" if ext == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = []
    try:
        if reader.fieldnames:  # DictReader keeps the last of two equal column names without a word
            check_unique_columns(reader.fieldnames, f"line {reader.line_num} (the header row)", what)
        for i, r in enumerate(reader, start=1):
            # DictReader files surplus fields under the key None and fills missing ones with None.
            if None in r or None in r.values():
                n = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None) or [])
                raise TunelabError(
                    f"{what} line {reader.line_num} has {n} field(s) but the header has {len(reader.fieldnames)}. "
                    f"Quote fields that contain the delimiter {'(tab)' if delimiter == chr(9) else repr(delimiter)}, "
                    f"newlines or quotes, and check for an unclosed quote at or before that line."
                )
            out.append({"row": i, "record": dict(r)})
    except csv.Error as e:
        raise TunelabError(f"{what} could not be parsed near line {reader.line_num}: {e}. Fix that record.") from None
    return out


def dataset_columns(split: hub.Split, text_field: str, label_field: str | None, pair_field: str | None = None) -> list:
    """The columns read_examples reads from a dataset, or the error naming the one it lacks and the key to set."""
    required = _required(text_field, label_field, pair_field)
    for field, config_key in required:
        if field not in split.columns:
            raise _missing_column(split.what, field, config_key, split.columns, "the dataset")
    return [field for field, _ in required]


def _record_origin(origin: dict | None, split: hub.Split) -> None:
    if origin is not None:
        origin.update(split.origin)


def _jsonl_objects(text: str, path: str | Path, what: str) -> list[dict]:
    check_not_array(text, path, what)
    # split("\n") rather than splitlines(): JSON strings may legally contain raw U+2028 etc.
    return [{"row": line_no, "record": parse_json_line(line, line_no, what)}
            for line_no, line in enumerate(text.split("\n"), start=1) if line.strip()]


def check_not_array(text: str, path: str | Path, what: str) -> None:
    """`text`: the file's text, or its first non-blank line."""
    if text.lstrip().startswith("["):
        raise TunelabError(
            f"{what} holds a JSON array, but tunelab reads JSON lines: one object per line. "
            f"Convert it, e.g. `jq -c '.[]' {path} > {Path(path).with_suffix('.jsonl')}`."
        )


class DuplicateKey(Exception):
    """Raised by `decode_json`: the key an object gives twice (args[0])."""


def _object_without_repeats(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


# json.loads keeps the last of two equal keys without a word; this decoder refuses them. One decoder for every line:
# json.loads(line, object_pairs_hook=...) would build a new one per call, which costs more than the hook itself.
decode_json = json.JSONDecoder(object_pairs_hook=_object_without_repeats).decode
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(value) -> tuple[str, str] | None:
    """(where, the \\uXXXX escape) of the first string or key in a parsed JSON value that holds a lone UTF-16
    surrogate: json accepts the escape "\\ud800", but the string cannot be encoded as UTF-8 (tokenizers and JSON
    writers fail on it later). `where` is the field's path, e.g. 'messages' item 2 'content'."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str) and _SURROGATE.search(v):
            return path or "the value", f"\\u{ord(_SURROGATE.search(v).group()):04x}"
        if isinstance(v, dict):
            stack += [(k, f"a field name{' in ' + path if path else ''}") for k in v]
            stack += [(x, f"{path} {k!r:.40}".strip()) for k, x in reversed(v.items())]
        elif isinstance(v, list):
            stack += [(x, f"{path} item {i}".strip()) for i, x in reversed(list(enumerate(v, start=1)))]
    return None


def parse_json_line(line: str, line_no: int, what: str) -> dict:
    """One JSON-lines row as a dict, or the error naming its line: not JSON, not an object, a key given twice in an
    object, or a lone surrogate escape in a string."""
    try:
        obj = decode_json(line)
    except DuplicateKey as e:
        raise duplicate_key(e, f"{what} line {line_no}", "on that line") from None
    except json.JSONDecodeError as e:
        raise TunelabError(
            f"{what} line {line_no} is not valid JSON: {e.msg} (column {e.colno}). "
            f"Each line must be one JSON object, e.g. {{\"text\": \"...\", \"label\": \"pos\"}}; fix or remove that line."
        ) from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, or arrays nested too deep to parse
        problem = "lists or objects nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise TunelabError(
            f"{what} line {line_no} cannot be read: {problem}. Each line must be one JSON object, "
            f"e.g. {{\"text\": \"...\", \"label\": \"pos\"}}; fix or remove that line."
        ) from None
    if not isinstance(obj, dict):
        raise TunelabError(
            f"{what} line {line_no} is a JSON {type(obj).__name__}, not an object. "
            f"Each line must be one JSON object, e.g. {{\"text\": \"...\", \"label\": \"pos\"}}; fix or remove that line."
        )
    if may_hold_surrogates(line):
        check_no_surrogates(obj, f"{what} line {line_no}")
    return obj


def duplicate_key(e: DuplicateKey, where: str, there: str) -> TunelabError:
    return TunelabError(
        f"{where} gives the key '{field_names([str(e.args[0])])}' twice in one object; JSON readers keep only one of "
        f"the two (Python's json the last), so the other is lost without a word. Remove or rename one of them {there}.")


def may_hold_surrogates(json_text: str) -> bool:
    """Whether parsing `json_text` can give a string with a surrogate: only a \\uD800-\\uDFFF escape can (UTF-8 text
    cannot encode one). A cheap test, so the walk over the parsed value is only made for such text."""
    return "\\u" in json_text and _SURROGATE_ESCAPE.search(json_text) is not None


def check_no_surrogates(value, where: str) -> None:
    """The error naming the field of a parsed JSON value that holds a lone surrogate, if one does."""
    found = lone_surrogate(value)
    if found:
        field, escape = found
        raise TunelabError(
            f"{where} holds a lone surrogate escape ({escape}) in {field}: half of a UTF-16 pair, which is not a "
            f"character and cannot be encoded as UTF-8 text. The program that wrote the file cut a character (often "
            f"an emoji) in two or wrote binary data as text; fix that string, or remove the row.")


def resolve_path(path: str | Path, key: str | None = None, extensions: tuple[str, ...] = SUPPORTED_EXTENSIONS) -> Path:
    """Check the file exists and has a supported extension; return it as given (relative to cwd)."""
    p = Path(path).expanduser()
    what = describe(path, key)
    if not p.exists():
        raise TunelabError(
            f"{what} does not exist (looked at {p.absolute()}). Check the path"
            f"{' in ' + key if key and key.startswith('data.') else ''}; relative paths are taken from the current directory ({Path.cwd()})."
        )
    if not p.is_file():
        raise TunelabError(f"{what} is not a file (looked at {p.absolute()}). Point {key or 'it'} at a data file, or at "
                           f"a folder written by a Hugging Face dataset's save_to_disk (this folder holds no "
                           f"dataset_dict.json or state.json).")
    if p.suffix.lower() not in extensions:
        raise TunelabError(
            f"{what} has an unsupported extension '{p.suffix or '(none)'}'. Supported: "
            f"{', '.join(extensions)} (.json must be JSON lines). Convert the file or rename it if it already is one of these."
        )
    return p


def field_names(keys) -> str:
    """Column / field names for a message, comma-separated: a name with a newline or other control character is
    shown escaped, so the message stays one paragraph."""
    return ", ".join(k if str(k).isprintable() else repr(str(k))[1:-1] for k in keys) or "none"


def describe(path: str | Path, key: str | None, options=None) -> str:
    """How messages name a data source: "Data file 'x.jsonl' (data.train)", or for a dataset
    "Dataset 'hf://org/name' split 'train' (data.train)" (the split `options` choose for `key`)."""
    if hub.is_source(path):
        return hub.describe(path, key, hub.split_for(key, options))
    return f"Data file '{path}' ({key})" if key else f"Data file '{path}'"


def decode_utf8(data: bytes, path: str | Path, what: str, first_line: int = 1, first_offset: int = 0) -> str:
    """`data` decoded; `first_line` / `first_offset`: where it starts in the file, when it is a part of it."""
    # UTF-16/32 (what Excel's "Unicode text" and PowerShell write) and binary files would otherwise be reported as
    # a stray byte with advice for Latin-1, which does not fit them.
    wide = next((name for name, bom in (("UTF-32", codecs.BOM_UTF32_LE), ("UTF-32", codecs.BOM_UTF32_BE),
                                        ("UTF-16", codecs.BOM_UTF16_LE), ("UTF-16", codecs.BOM_UTF16_BE))
                 if data.startswith(bom)), None)
    if wide and first_offset == 0:
        raise TunelabError(
            f"{what} is encoded as {wide} (it starts with a {wide} byte-order mark), not UTF-8. Re-save it as UTF-8, "
            f"e.g. `iconv -f {wide} -t UTF-8 {path} > fixed{Path(path).suffix}`, or choose UTF-8 when exporting it."
        )
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + first_line
        raise TunelabError(
            f"{what} holds a NUL byte (line {line}, byte offset {nul + first_offset} in the file), so it is binary or UTF-16/UTF-32 "
            f"text, not UTF-8 text. Check that it is the data file you meant, or re-save it as UTF-8 (e.g. "
            f"`iconv -f UTF-16 -t UTF-8 {path} > fixed{Path(path).suffix}`)."
        )
    # A BOM is what Excel and Notepad write at the start of "UTF-8" files; accept it silently.
    bom = len(codecs.BOM_UTF8) if first_offset == 0 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + bom
        line = data.count(b"\n", 0, offset) + first_line
        column = offset - (data.rfind(b"\n", 0, offset) + 1)
        raise TunelabError(
            f"{what} is not valid UTF-8: line {line}, byte {column + 1} of that line (byte offset {offset + first_offset} "
            f"in the file) is 0x{data[offset]:02x}. Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed{Path(path).suffix}` "
            f"if it is Latin-1, or choose UTF-8 when exporting it."
        ) from None


def _read_jsonl(text: str, path: str | Path, what: str, text_field: str, label_field: str,
                pair_field: str | None = None) -> list[dict]:
    examples = []
    for item in _jsonl_objects(text, path, what):
        examples.append(example_of(item["record"], item["row"], not examples, what, text_field, label_field, pair_field))
    return examples


def example_of(obj: dict, line_no: int, first: bool, what: str, text_field: str, label_field: str | None,
               pair_field: str | None = None) -> dict:
    """{"text", "label", "row"} (and "pair") of one JSON-lines object, or the error naming the field it lacks."""
    for field, config_key in _required(text_field, label_field, pair_field):
        if field not in obj:
            if first:
                raise _missing_column(what, field, config_key, list(obj), f"the first object (line {line_no})")
            raise TunelabError(
                f"{what} line {line_no} has no '{field}' field (its fields: {field_names(obj)}), "
                f"although earlier lines do. Every line needs '{field}'; add it there or remove the line. "
                f"If '{field}' is the wrong name altogether, set {config_key}."
            )
    ex = {"text": obj[text_field], "label": obj.get(label_field) if label_field else None, "row": line_no}
    if pair_field:
        ex["pair"] = obj[pair_field]
    return ex


def _read_delimited(text: str, what: str, delimiter: str, text_field: str, label_field: str,
                    pair_field: str | None = None) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    examples: list[dict] = []
    columns: tuple[int, int | None] | None = None
    line_before = 0  # reader.line_num after the previous record, so a record starts on line_before + 1
    try:
        for record in reader:
            start = line_before + 1
            line_before = reader.line_num
            if is_blank(record):
                continue
            if columns is None:
                columns = header_columns(record, start, what, text_field, label_field, pair_field)
                continue
            check_width(record, columns, start, what, delimiter)
            examples.append(from_columns(record, columns, start))
    except csv.Error as e:
        raise csv_error(e, reader.line_num, what, delimiter) from None
    if columns is None:
        raise no_header(what, delimiter)
    return examples


def is_blank(record: list[str]) -> bool:
    return not record or (len(record) == 1 and not record[0].strip())


def header_columns(record: list[str], start: int, what: str, text_field: str, label_field: str | None,
                   pair_field: str | None = None):
    """(width, text column, label column or None, pair column or None) of a CSV header row, or the error naming
    the missing column."""
    header = [h.strip() for h in record]
    check_unique_columns(header, f"line {start} (the header row)", what)
    for field, config_key in _required(text_field, label_field, pair_field):
        if field not in header:
            raise _missing_column(what, field, config_key, header, f"the header row (line {start})")
    return (len(header), *(header.index(f) if f else None for f in (text_field, label_field, pair_field)))


def check_unique_columns(header: list[str], where: str, what: str) -> None:
    """A header naming one column twice is an error: readers would take one of the two without a word. Unnamed
    columns (empty names, e.g. from trailing delimiters) are never read, so they may repeat."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        if name and name in seen:
            raise TunelabError(
                f"{what}: {where} names the column '{field_names([name])}' twice (columns "
                f"{seen[name]} and {i}), so which of the two holds the data is a guess. Rename or remove one of them.")
        seen[name] = i


def from_columns(record: list[str], columns: tuple, start: int) -> dict:
    _, text_col, label_col, pair_col = columns
    ex = {"text": record[text_col], "label": record[label_col] if label_col is not None else None, "row": start}
    if pair_col is not None:
        ex["pair"] = record[pair_col]
    return ex


def check_width(record: list[str], columns: tuple, start: int, what: str, delimiter: str) -> None:
    if len(record) != columns[0]:
        raise TunelabError(
            f"{what} line {start} has {len(record)} field(s) but the header has {columns[0]}. "
            f"Quote fields that contain the delimiter {'(tab)' if delimiter == chr(9) else repr(delimiter)}, "
            f"newlines or quotes, and check for an unclosed quote at or before that line."
        )


def csv_error(e: csv.Error, line_num: int, what: str, delimiter: str) -> TunelabError:
    return TunelabError(
        f"{what} could not be parsed as {'TSV' if delimiter == chr(9) else 'CSV'} near line {line_num}: {e}. "
        f"Fix that record (quotes must be balanced; NUL bytes are not allowed)."
    )


def no_header(what: str, delimiter: str) -> TunelabError:
    return TunelabError(f"{what} has no header row. The first line must name the columns, e.g. text{delimiter}label.")


def _read_parquet(p: Path, what: str, text_field: str, label_field: str, pair_field: str | None = None) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(p).names
        check_unique_columns(columns, "the Parquet schema", what)
        required = _required(text_field, label_field, pair_field)
        for field, config_key in required:
            if field not in columns:
                raise _missing_column(what, field, config_key, columns, "the Parquet schema")
        table = pq.read_table(p, columns=[field for field, _ in required])
    except (pa.ArrowException, OSError) as e:
        raise TunelabError(
            f"{what} could not be read as Parquet: {str(e).rstrip('.')}. Check that it is a complete Parquet file "
            f"(re-export it, e.g. with pandas `df.to_parquet(...)`), or give it the extension of its real format."
        ) from None
    texts = table.column(text_field).to_pylist()
    labels = table.column(label_field).to_pylist() if label_field else [None] * len(texts)
    examples = [{"text": t, "label": y, "row": i} for i, (t, y) in enumerate(zip(texts, labels), start=1)]
    if pair_field:
        for ex, pair in zip(examples, table.column(pair_field).to_pylist()):
            ex["pair"] = pair
    return examples


def _required(text_field: str, label_field: str | None, pair_field: str | None = None) -> list[tuple[str, str]]:
    """(column, config key) pairs a file must have."""
    return [(text_field, "data.text_field")] + ([(pair_field, "data.text_pair_field")] if pair_field else []) + \
        ([(label_field, "data.label_field")] if label_field else [])


def _missing_column(what: str, field: str, config_key: str, found: list[str], where: str) -> TunelabError:
    found_text = field_names(f"'{c}'" for c in found)
    close = difflib.get_close_matches(field, found, n=1, cutoff=0.6)
    close += [c for c in found if c.lower() == field.lower() and c not in close]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    kind = {"data.text_field": "text", "data.text_pair_field": "pair"}.get(config_key, "label")
    option = f"--{kind}-field"
    # Training data is configured by recipe keys; files given to a command are named by its options.
    fix = (f"Set {config_key} to the column that holds the {kind}{hint}, e.g. {config_key}={close[0] if close else '<column>'} "
           f"({option} for `tunelab data inspect`)." if "(data." in what else
           f"Pass {option} with the column that holds the {kind}{hint}.")
    return TunelabError(f"{what} has no '{field}' column in {where}; columns found: {found_text}. {fix}")


def check_types(examples: list[dict], what: str, text_field: str, label_field: str, unit: str,
                 pair_field: str | None = None, label_lists: bool = False) -> None:
    # A list/dict label means a multi-label or structured file; single-label classification
    # would otherwise silently treat "['a', 'b']" as a class of its own. Likewise for texts, and an
    # infinite label (JSON's Infinity) would become a class named "inf".
    for ex in examples:
        for field, key, value in ((text_field, "text_field", ex["text"]), (pair_field, "text_pair_field", ex.get("pair"))):
            if isinstance(value, (list, dict, bytes)):
                raise TunelabError(
                    f"{what} {unit} {ex['row']} has a {type(value).__name__} in '{field}': {value!r:.80}. "
                    f"Texts must be strings; fix that row or point data.{key} at the column that holds the text."
                )
        label = ex["label"]
        if isinstance(label, numbers.Real) and not isinstance(label, numbers.Integral) and math.isinf(label):
            raise TunelabError(
                f"{what} {unit} {ex['row']} has an infinite number ({'-' if label < 0 else ''}Infinity) in "
                f"'{label_field}'. Labels must be class names or integers; fix that row or point data.label_field at "
                f"the column that holds the label."
            )
        if isinstance(label, (list, dict)) and not (label_lists and isinstance(label, list)):
            raise TunelabError(
                f"{what} {unit} {ex['row']} has a {type(ex['label']).__name__} in '{label_field}': {ex['label']!r:.80}. "
                f"Labels must be single strings or integers (one class per example); fix that row or point "
                f"data.label_field at a single-valued column (task.type multilabel takes lists of labels)."
            )


def absolute(path) -> str | None:
    """A file's absolute path for the data report; a Hub id or an in-memory dataset's name as it is."""
    if path is None or hub.kind(path) in ("hub", "memory"):
        return path
    return str(Path(path).expanduser().absolute())
