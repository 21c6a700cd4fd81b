"""Small file helpers shared by the data pipeline, the cache and the writers."""

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write via a temp file and os.replace so readers never see a half-written file."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as temp_file:
            temp_file.write(text)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stem_for(sample_id: str) -> str:
    """A sample id made safe to use as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._") or "sample"


def claim_file_stem(sample_id: str, taken: dict[str, tuple[str, str]], where: str,
                    error: type[Exception]) -> str:
    """`file_stem_for(sample_id)`, refused with `error` when an earlier id already names that
    file (the second would overwrite it, or be skipped as done). `taken` maps each stem
    claimed so far to (where, id) and gets this one."""
    stem = file_stem_for(sample_id)
    if stem in taken:
        first_where, first_id = taken[stem]
        same = "repeats" if first_id == sample_id else f"names the same output file ({stem}) as {first_id!r} of"
        raise error(f"{where}: field 'id' {sample_id!r} {same} {first_where}; give every line an id of its own")
    taken[stem] = (where, sample_id)
    return stem


def json_lines(path: str | Path, error: type[Exception], what: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, `file:line`, object) for each non-blank line of a JSONL file; a missing
    file or a line that is not a JSON object raises `error` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as problem:
            raise error(f"{where}: not a JSON object ({problem.msg})") from None
        if not isinstance(record, dict):
            raise error(f"{where}: not a JSON object")
        yield number, where, record
