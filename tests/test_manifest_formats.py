"""Manifests in the forms corpora ship them (csv, tsv, txt, jsonl, each also compressed;
Parquet), with the URI column img2dataset, LAION or a Hugging Face image folder uses, and
relative paths named below the manifest's folder: the same records whatever the form."""
import bz2
import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.scan import sources
from pipeline.scan.sources import SourceOptions, detect_format, plan_source
from pipeline.scan.store import PlanRecordsWriter, ScanStore

URIS = ["imgs/a.jpg", "./imgs/b.png", "/data/c.jpg", "s3://bucket/d.webp", "https://cdn.example/e.jpg?w=512",
        "imgs/f g.jpg", "imgs/h.jpg"]
LABELS = ["real", "1", None, "fake", "0", "0", "1"]
CAPTIONS = ["a cat", 'say "hi", twice', None, "", "x\ty", "plain", "last"]


def compressed(data: bytes, codec: str) -> bytes:
    if codec == "gz":
        return gzip.compress(data)
    if codec == "bz2":
        return bz2.compress(data)
    return pa.compress(data, codec={"zst": "zstd", "lz4": "lz4"}[codec], asbytes=True)


def write_forms(folder) -> dict[str, str]:
    """The records above in each form (as text; the txt form holds the URIs alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["uri", "label", "caption"], *zip(URIS, LABELS, CAPTIONS)])
    csv_text = out.getvalue()  # quoted where needed, "" inside quotes; None and "" both an empty cell
    tsv_text = "uri\tlabel\tcaption\n" + "".join(f"{u}\t{lab or ''}\t{(c or '').replace(chr(9), ' ')}\n"
                                               for u, lab, c in zip(URIS, LABELS, CAPTIONS))
    jsonl_text = "".join(json.dumps({"uri": u, "label": lab, "caption": c}) + "\n"
                         for u, lab, c in zip(URIS, LABELS, CAPTIONS))
    txt_text = "".join(f"{u}\n" for u in URIS) + "\n"  # an empty last line is none
    forms = {"list.csv": csv_text, "list.csv.gz": csv_text, "list.tsv.zst": tsv_text, "list.jsonl.bz2": jsonl_text,
             "list.txt.lz4": txt_text, "list.jsonl": jsonl_text, "list.txt": txt_text}
    for name, text in forms.items():
        codec = name.rsplit(".", 1)[1]
        data = text.encode()
        (folder / name).write_bytes(compressed(data, codec) if codec in ("gz", "bz2", "zst", "lz4") else data)
    pq.write_table(pa.table({"uri": URIS, "label": LABELS, "caption": CAPTIONS}), folder / "list.parquet")
    return forms


def test_every_form_gives_the_same_records_resolved_below_the_manifests_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 3)  # batches cross the lines
    forms = write_forms(tmp_path / "lists")
    folder = str(tmp_path / "lists")
    expected_uris = [f"{folder}/imgs/a.jpg", f"{folder}/imgs/b.png", "/data/c.jpg", "s3://bucket/d.webp",
                     "https://cdn.example/e.jpg?w=512", f"{folder}/imgs/f g.jpg", f"{folder}/imgs/h.jpg"]
    labels = [0, 1, None, 1, 0, 0, 1]
    for name in [*forms, "list.parquet"]:
        uri = f"{folder}/{name}"
        assert detect_format(uri, SourceOptions()) == "manifest", name
        batches = list(sources.manifest_batches(uri, sources.ColumnMap()))
        assert [b.num_rows for b in batches] == [3, 3, 1], name
        records = pa.concat_tables(batches)
        assert records["uri"].to_pylist() == expected_uris, name
        if name.startswith("list.txt"):
            assert records.column_names == ["uri"]
            continue
        assert records["label"].to_pylist() == labels, name
        captions = records["caption"].to_pylist()
        if name.startswith("list.tsv"):  # no quoting in TSV: the tab was written as a space
            assert captions == [None if c is None else c.replace("\t", " ") or None for c in CAPTIONS]
        elif name.startswith("list.jsonl") or name.endswith(".parquet"):
            assert captions == CAPTIONS, name  # JSON and Parquet tell "" from null
        else:
            assert captions == [c or None for c in CAPTIONS], name  # an empty CSV cell is null


def test_manifest_names_in_every_form_and_behind_a_web_query():
    from pipeline.scan.manifest import manifest_kind

    assert manifest_kind("s3://b/list.CSV.GZ") == (".csv", "gzip")
    assert manifest_kind("https://host/lists/part.jsonl.zst?dl=1&path=a/b") == (".jsonl", "zstd")
    assert manifest_kind("list.parquet") == (".parquet", None) and manifest_kind("list.parquet.gz") is None
    assert manifest_kind("notes.md") is None and manifest_kind("a.csv.7z") is None
    assert manifest_kind("events.NDJSON") == (".jsonl", None) and manifest_kind("e.ndjson.gz") == (".jsonl", "gzip")


def test_json_lists_and_spreadsheets_say_how_to_make_them_manifests(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"uri": "a.jpg"}]))
    with pytest.raises(ValueError, match=r"list\.json is a file that is neither .* \(a JSON manifest is read one object a "
                                         r"line: .* jq -c '\.\[\]' list\.json > list\.jsonl\)"):
        plan_source(str(tmp_path / "list.json"), SourceOptions())
    (tmp_path / "sheets").mkdir()
    (tmp_path / "sheets" / "images.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"it holds 1 \.xlsx file \(a spreadsheet: save it as CSV \(UTF-8\)"):
        plan_source(str(tmp_path / "sheets"), SourceOptions())
    (tmp_path / "list.ndjson").write_text('{"uri": "a.jpg"}\n')  # newline-delimited JSON: JSONL by another name
    assert plan_source(str(tmp_path / "list.ndjson"), SourceOptions()).records["uri"].to_pylist() == [
        str(tmp_path / "a.jpg")]


def test_the_uri_column_of_img2dataset_laion_and_hugging_face_metadata_is_found(tmp_path):
    pq.write_table(pa.table({"URL": ["https://x/1.jpg", "https://x/2.jpg"], "TEXT": ["a", "b"],
                             "similarity": [0.3, 0.4]}), tmp_path / "laion.parquet")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metadata.jsonl").write_text(
        '{"file_name": "0001.png", "label": "fake", "meta": {"seed": 7}, "steps": 30}\n'
        '{"file_name": "sub/0002.png", "label": "real", "meta": null, "steps": 50, "nsfw": false}\n')
    laion = pa.concat_tables(sources.manifest_batches(str(tmp_path / "laion.parquet"), sources.ColumnMap()))
    assert laion["uri"].to_pylist() == ["https://x/1.jpg", "https://x/2.jpg"] and "URL" not in laion.column_names
    assert laion["similarity"].to_pylist() == [0.3, 0.4]  # Parquet keeps its types
    hf = pa.concat_tables(sources.manifest_batches(str(tmp_path / "train" / "metadata.jsonl"), sources.ColumnMap()))
    assert hf["uri"].to_pylist() == [str(tmp_path / "train" / "0001.png"), str(tmp_path / "train" / "sub" / "0002.png")]
    assert hf["label"].to_pylist() == [1, 0]
    assert hf["meta"].to_pylist() == ['{"seed": 7}', None] and hf["steps"].to_pylist() == ["30", "50"]
    assert hf["nsfw"].to_pylist() == [None, "false"]  # a field missing from a line is null
    with pytest.raises(ValueError, match=r"laion.parquet has no 'link' column \(its columns: 'URL', 'TEXT', "):
        list(sources.manifest_batches(str(tmp_path / "laion.parquet"), sources.ColumnMap(uri="link")))
    (tmp_path / "none.csv").write_text("where,label\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"none.csv has no 'uri' nor url / file_name / image_url / .* / filename / "
                                         r"image / .* / file column \(its columns: 'where', 'label'; set columns.uri\)"):
        list(sources.manifest_batches(str(tmp_path / "none.csv"), sources.ColumnMap()))
    (tmp_path / "paths.csv").write_text("Image_Path,label\na.jpg,1\n")  # a list as people write them
    paths = pa.concat_tables(sources.manifest_batches(str(tmp_path / "paths.csv"), sources.ColumnMap()))
    assert paths["uri"].to_pylist() == [str(tmp_path / "a.jpg")]
    (tmp_path / "kaggle.csv").write_text("Image,label\nb.jpg,1\n")  # a competition's list
    kaggle = pa.concat_tables(sources.manifest_batches(str(tmp_path / "kaggle.csv"), sources.ColumnMap()))
    assert kaggle["uri"].to_pylist() == [str(tmp_path / "b.jpg")]
    (tmp_path / "excel.csv").write_text("uri;label\na.jpg;1\n")  # a European spreadsheet's export
    with pytest.raises(ValueError, match=r"\(its columns: 'uri;label'; a CSV separated by ';'\? only ',' separates"):
        list(sources.manifest_batches(str(tmp_path / "excel.csv"), sources.ColumnMap()))


def test_bad_jsonl_lines_are_refused_naming_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 2)
    cases = {"late.jsonl": ('{"uri": "a.jpg"}\n{"uri": "b.jpg"}\n{"uri": "c.jpg", "label": 1}\n',
                            r"late.jsonl line 3: field\(s\) \['label'\] absent from its first 2 lines"),
             "text.jsonl": ('{"uri": "a.jpg"}\nnot json\n', r"text.jsonl line 2: not JSON"),
             "list.jsonl": ('["a.jpg"]\n', r"list.jsonl line 1: not a JSON object")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            list(sources.manifest_batches(str(tmp_path / name), sources.ColumnMap()))


def test_a_folder_of_compressed_manifests_plans_them_and_not_its_readme(tmp_path):
    root = tmp_path / "lists"
    root.mkdir()
    for part in range(3):
        text = "url,caption\n" + "".join(f"https://x/{part}/{i}.jpg,c{i}\n" for i in range(4))
        (root / f"part-{part:05d}.csv.gz").write_bytes(gzip.compress(text.encode()))
    (root / "README.txt").write_text("Downloaded from somewhere.\nLicense: see site.\n")
    assert detect_format(str(root), SourceOptions()) == "manifest"
    with PlanRecordsWriter(ScanStore(str(tmp_path / "scan"))) as sink:
        plan = plan_source(str(root), SourceOptions(unit_size=5), sink=sink)
    assert plan.input_format == "manifest" and plan.total_rows == 12
    uris = pa.concat_tables([ScanStore(str(tmp_path / "scan")).unit_records(u) for u in plan.units])["uri"]
    assert uris.to_pylist() == [f"https://x/{p}/{i}.jpg" for p in range(3) for i in range(4)]
    # a folder holding a README.txt alone holds no manifest (a .txt given as the input is one)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("see https://example.org\n")
    with pytest.raises(ValueError, match="holds no images .* no Parquet files and no manifests"):
        detect_format(str(tmp_path / "notes"), SourceOptions())
    for name in ("000.tar.gz", "001.tgz"):  # compressed shards: named, with what to do
        (tmp_path / "notes" / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"it holds 2 compressed tar files, 1 \.txt file \(a compressed tar cannot "
                                         r"be read by range: decompress it to \.tar"):
        detect_format(str(tmp_path / "notes"), SourceOptions())
    with pytest.raises(ValueError, match=r"000\.tar\.gz is a file that is neither .* \(a compressed tar cannot"):
        detect_format(str(tmp_path / "notes" / "000.tar.gz"), SourceOptions())
    assert detect_format(str(tmp_path / "notes" / "README.txt"), SourceOptions()) == "manifest"


def test_parquet_manifests_named_by_a_brace_pattern_are_read_in_its_order(tmp_path):
    root = tmp_path / "lists"
    root.mkdir()
    for part in range(3):
        pq.write_table(pa.table({"url": [f"https://x/{part}/{i}.jpg" for i in range(4)]}),
                       root / f"part-{part:05d}.parquet")
    pattern = str(root / "part-{00000..00002}.parquet")
    assert detect_format(pattern, SourceOptions()) == "manifest"
    with PlanRecordsWriter(ScanStore(str(tmp_path / "scan"))) as sink:
        plan = plan_source(pattern, SourceOptions(unit_size=5), sink=sink)
    uris = pa.concat_tables([ScanStore(str(tmp_path / "scan")).unit_records(u) for u in plan.units])["uri"]
    assert plan.input_format == "manifest" and uris.to_pylist() == [f"https://x/{p}/{i}.jpg" for p in range(3)
                                                                    for i in range(4)]


def test_a_folder_with_hugging_face_metadata_says_how_to_read_it(tmp_path):
    import logging

    from conftest import write_image

    write_image(tmp_path / "train" / "a.png", seed=1)
    (tmp_path / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "label": "fake"}\n')
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("mirror")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        folder = plan_source(str(tmp_path / "train"), SourceOptions())
        metadata = plan_source(str(tmp_path / "train" / "metadata.jsonl"), SourceOptions())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert folder.input_format == "folder" and folder.records["label"].to_pylist() == [None]
    assert metadata.records["label"].to_pylist() == [1]
    assert seen == [f"{tmp_path / 'train'} holds metadata.jsonl: scanned as a folder, its images' labels come from "
                    f"folder names (0_real / 1_fake) and its columns are not read; --input "
                    f"{tmp_path / 'train'}/metadata.jsonl reads them"]


def test_windows_text_encodings_give_the_same_records(tmp_path):
    """What Windows tools write: a UTF-8 BOM and CRLF (Excel's CSV UTF-8, PowerShell), UTF-16
    with its BOM (Excel's "Unicode text", PowerShell 5's Out-File), compressed too."""
    forms = write_forms(tmp_path / "lists")
    folder = tmp_path / "lists"
    (folder / "tsv.tsv").write_text(forms["list.tsv.zst"])
    crlf = {name: forms[name].replace("\n", "\r\n") for name in ("list.csv", "list.jsonl", "list.txt")}
    crlf["tsv.tsv"] = forms["list.tsv.zst"].replace("\n", "\r\n")
    for name, source in (("bom.csv", "list.csv"), ("bom.jsonl", "list.jsonl"), ("bom.txt", "list.txt")):
        (folder / name).write_bytes(("\ufeff" + crlf[source]).encode())
    for name, source in (("u16.csv", "list.csv"), ("u16.jsonl", "list.jsonl"), ("u16.txt", "list.txt"),
                         ("u16.tsv", "tsv.tsv")):
        (folder / name).write_bytes(crlf[source].encode("utf-16"))  # little-endian, BOM first
    (folder / "u16be.csv.gz").write_bytes(gzip.compress(("\ufeff" + forms["list.csv"]).encode("utf-16-be")))

    def records(name):
        return pa.concat_tables(sources.manifest_batches(str(folder / name), sources.ColumnMap())).to_pylist()

    for name, same_as in (("bom.csv", "list.csv"), ("bom.jsonl", "list.jsonl"), ("bom.txt", "list.txt"),
                          ("u16.csv", "list.csv"), ("u16.jsonl", "list.jsonl"), ("u16.txt", "list.txt"),
                          ("u16.tsv", "tsv.tsv"), ("u16be.csv.gz", "list.csv")):
        assert records(name) == records(same_as), name


def test_an_upper_case_uri_column_is_found_and_a_label_column_in_another_case_is_named(tmp_path):
    from conftest import mirror_log_lines

    (tmp_path / "kaggle.csv").write_text("URI,Label\nimgs/a.jpg,FAKE\nimgs/b.jpg,cat\n")
    with mirror_log_lines() as said:
        plan = plan_source(str(tmp_path / "kaggle.csv"), SourceOptions())
    assert plan.records["uri"].to_pylist() == [str(tmp_path / "imgs" / n) for n in ("a.jpg", "b.jpg")]
    assert plan.records["Label"].to_pylist() == ["FAKE", "cat"] and "label" not in plan.records.column_names
    assert any("column 'Label' is not read as labels" in s and "columns: {label: Label}" in s for s in said)
    with pytest.raises(ValueError, match="label value 'cat'"):  # read as labels when named: a class is none
        plan_source(str(tmp_path / "kaggle.csv"), SourceOptions(columns=sources.ColumnMap(label="Label")))


def test_a_windows_path_that_names_no_file_says_so(tmp_path):
    from conftest import write_image

    write_image(tmp_path / "imgs" / "a.png")
    (tmp_path / "list.csv").write_text("uri\nimgs\\a.png\nimgs/a.png\nimgs/none.png\n")
    uris = plan_source(str(tmp_path / "list.csv"), SourceOptions()).records["uri"].to_pylist()
    from pipeline.scan.reads import fetch_all

    (_, windows), (found, _), (_, missing) = fetch_all(uris, threads=2)
    assert windows.startswith("read failed: FileNotFoundError") and windows.endswith("(a Windows path? '/' separates "
                                                                                     "folders here)")
    assert found and "Windows" not in missing
