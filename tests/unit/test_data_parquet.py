"""Parquet input: row groups streamed in order, text_key column, bad values, a missing column."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaring.data import PreprocessConfig, TokenizerConfig, open_dataset
from megaring.data.preprocess import preprocess
from megaring.data.sources import InputError, resolve_sources
from tests.unit.test_data_tokenizers import write_tokenizer_dir

TEXTS = ["first row", "zweite Zeile ü", "", "third\nwith lines", "fourth 🚀", "fifth"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok") / "model")


def write_parquet(path, column, name="body"):
    table = pa.table({"id": list(range(len(column))), name: column})
    pq.write_table(table, path, row_group_size=3)  # two row groups for six rows
    assert pq.ParquetFile(path).num_row_groups == -(-len(column) // 3)
    return path


def run(tmp_path, tok, input, **kw):
    return preprocess(PreprocessConfig(input=str(input), output=str(tmp_path / "out"), progress=False, workers=0,
                                       tokenizer=TokenizerConfig(model=str(tok)), **kw))


def test_rows_in_order_across_row_groups_and_files(tmp_path, tok):
    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "a.parquet", TEXTS)
    write_parquet(tmp_path / "in" / "b.parquet", ["from b"])
    summary = run(tmp_path, tok, f"{tmp_path}/in/*.parquet", text_key="body")
    ds = open_dataset(tmp_path / "out")
    expected = [t for t in TEXTS if t] + ["from b"]
    assert [ds.text(i) for i in range(ds.num_documents)] == expected
    assert summary["empty_documents"] == 1 and summary["input_bytes"] == sum(len(t.encode()) for t in expected)
    sources = resolve_sources(str(tmp_path / "in"), text_key="body")  # directories work as for JSONL
    assert [s.name.rsplit("/", 1)[1] for s in sources] == ["a.parquet", "b.parquet"]


def test_bad_values_are_bad_records(tmp_path, tok):
    path = write_parquet(tmp_path / "nulls.parquet", ["good one", None, "good two", None, "good three", "x"])
    with pytest.raises(InputError, match=r"nulls\.parquet:row 1: column 'body' is null, not a string"):
        run(tmp_path, tok, path, text_key="body")
    summary = run(tmp_path, tok, path, text_key="body", skip_bad_lines=True)
    assert summary["skipped_records"] == 2 and summary["documents"] == 4
    assert "nulls.parquet:row 3" in summary["skipped_examples"][1]
    numbers = write_parquet(tmp_path / "numbers.parquet", [1, 2, 3, 4, 5, 6])
    with pytest.raises(InputError, match=r"numbers\.parquet:row 0: column 'body' is int, not a string"):
        run(tmp_path, tok, numbers, text_key="body", overwrite=True)


def test_missing_column_and_unreadable_file(tmp_path, tok):
    path = write_parquet(tmp_path / "t.parquet", TEXTS)
    with pytest.raises(InputError, match=r"t\.parquet has no column 'text' \(its columns: id, body\); set text_key"):
        run(tmp_path, tok, path)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"cannot read .*broken\.parquet as Parquet"):
        run(tmp_path, tok, tmp_path / "broken.parquet")
    assert not (tmp_path / "out").exists()
