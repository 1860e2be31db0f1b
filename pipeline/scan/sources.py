"""Sources: folders of images, manifests of URIs, Parquet shards with image bytes
(`parquet_shards`), tar and zip shards (`webdataset`): what an input is, and its plan.

A source is planned into *units* (`units.Unit`): small, stable pieces of the input (a chunk
of files, or one row group of a shard). Units are what the scan commits: a unit's rows are
written together, once, so a rerun skips finished units.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.uri import below_start, image_name, is_os_metadata, is_web_url, is_within
from pipeline.scan import webdataset
from pipeline.scan.changes import FileChanges, KnownFiles, shard_changes
from pipeline.scan.labels import LABEL_FOLDERS, label_and_subset, label_like, normalize_labels
from pipeline.scan.listing import full_uri, iter_files, list_files
from pipeline.scan.manifest import (
    is_listed_manifest,
    is_manifest_name,
    is_text_manifest,
    manifest_kind,
    manifest_tables,
    uri_column,
)
from pipeline.scan.parquet_shards import has_bytes_column, shard_files, shard_units
from pipeline.scan.sample import Draw, sample_records
from pipeline.scan.schema import INDEX, RECORD_ERROR, UNIT, VERSION
from pipeline.scan.tar_changes import KnownSamples, TarShardUpdate, listed_versions
from pipeline.scan.units import (
    DEFAULT_EXTENSIONS,
    INPUT_FORMATS,
    ColumnMap,
    Plan,
    RecordsSink,
    SourceOptions,
    Unit,
    unit_id,
    warn_label_case,
)
from pipeline.scan.uri_set import UriSet
from pipeline.storage import is_utf8, listed_version, name_as_text, resolve_relative


def canonical_input(uri: str) -> str:
    """An input as an output records it: a local path absolute and normalised, a folder's
    URI without a trailing '/' ('data/', './data' and '/home/u/data' are one input, run
    from /home/u, and stay the same input run from anywhere); a web link as it is."""
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri if is_web_url(uri) else uri.rstrip("/")


def input_root(input_uri: str) -> str:
    """The folder an input's records are named below: the input itself, or the folder of
    a file or shard pattern given as the input ('s3://b/wds/{000..009}.tar' -> 's3://b/wds';
    's3://b/list.csv.gz' -> 's3://b')."""
    fs, base = fsspec.core.url_to_fs(input_uri)
    root = full_uri(fs, base)
    if webdataset.has_braces(root) or webdataset.is_shard_name(root) or is_manifest_name(root):
        return root[: root.split("{", 1)[0].rfind("/")]
    return root


def refuse_output_in_input(input_uri: str, output_uri: str) -> None:
    """An output inside a folder input would be listed with it: its parts taken for
    Parquet shards, an audit's heatmaps for images, by the next plan or `--update`."""
    if webdataset.has_braces(input_uri):
        return
    fs, base = fsspec.core.url_to_fs(input_uri)
    out_fs, out_base = fsspec.core.url_to_fs(output_uri)
    if is_within(full_uri(out_fs, out_base), full_uri(fs, base)) and fs.isdir(base):
        raise ValueError(f"--output {output_uri} lies inside the input folder {input_uri}: the input's listing "
                         "would take the output's own files for input; choose an --output outside it")


EVERY_FILE = "*"  # as an extension: every file is an image, names without an extension too (stores naming by hash)


class _EveryEnding(frozenset):
    """`image_suffixes` of EVERY_FILE: it holds every ending."""

    def __contains__(self, ending: object) -> bool:
        return True


def image_suffixes(extensions) -> frozenset[str]:
    """('jpg', '.PNG') -> {'.jpg', '.png'}: what an image file's name ends with ('*': anything)."""
    if EVERY_FILE in extensions:
        return _EveryEnding()
    return frozenset("." + e.lower().lstrip(".") for e in extensions)


def suffix(path: str) -> str:
    """A file's extension, lower-case ('' for none): pathlib's, without pathlib's cost."""
    return posixpath.splitext(path)[1].lower()


def image_records(paths: Iterable[str] | Iterable[tuple[str, str | None]], fs, base: str,
                  extensions=DEFAULT_EXTENSIONS, notes: dict | None = None,
                  label_folders: dict[str, int] = LABEL_FOLDERS, named: bool = False) -> pa.Table:
    """Files of a folder (filesystem paths below `base`) -> uri, label, subset of its images,
    in the given order; files of other extensions are left out, and so are those an
    operating system makes beside images (`uri.is_os_metadata`: macOS's '._photo.jpg'). Given (path, version)
    pairs, each image's version too (VERSION). `notes` gets "label_like": the first folder
    above an unlabeled image that is named like a label (`labels.label_like`). `label_folders`:
    the folder names that label the images below them. `named`: the paths are images the
    user named one by one (a single image as the input), kept whatever their names."""
    wanted = image_suffixes(extensions)
    rows = {"uri": [], "label": [], "subset": [], VERSION: [], RECORD_ERROR: []}
    skip = below_start(base)
    web = is_web_url(base)  # a single image given by its link: its name ends before any query
    folders, label, subset = None, None, None
    for listed in paths:  # string operations: pathlib would intern every name it parses
        path, version = listed if isinstance(listed, tuple) else (listed, None)
        *above, name = path[skip:].split("/")
        if suffix(image_name(path) if web else name) not in wanted or (not named and is_os_metadata(path[skip:])):
            continue
        if above != folders:  # a directory's files come together: its label is found once
            folders = above
            label, subset = label_and_subset(tuple(folders), label_folders)
            if label is None and notes is not None and "label_like" not in notes and (
                    like := label_like(folders, label_folders)):
                notes["label_like"] = like
        uri, error = full_uri(fs, path), None
        if not uri.isascii() and not is_utf8(uri):  # a disk's name in another encoding (Latin-1 archives)
            uri = name_as_text(uri)
            error = (f"file name not UTF-8: the disk names this file {os.fsencode(path)!r}, which no text column "
                     "holds: rename it (e.g. convmv -f latin1 -t utf8) to score it")
        rows["uri"].append(uri)
        rows["label"].append(label)
        rows["subset"].append(subset)
        rows[VERSION].append(version)
        rows[RECORD_ERROR].append(error)
    table = pa.table({"uri": pa.array(rows["uri"], pa.string()), "label": pa.array(rows["label"], pa.int64()),
                      "subset": pa.array(rows["subset"], pa.string())})
    for column in (VERSION, RECORD_ERROR):  # only where some record has one
        if any(v is not None for v in rows[column]):
            table = table.append_column(column, pa.array(rows[column], pa.string()))
    return table


def list_images(root: str, extensions=DEFAULT_EXTENSIONS, files: list[str] | None = None,
                label_folders: dict[str, int] = LABEL_FOLDERS) -> pa.Table:
    """Recursive listing, sorted: uri, label, subset (`files`: the folder's listing, if made;
    `label_folders`: the folder names that label the images below them)."""
    fs, base = fsspec.core.url_to_fs(root)
    if files is None:
        if not fs.isdir(base):
            raise FileNotFoundError(f"input folder {root} does not exist")
        files = list_files(root)
    return image_records(files, fs, base, extensions, label_folders=label_folders)


def standard_records(table: pa.Table, columns: ColumnMap) -> pa.Table:
    """Rename configured columns to uri/id/label/subset; other columns stay as they are."""
    renames = {columns.uri: "uri", columns.id: "id", columns.label: "label", columns.subset: "subset",
               columns.bytes: "bytes"}
    names = [renames.get(n, n) for n in table.column_names]
    table = table.rename_columns(names)
    if "label" in table.column_names:
        table = table.set_column(names.index("label"), "label", normalize_labels(table["label"]))
    for name in ("uri", "id", "subset"):
        if name in table.column_names and not pa.types.is_string(table[name].type):
            table = table.set_column(table.column_names.index(name), name, pc.cast(table[name], pa.string()))
    return table


def manifest_batches(uri: str, columns: ColumnMap) -> Iterator[pa.Table]:
    """A manifest's records in standard names, a batch at a time (any length in bounded
    memory; the forms read: `manifest.py`). Relative URIs name files below the manifest's
    own folder (as a Hugging Face metadata file's names do), wherever the records are read."""
    folder = posixpath.dirname(image_name(uri).rstrip("/"))
    for i, table in enumerate(manifest_tables(uri, STREAM_BATCH_ROWS)):
        if i == 0:
            warn_label_case(table.column_names, columns, uri)
        found = uri_column(table.column_names, columns.uri, uri)
        records = standard_records(table, replace(columns, uri=found))
        at = records.column_names.index("uri")
        records = records.set_column(at, "uri", resolve_relative(records["uri"], folder))
        yield records if columns.version is None else with_versions(records, columns.version, uri)


def with_versions(records: pa.Table, column: str, manifest: str) -> pa.Table:
    """A manifest's records with VERSION from its `column` (`columns.version`) as text (bytes
    as hex); the column itself stays a carried column."""
    if column not in records.column_names:
        raise ValueError(f"columns.version names {column!r}, which manifest {manifest} lacks (its columns: "
                         f"{', '.join(records.column_names)})")
    values = records[column]
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        versions = pa.array([None if v is None else v.hex() for v in values.to_pylist()], pa.string())
    else:
        try:
            versions = pc.cast(values, pa.string())
        except pa.ArrowException:
            raise ValueError(f"columns.version names {column!r} of manifest {manifest}, of type {values.type}: "
                             "expected text, a number, a time or bytes") from None
    return records.append_column(VERSION, versions)


def inline_units(records: pa.Table, unit_size: int, source: str, kind: str = "inline",
                 group_sizes: list[int] | None = None, first: int = 0,
                 group_versions: list[str | None] | None = None) -> tuple[list[Unit], pa.Table]:
    """Records -> units of `unit_size` consecutive records (never across groups: a tar
    shard's samples; each group's units take its version from `group_versions`), and the
    records with their unit and index. A unit's id hashes its URIs and its start (`first`:
    the position of these records in the whole input): only one unit's URIs are Python
    strings at a time."""
    sizes: list[int] = []  # records per unit, in order
    versions: list[str | None] = []  # and its version
    for g, size in enumerate(group_sizes if group_sizes is not None else [records.num_rows]):
        full, rest = divmod(size, unit_size)
        sizes += [unit_size] * full + ([rest] if rest else [])
        versions += [group_versions[g] if group_versions is not None else None] * (full + bool(rest))
    uris, units, start = records["uri"], [], 0
    for n, version in zip(sizes, versions):
        names = [u or "" for u in uris.slice(start, n).to_pylist()]  # a manifest's empty cell: an error row later
        units.append(Unit(unit_id(kind, source, str(first + start), *names), kind, n, version=version))
        start += n
    lengths = np.asarray(sizes, dtype=np.int64)
    owner = np.repeat(np.arange(len(sizes)), lengths)  # each record's unit
    unit_col = pa.array([u.unit_id for u in units], pa.string()).take(pa.array(owner, pa.int64()))
    index_col = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    records = records.append_column(UNIT, unit_col).append_column(INDEX, pa.array(index_col, pa.int64()))
    return units, records


def manifest_files(root: str, files: list[str] | None = None) -> list[str]:
    """A folder's manifests, in listing order: its Parquet files if it holds any, else its
    text manifests of the most frequent kind (`is_listed_manifest`: a README.txt is none)."""
    fs, base = fsspec.core.url_to_fs(root)
    files = [p for p in (list_files(root) if files is None else files) if "/_" not in p[len(base):]]
    kinds = collections.Counter(manifest_kind(p) for p in files if is_listed_manifest(p))
    if any(p.endswith(".parquet") for p in files) or not kinds:
        return [full_uri(fs, p) for p in files if p.endswith(".parquet")]
    kind = kinds.most_common(1)[0][0]
    return [full_uri(fs, p) for p in files if manifest_kind(p) == kind]


def tar_files(root: str, files: list[str] | None = None) -> list[str]:
    """WebDataset shards: a brace pattern ('shards/{00000..00099}.tar'), one .tar or .zip, or
    a folder's .tar and .zip files."""
    if webdataset.has_braces(root):
        return webdataset.expand_braces(root)
    fs, base = fsspec.core.url_to_fs(root)
    if webdataset.is_shard_name(root) and fs.isfile(base):
        return [root]
    files = list_files(root) if files is None else files
    return [full_uri(fs, p) for p in files if webdataset.is_shard_name(p)]


STREAM_BATCH_ROWS = 65_536  # records read at once from a manifest or a folder's listing
STREAM_CHUNK_UNITS = 256  # units planned at once from them


def _chunks(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables -> tables of exactly `rows` rows (the last one shorter), across their edges."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= rows:
            whole = pa.concat_tables(pending, promote_options="permissive")
            yield whole.slice(0, rows)
            pending, held = [whole.slice(rows)], held - rows
    if held:
        yield pa.concat_tables(pending, promote_options="permissive")


def deliver(units: list[Unit], records: pa.Table, sink: RecordsSink | None) -> pa.Table:
    """Hand each unit's records to `sink`; without one they stay with the plan (returned)."""
    if sink is None:
        return records
    start = 0
    for u in units:
        sink.add(u, records.slice(start, u.rows))
        start += u.rows
    return records.schema.empty_table()


def chunked_units(tables: Iterable[pa.Table], unit_size: int, source: str,
                  sink: RecordsSink | None) -> tuple[list[Unit], pa.Table]:
    """Units of records read in chunks of whole units: the same units as one table of all
    the records would give, planned in bounded memory when a sink takes them."""
    units, kept, first = [], [], 0
    for chunk in _chunks(tables, unit_size * STREAM_CHUNK_UNITS):
        new, records = inline_units(chunk, unit_size, source, first=first)
        units += new
        kept.append(deliver(new, records, sink))
        first += chunk.num_rows
    records = pa.concat_tables(kept, promote_options="permissive") if kept else pa.table({})
    return units, records


@dataclass
class FolderImages:
    """A folder's images from its streamed listing, a batch of records at a time (with each
    file's version, VERSION); counts the files it leaves out for their extension as it goes.
    A single image given as the input is a folder of one: its own folder is the base."""

    root: str
    files: Iterator[tuple[str, str | None]]  # (filesystem path, version), sorted by path
    extensions: tuple[str, ...]
    skipped: int = 0
    single_file: bool = False
    notes: dict = field(default_factory=dict)  # image_records' notes on the folders seen
    label_folders: dict[str, int] = field(default_factory=lambda: LABEL_FOLDERS)

    def __iter__(self) -> Iterator[pa.Table]:
        fs, base = fsspec.core.url_to_fs(self.root)
        base = posixpath.dirname(base) if self.single_file else base
        while listed := list(itertools.islice(self.files, STREAM_BATCH_ROWS)):
            batch = image_records(listed, fs, base, self.extensions, self.notes, self.label_folders, self.single_file)
            self.skipped += len(listed) - batch.num_rows
            yield batch


def _up_to_first_image(files: Iterator[tuple[str, str]], extensions: tuple[str, ...],
                       base: str) -> list[tuple[str, str]]:
    """The (path, version) files of a listing of `base` up to its first image (all of them
    when it holds none)."""
    wanted = image_suffixes(extensions)
    head, skip = [], below_start(base)
    for path, version in files:
        head.append((path, version))
        if suffix(path) in wanted and not is_os_metadata(path[skip:]):
            break
    return head


def detect_format(uri: str, options: SourceOptions, files: list[str] | None = None) -> str:
    """`files`: an input folder's files up to its first image, or all of them when it holds
    none (None: list the folder here, or a single file)."""
    if options.input_format != "auto":
        return options.input_format
    if webdataset.is_webdataset_uri(uri):
        return "webdataset"
    low = uri.lower()
    if is_text_manifest(low):
        return "manifest"
    if webdataset.has_braces(uri):  # a pattern of Parquet files: what the first holds says
        return "parquet" if has_bytes_column(webdataset.expand_braces(uri)[0], options.columns) else "manifest"
    fs, base = fsspec.core.url_to_fs(uri)
    if low.endswith(".parquet") and fs.isfile(base):
        return "parquet" if has_bytes_column(uri, options.columns) else "manifest"
    wanted = image_suffixes(options.extensions)
    if files is None:
        if fs.isfile(base):  # one image: scanned as a folder of one
            if suffix(image_name(base)) in wanted:
                return "folder"
            raise ValueError(f"input {uri} is a file that is neither an image ({', '.join(options.extensions)}) nor "
                             "a manifest (.csv/.tsv/.txt/.jsonl, .parquet), a Parquet shard or a .tar or .zip shard"
                             + file_hint(base))
        if not fs.isdir(base):
            raise FileNotFoundError(f"input {uri} does not exist")
        files = list_files(uri)
    skip = below_start(base)  # what the OS leaves beside images is below the input, not above it
    if any(suffix(p) in wanted and not is_os_metadata(p[skip:]) for p in files):
        return "folder"
    if any(webdataset.is_shard_name(p) for p in files):
        return "webdataset"
    parquet = [p for p in files if p.endswith(".parquet")]
    if parquet:
        return "parquet" if has_bytes_column(full_uri(fs, parquet[0]), options.columns) else "manifest"
    if any(is_listed_manifest(p) for p in files):
        return "manifest"
    raise ValueError(f"input {uri} holds no images ({', '.join(options.extensions)}), no .tar or .zip shards, no Parquet "
                     f"files and no manifests{what_files_are(files)}")


COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
FILE_KIND_HINTS = {  # what to do about files of this kind
    "compressed tar": "a compressed tar cannot be read by range: decompress it to .tar (gunzip, zstd -d)",
    ".7z": "unpack it, or pack it again as .zip or .tar", ".rar": "unpack it, or pack it again as .zip or .tar",
    "": "--extensions '*' reads every file as an image",
    ".json": "a JSON manifest is read one object a line: a file so written is named .jsonl; a JSON list becomes "
             "one with jq -c '.[]' list.json > list.jsonl",
    ".xlsx": "a spreadsheet: save it as CSV (UTF-8) to read it as a manifest",
    ".xls": "a spreadsheet: save it as CSV (UTF-8) to read it as a manifest",
}


def file_kind(path: str) -> str:
    """A file's extension, lower-case, or 'compressed tar' ('' for none)."""
    return "compressed tar" if path.lower().endswith(COMPRESSED_TARS) else suffix(path)


def kind_hint(kind: str) -> str:
    return FILE_KIND_HINTS.get(kind, f"--extensions {kind.lstrip('.')} reads {kind} files as images")


def file_hint(path: str) -> str:
    """' (what to do)' about one file given as the input, where its kind has a hint ('' else)."""
    kind = file_kind(path)
    return f" ({FILE_KIND_HINTS[kind]})" if kind in FILE_KIND_HINTS else ""


def what_files_are(files: list[str]) -> str:
    """'; it holds 120 .tar.gz files, 3 .md files (hint)': the most frequent kinds of a
    folder's files that no reader took, with what to do about the first ('' for none)."""
    kinds = collections.Counter(file_kind(p) for p in files).most_common(3)
    if not kinds:
        return ""
    named = ", ".join(f"{n:,} {k or 'file'}{' file' if k else ''}{'s' * (n > 1)}{' without an extension' * (k == '')}"
                      for k, n in kinds)
    return f"; it holds {named} ({kind_hint(kinds[0][0])})"


Listing = list[tuple[str, str | None]]  # a folder's files (path, version), listed whole


def open_input(uri: str, options: SourceOptions) -> tuple[str, FolderImages | None, Listing | None]:
    """The input's format, from one listing of it, and that listing: a folder's images
    with their versions (streamed, read as the plan goes), or the whole listing of a
    folder of other files, with their versions (None for a single file or a pattern)."""
    fs, base = fsspec.core.url_to_fs(uri)
    if ("*" in base or "?" in base) and not is_web_url(uri) and not fs.exists(base):
        raise FileNotFoundError(f"input {uri} does not exist: a pattern of * or ? is no input; give its folder "
                                "(--extensions keeps some kinds of image), or name shards by a brace pattern "
                                "(shards/{00000..00099}.tar)")
    folder = not is_manifest_name(uri) and fs.isdir(base)
    stream = iter_files(uri, versions=True) if folder else None
    head = _up_to_first_image(stream, options.extensions, base) if folder else None
    fmt = detect_format(uri, options, [path for path, _ in head] if folder else None)  # an image in `head`, else all
    if fmt == "folder" and not folder:  # a single image (or --input-format folder given a file)
        if not fs.isfile(base):
            raise FileNotFoundError(f"input {uri} does not exist")
        return fmt, FolderImages(uri, iter([(base, listed_version(fs.info(base)))]), options.extensions,
                                 single_file=True, label_folders=options.label_folders), None
    if fmt == "folder":
        return fmt, FolderImages(uri, itertools.chain(head, stream), options.extensions,
                                 label_folders=options.label_folders), None
    return fmt, None, list(itertools.chain(head, stream)) if folder else None


def listed_paths(listing: Listing | None) -> list[str] | None:
    return None if listing is None else [path for path, _ in listing]


def listing_versions(uri: str, listing: Listing | None) -> dict[str, str | None] | None:
    """A listing's versions by each file's full URI (as `tar_files` names them)."""
    if listing is None:
        return None
    fs, _ = fsspec.core.url_to_fs(uri)
    return {full_uri(fs, path): version for path, version in listing}


def record_batches(uri: str, options: SourceOptions, images: FolderImages | None,
                   listing: Listing | None) -> Iterable[pa.Table]:
    """A folder's or manifest input's records, a batch at a time."""
    if images is not None:
        return images
    files = (webdataset.expand_braces(uri) if webdataset.has_braces(uri) else [uri] if is_manifest_name(uri)
             else manifest_files(uri, listed_paths(listing)))
    return (b for f in files for b in manifest_batches(f, options.columns))


def warn_label_like(uri: str, folder: str) -> None:
    logging.getLogger("mirror").warning(
        "%s: images below a folder named %r are unlabeled: label folders are named exactly 0_real / 1_fake "
        "(or nature / ai), as the official evaluation reads them; name yours, e.g. --label-folders %s=%s "
        "(each such folder), for metrics", uri, folder, folder, "fake" if "fake" in folder.lower() else "real")


LABEL_LIKE_LOOKS = 64  # unlabeled samples of a shard whose folders are looked at for a label-like name


def sample_label_like(samples: pa.Table, shard: str, root: str, folders: dict[str, int] = LABEL_FOLDERS) -> str | None:
    """The first folder named like a label (`labels.label_like`) above one of a shard's
    first unlabeled samples, outside the shard or inside it ('train/REAL/x.jpg' in a zip)."""
    unlabeled = samples.filter(samples["label"].is_null()).slice(0, LABEL_LIKE_LOOKS)["uri"].to_pylist()
    outside = webdataset.shard_folders(shard, root)
    keys = (uri[len(shard) + 1 :] for uri in unlabeled)
    return next((like for key in keys if (like := label_like(outside + tuple(key.split("/")[:-1]), folders))), None)


def _webdataset_plan(uri: str, options: SourceOptions, listing: Listing | None, source: str,
                     sink: RecordsSink | None, update: TarShardUpdate | None = None) -> Plan:
    """Tar shards indexed and their samples planned (units never span two shards; a unit's
    version is its shard's) a group of whole shards at a time, and the list of every shard
    indexed. With `update` (--update): only the shards it says are indexed (new ones, and
    known ones written again, whose units it refreshes), samples it knows are left out, and
    the plan's units are the new ones."""
    shards = tar_files(uri, listed_paths(listing))
    if not shards:
        raise ValueError(f"input {uri} holds no .tar or .zip shards")
    indexed, units, held, first, like = [], [], [], 0, None
    group: list[tuple[pa.Table, str]] = []  # whole shards' samples (and version), planned together

    def plan_group() -> None:
        nonlocal first
        samples = pa.concat_tables([t for t, _ in group])
        new, records = inline_units(samples, options.unit_size, source, "samples", [t.num_rows for t, _ in group],
                                    first=first, group_versions=[v for _, v in group])
        units.extend(new)
        held.append(deliver(new, records, sink))
        first += samples.num_rows
        group.clear()

    for samples, row in webdataset.indexed_shards(update.to_index(shards) if update is not None else shards,
                                                  options.index_on_cluster, options.address, options.columns.label,
                                                  input_root(uri), options.label_folders):
        version = row["version"]
        like = like or sample_label_like(samples, row["uri"], input_root(uri), options.label_folders)
        if update is not None:
            row = update.indexed(row["uri"], samples, row)
            samples = samples.filter(pa.array(~update.known.contains(samples["uri"])))
        samples = sample_records(samples, options.sample)
        group.append((samples, version))
        indexed.append(row)
        if sum(t.num_rows for t, _ in group) >= options.unit_size * STREAM_CHUNK_UNITS:  # a few shards a group
            plan_group()
    if group:
        plan_group()
    if like:
        warn_label_like(uri, like)
    records = pa.concat_tables(held) if held else pa.table({})
    all_indexed = update.finish(indexed) if update is not None else pa.Table.from_pylist(indexed, webdataset.SHARDS_SCHEMA)
    return Plan(uri, "webdataset", units, records, pc.sum(all_indexed["no_image"]).as_py() or 0, all_indexed,
                options.sample, (pc.sum(all_indexed["records"]).as_py() or 0) if options.sample is not None else 0)


# What a Hugging Face image folder describes its images in (file_name + columns)
FOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def hint_folder_metadata(uri: str) -> None:
    """A folder planned by its images whose root holds a Hugging Face metadata file: its
    labels and columns are not read so; say how they would be."""
    fs, base = fsspec.core.url_to_fs(uri)
    for name in FOLDER_METADATA:
        if fs.exists(f"{base.rstrip('/')}/{name}"):
            logging.getLogger("mirror").info(
                "%s holds %s: scanned as a folder, its images' labels come from folder names (0_real / 1_fake) "
                "and its columns are not read; --input %s/%s reads them", uri, name, uri.rstrip("/"), name)
            return


def plan_source(uri: str, options: SourceOptions, sink: RecordsSink | None = None) -> Plan:
    """The input's units, from one listing of it. `sink`: takes the records unit by unit
    (folders and manifests are then planned in bounded memory); else the plan holds them."""
    fmt, images, listing = open_input(uri, options)
    if fmt == "folder":
        hint_folder_metadata(uri)
    draw = Draw(options.sample)
    if fmt in ("folder", "manifest"):
        units, records = chunked_units(map(draw, record_batches(uri, options, images, listing)), options.unit_size,
                                       uri, sink)
        if images is not None and images.notes.get("label_like"):
            warn_label_like(uri, images.notes["label_like"])
        return Plan(uri, fmt, units, records, images.skipped if images is not None else 0, None, draw.fraction,
                    draw.seen)
    if fmt == "parquet":
        units = shard_units(shard_files(uri, listed_paths(listing)), options.columns, draw=draw)
        return Plan(uri, fmt, units, pa.table({}), sample=draw.fraction, drawn_from=draw.seen)
    if fmt == "webdataset":
        return _webdataset_plan(uri, options, listing, uri, sink)
    raise ValueError(f"unknown input format {fmt!r}; expected one of {INPUT_FORMATS}")


def update_plan(plan: Plan, options: SourceOptions, known: UriSet,
                sink: RecordsSink | None = None) -> tuple[Plan, list[Unit], FileChanges]:
    """`--update`: `plan` plus what the input holds now beyond it, as new units: records
    whose uri `known` (the URIs of the plan's records; `changes.KnownFiles` for a folder,
    which also notes the versions listed; `tar_changes.KnownSamples` for tar shards) lacks, streamed from a folder's
    listing or a manifest as a first plan is; samples of tar shards not indexed yet; row groups of
    Parquet shards the plan lacks. Existing units are kept as they are (never re-chunked,
    so finished parts stay finished). `sink` takes the new units' records, else they are
    the returned plan's `records` (after any the plan held unstored). Also returned: what
    changed in place or went away among a folder's files, Parquet or tar shards."""
    fmt, images, listing = open_input(plan.input, options)
    if fmt != plan.input_format:
        raise ValueError(f"{plan.input} was planned as {plan.input_format}, now looks like {fmt}: "
                         "scan it into a new --output")
    if plan.sample != options.sample:
        raise ValueError(f"{plan.input} was planned as a sample of {plan.sample}, now {options.sample}: "
                         "scan it into a new --output")
    source = f"{plan.input}@{len(plan.units)}"  # keeps new units' ids apart from every earlier generation's
    shards, skipped, changes, draw = plan.shards, 0, FileChanges(), Draw(options.sample)
    drawn_from = plan.drawn_from
    if fmt == "parquet":
        added, changes = shard_changes(plan.units, shard_units(shard_files(plan.input, listed_paths(listing)),
                                                               options.columns, gone_ok=True, draw=draw))
        records, drawn_from = pa.table({}), draw.seen
    elif fmt == "webdataset":
        if not isinstance(known, KnownSamples):
            raise TypeError(f"an update of tar shards checks them against tar_changes.KnownSamples, not {type(known)}")
        known_shards = webdataset.shards_table(plan.shards)
        listed = listed_versions(known_shards["uri"].to_pylist(), listing_versions(plan.input, listing))
        update = TarShardUpdate(plan.units, known_shards, listed, known)
        fresh = _webdataset_plan(plan.input, options, listing, source, sink, update)
        added, records, shards, skipped = fresh.units, fresh.records, fresh.shards, fresh.skipped_by_extension
        changes, drawn_from = update.changes, fresh.drawn_from
    else:
        new = (draw(b.filter(pa.array(~known.check_listed(b))), listed=b.num_rows)
               for b in record_batches(plan.input, options, images, listing))
        added, records = chunked_units(new, options.unit_size, source, sink)
        skipped, drawn_from = images.skipped if images is not None else 0, draw.seen
        # a record gone from a manifest keeps its row (the file was not removed: the manifest
        # no longer names it); a file gone from a folder is scored again, as an error
        changes = known.finish(removed_stale=fmt == "folder") if isinstance(known, KnownFiles) else changes
    if plan.records.num_rows:
        records = pa.concat_tables([plan.records, records], promote_options="permissive") if records.num_rows else plan.records
    return Plan(plan.input, fmt, plan.units + added, records, skipped, shards, plan.sample, drawn_from), added, changes
