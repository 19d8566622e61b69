"""cptune.data.tables, the one reader and writer of data files: batches, row numbers, streaming, exact bytes."""

import csv
import json

import pytest

from cptune.data.tables import CSV_BLOCK_BYTES, open_table, open_table_writer

ROW_BYTES = 64
"""Roughly the bytes of one generated CSV row, to size files that span several of pyarrow's blocks."""


def many_rows(n: int) -> list[list[str]]:
    """``n`` rows of (id, text, label) whose texts hold commas, quotes and a newline every 7th row."""
    return [[str(i), f'row {i}, "quoted"' + ("\nsecond line" if i % 7 == 0 else ""), str(i % 3)] for i in range(n)]


def write_csv(path, rows, header=("id", "text", "label"), delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_rows_come_in_batches_of_the_asked_size_across_pyarrow_blocks(tmp_path):
    n = 3 * CSV_BLOCK_BYTES // ROW_BYTES  # several pyarrow blocks
    rows = many_rows(n)
    path = tmp_path / "big.csv"
    write_csv(path, rows)
    table = open_table(path)
    assert table.columns == ["id", "text", "label"]
    batches = list(table.batches(1000))
    assert [len(b) for b in batches] == [1000] * (n // 1000) + ([n % 1000] if n % 1000 else [])
    numbers = [number for b in batches for number in b.numbers]
    assert numbers == list(range(2, n + 2))  # the header is row 1
    assert [list(r.values()) for b in batches for r in b.records()] == rows  # strings, as written
    assert table.survey(1000).rows == n


def test_a_bad_row_far_into_a_csv_fails_only_when_reached_and_names_its_row(tmp_path):
    n = 2 * CSV_BLOCK_BYTES // ROW_BYTES
    path = tmp_path / "ragged.csv"
    write_csv(path, [*many_rows(n), ["x", "too", "many", "fields"]])
    batches = open_table(path).batches(100)
    first = next(batches)  # streamed: the first rows come before the bad row is parsed
    assert list(first.numbers) == list(range(2, 102))
    with pytest.raises(ValueError, match=rf"ragged.csv' row {n + 2} has 4 fields but the header has 3"):
        list(batches)


def test_a_byte_that_is_not_utf8_is_found_past_the_first_chunk(tmp_path):
    path = tmp_path / "latin.csv"
    head = b"text,label\n" + b"fine,a\n" * (CSV_BLOCK_BYTES // 7 + 10)
    path.write_bytes(head + b"caf\xe9,b\n")
    with pytest.raises(ValueError, match=rf"is not UTF-8 \(byte 0xe9 at offset {len(head) + 3}\)"):
        list(open_table(path).batches())


@pytest.mark.parametrize("name, data", [("h.csv", b"text,label\n"), ("h.tsv", b"text\tlabel\n"),
                                        ("h.csv", b"\xef\xbb\xbftext,label\n\n\n")])
def test_a_file_with_a_header_and_no_rows(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    table = open_table(path)
    assert table.columns == ["text", "label"]  # the byte-order mark is not part of the first name
    assert list(table.batches(10)) == []
    survey = table.survey(10, schema=True)
    assert (survey.rows, survey.columns, survey.schema.names) == (0, ["text", "label"], ["text", "label"])


def test_tsv_cells_keep_commas_quotes_and_spaces(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes(b'text\tlabel\na, "b"\t 1 \n"c\td"\t\n')
    (batch,) = open_table(path).batches()
    assert batch.records() == [{"text": 'a, "b"', "label": " 1 "}, {"text": "c\td", "label": ""}]


def test_jsonl_objects_keep_their_keys_types_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    objects = [{"text": "a", "label": "b"}, {"label": 2, "text": "c", "big": 2**70}, {"text": "d", "label": True},
               {"text": "e", "label": 1.5}]
    path.write_text(json.dumps(objects[0]) + "\n\n" + "".join(json.dumps(o) + "\n" for o in objects[1:]))
    table = open_table(path)
    assert table.columns == ["text", "label"]  # the first object's keys
    batches = list(table.batches(2))
    assert [b.rows for b in batches] == [objects[:2], objects[2:]]
    assert [list(row) for b in batches for row in b.rows] == [list(o) for o in objects]  # key order kept
    assert [list(b.numbers) for b in batches] == [[1, 3], [4, 5]]  # lines; the blank line 2 is skipped
    assert table.survey(2).columns == ["text", "label", "big"]


def test_csv_output_bytes(tmp_path):
    """Minimal quoting, ``\\n`` line ends, ``""`` for None, JSON text for other values (what annotate writes)."""
    path = tmp_path / "out.csv"

    class Source:
        columns = ["text", "n"]

    with open_table_writer(path, ".csv", Source(), ["added"]) as writer:
        writer.write([{"text": 'a, "b"\r\nc', "n": 1}, {"text": "plain", "n": None}], [[0.25, None]])
        writer.write([{"text": "x", "n": [1, "y"]}], [["é"]])
    assert path.read_bytes() == ('text,n,added\n"a, ""b""\r\nc",1,0.25\nplain,,\nx,"[1, ""y""]",é\n').encode()


@pytest.mark.parametrize("data", [b"text\nab\xc3\xa9c\n\xff\n", b"text\nabc\xc3", b"text\na\xc3\xa9\xc3\xa9x\xe9z\n"])
def test_the_offset_of_a_bad_byte_is_exact_where_characters_straddle_chunks(tmp_path, monkeypatch, data):
    from cptune.data import tables

    monkeypatch.setattr(tables, "_UTF8_CHUNK", 4)  # a chunk boundary inside the two-byte characters
    path = tmp_path / "d.csv"
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as want:
        data.decode("utf-8")
    start = want.value.start
    with pytest.raises(ValueError, match=rf"byte 0x{data[start]:02x} at offset {start}\)"):
        list(open_table(path).batches())
