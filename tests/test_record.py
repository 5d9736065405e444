import os

import pandas as pd
import pytest

from runner.record import atomic_write_bytes, write_table


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.png", b"png")
        write_table(tmp_path / "rows.parquet", [{"prompt": "a cat", "seed": 0}])
        write_table(tmp_path / "results.csv", pd.DataFrame({"prompt": ["a cat"], "seed": [0]}))
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        {"a.png": oct(mode), "rows.parquet": oct(mode), "results.csv": oct(mode)}  # and no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "rows.parquet", b"old rows")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "rows.parquet", b"new rows")
    assert [p.name for p in tmp_path.iterdir()] == ["rows.parquet"]
    assert (tmp_path / "rows.parquet").read_bytes() == b"old rows"


def test_csv_quotes_text_a_spreadsheet_would_run_as_a_formula(tmp_path):
    rows = [{"prompt": "=1+2*3", "negative_prompt": "@SUM(A1)", "offset": -1.5, "note": "-2"},
            {"prompt": "-cmd", "negative_prompt": "\tx", "offset": 2.0, "note": "+a cat"}]
    write_table(tmp_path / "plain.csv", rows)  # the csv module's path
    write_table(tmp_path / "pandas.csv", pd.DataFrame(rows))  # pandas' path (a sweep's results.csv)
    write_table(tmp_path / "results.parquet", pd.DataFrame(rows))
    for name in ("plain.csv", "pandas.csv"):
        text = (tmp_path / name).read_text()
        assert text.splitlines() == ["prompt,negative_prompt,offset,note", "'=1+2*3,'@SUM(A1),-1.5,-2",
                                     "'-cmd,'\tx,2.0,'+a cat"], name  # numbers, also as text, stay numbers
    stored = pd.read_parquet(tmp_path / "results.parquet")
    assert list(stored["prompt"]) == ["=1+2*3", "-cmd"]  # parquet keeps the raw text
