"""Labels for a flat folder of images: from a CSV table (the dog breeds' `labels.csv`, planet's
space-separated tags) or from the file names (the pets' `great_pyrenees_173.jpg`).

Reading the table is strict, because a wrong label trains silently: a missing column, a row with too
few fields, an empty label where one label per image is expected, a file named twice or a file that
is not a text CSV stops with one line naming the file, the row and the fix. A row whose image is
missing is a bad file (`data.bad_files`), as an undecodable one is. Nothing here reads image bytes.

A label column whose header is `tags` (planet's `image_name,tags`) holds space-separated tags when
data.label_delim is not set: a multi-label task. A header row is used when a column is given by name; with column indices (the default: the first
two columns) the first row is taken as a header when its file does not exist and the second row's
does (`id,breed` above `000bec180eb18c7604dcecc8fe0dba07,boston_bull`).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from disttrain.data.decode import IMAGE_EXTENSIONS
from disttrain.data.folder import BadFile, DataError

TRUE = {"1", "true", "yes", "y", "t", "valid", "is_valid"}
FALSE = {"0", "false", "no", "n", "f", "train", ""}


@dataclass
class LabelledFiles:
    """The labelled images of a flat folder, in the table's row order (or the folder's sorted order)."""

    folder: Path
    files: list[str]
    """File names relative to `folder`."""
    tags: list[tuple[str, ...]]
    """Each file's label (one) or labels (multi-label: any number, sorted, distinct)."""
    multi_label: bool
    valid: list[bool] | None = None
    """Each file's `valid_col` (None without one)."""
    missing: list[BadFile] | None = None
    """Rows whose file does not exist (counted and listed as bad files)."""
    unlabelled: int = 0
    """Images in `folder` that no row names (not used)."""

    @property
    def classes(self) -> list[str]:
        """Every label that occurs, sorted."""
        return sorted({tag for tags in self.tags for tag in tags})


def flat_images(folder: Path) -> list[str]:
    """The image files directly in `folder` (by extension), sorted."""
    if not folder.is_dir():
        raise DataError(f"data.images: {folder} is not a folder (it should hold the images the labels name)")
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)


def _column(key: str, wanted: int | str, header: list[str] | None, width: int, table: Path) -> int:
    if isinstance(wanted, int):
        if not 0 <= wanted < width:
            raise DataError(f"{table}: data.{key}={wanted} but its rows have {width} column(s) (0-based); set data.{key} to one of 0..{width - 1}")
        return wanted
    if header is None or wanted not in header:
        have = ", ".join(header) if header else "no header row"
        raise DataError(f"{table}: no column {wanted!r} for data.{key} (its header: {have}); set data.{key} to a column name or a 0-based index")
    return header.index(wanted)


def _rows(table: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row."""
    try:
        text = table.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data.labels: {table} does not exist; set data.labels to the CSV file (relative to data.root, or absolute)") from None
    except UnicodeDecodeError:
        raise DataError(f"{table}: is not a text CSV (not UTF-8); data.labels must name a CSV file of file names and labels") from None
    if "\0" in text:
        raise DataError(f"{table}: is not a text CSV (it holds NUL bytes); data.labels must name a CSV file of file names and labels")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as err:
        raise DataError(f"{table}: line {reader.line_num}: not valid CSV ({err}); fix the quoting of that row") from None


def read_label_table(table: Path, folder: Path, fname_col: int | str = 0, label_col: int | str = 1, suffix: str = "",
                     label_delim: str | None = None, valid_col: int | str | None = None) -> LabelledFiles:
    """The rows of `table` as labelled files of `folder` (see the module docstring for what fails)."""
    rows = _rows(table)
    if not rows:
        raise DataError(f"{table}: holds no rows; it should have a file name and a label per image")
    present = set(flat_images(folder)) if folder.is_dir() else None
    if present is None:
        raise DataError(f"data.images: {folder} is not a folder (it should hold the images {table.name} names)")
    named = any(isinstance(c, str) for c in (fname_col, label_col, valid_col))
    first = rows[0][1]
    header = None
    if named:
        header = [cell.strip() for cell in first]
    elif len(rows) > 1 and isinstance(fname_col, int) and fname_col < len(first):
        second = rows[1][1]
        if fname_col < len(second) and first[fname_col].strip() + suffix not in present and second[fname_col].strip() + suffix in present:
            header = [cell.strip() for cell in first]
    body = rows[1:] if header is not None else rows
    width = len(header) if header is not None else len(first)
    f_index = _column("fname_col", fname_col, header, width, table)
    l_index = _column("label_col", label_col, header, width, table)
    v_index = None if valid_col is None else _column("valid_col", valid_col, header, width, table)
    need = max(i for i in (f_index, l_index, v_index) if i is not None) + 1
    if label_delim is None and header is not None and header[l_index].lower() == "tags":
        label_delim = " "  # planet's `image_name,tags`: a tags column holds space-separated tags
    multi = label_delim is not None
    out = LabelledFiles(folder, [], [], multi, [] if v_index is not None else None, [])
    seen: dict[str, int] = {}
    for line, row in body:
        where = f"{table}: row at line {line}"
        if len(row) < need:
            raise DataError(f"{where} has {len(row)} field(s), the columns used need {need}; fix that row (is the delimiter a comma?)")
        name = row[f_index].strip() + suffix
        if not row[f_index].strip():
            raise DataError(f"{where} has an empty file name (column {f_index}); fill it or remove the row")
        if name in seen:
            raise DataError(f"{where} names {name}, as the row at line {seen[name]} does; a file may be listed once: remove one")
        seen[name] = line
        raw = row[l_index].strip()
        if multi:
            tags = tuple(sorted({t for t in (p.strip() for p in raw.split(label_delim)) if t}))
        else:
            if not raw:
                raise DataError(f"{where} has an empty label for {name} (column {l_index}); give it one, remove the row, "
                                "or set data.label_delim for several (or no) labels per image")
            tags = (raw,)
        if v_index is not None:
            flag = row[v_index].strip().lower()
            if flag not in TRUE | FALSE:
                raise DataError(f"{where}: data.valid_col value {row[v_index]!r} is not a boolean; use true/false (or 1/0)")
            out.valid.append(flag in TRUE)
        if name not in present:
            out.missing.append(BadFile(str(folder / name), f"listed in {table.name} (line {line}) but not in {folder}"))
        out.files.append(name)
        out.tags.append(tags)
    if not out.files:
        raise DataError(f"{table}: holds a header and no rows; it should have a file name and a label per image")
    if len(out.missing) == len(out.files):
        hint = f" (its names with data.suffix={suffix!r}; ids without an extension need data.suffix, e.g. .jpg)" if not suffix else ""
        raise DataError(f"{table}: none of its {len(out.files)} file(s) is in {folder}{hint}; check data.images and data.suffix")
    out.unlabelled = len(present - set(out.files))
    return out


def labels_from_names(folder: Path, pattern: str) -> tuple[LabelledFiles, list[BadFile]]:
    """The image files of `folder`, labelled by the first group of `pattern` searched in each name;
    the files it does not match are returned apart (an error or a counted skip: data.bad_files)."""
    regex = re.compile(pattern)
    out, unmatched = LabelledFiles(folder, [], [], multi_label=False), []
    for name in flat_images(folder):
        found = regex.search(name)
        label = found.group(1) if found else None
        if not label:
            unmatched.append(BadFile(str(folder / name), f"data.label_regex {pattern!r} does not match its name"))
            continue
        out.files.append(name)
        out.tags.append((label,))
    if not out.files:
        raise DataError(f"{folder}: data.label_regex {pattern!r} matches none of its {len(unmatched)} image file name(s); "
                        "its first group must capture the label")
    return out, unmatched
