"""WebDataset input: tar shards of samples (`key.jpg` + `key.json` + `key.txt` ...), as
img2dataset writes them (LAION / DataComp-style corpora).

Planning indexes every shard once (member headers; shards concurrently, by Ray tasks over
the cluster when a scan has many; `--update` indexes only shards the plan lacks, and again
those written since: tar_changes.py): a sample is the members sharing a key (the member
name up to the first dot of its base name), and it is a record when one member is an
image. Its label is read as the index passes (its label member, e.g. `key.cls`, or its
`.json` member's field), else it is its shard's label folder's. A record keeps its
members' offsets and sizes, so decode tasks read exactly their samples' bytes with range
reads (and check that the shard is still the version indexed); units are fixed runs of
samples of one shard. A shard that cannot be read to its end (truncated, corrupt header)
yields the samples before the damage, an error record for a sample cut by it, and one
error record naming the shard and the offset where reading stopped.

Ray Data's `read_webdataset` was not used: it gives rows with no stable positions to commit
units by, and a damaged tar fails the whole read instead of becoming error rows.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.errors import error_text
from mirror_core.preprocess import IMAGE_EXTENSIONS
from mirror_core.sniff import what_file_holds
from mirror_core.uri import is_os_metadata
from pipeline.scan import zip_shards
from pipeline.scan.labels import LABEL_FOLDERS, label_and_subset, label_value
from pipeline.scan.schema import shard_changed
from pipeline.storage import current_version, name_as_text, opened_version, read_ahead, relative_paths

TEXT_EXTENSIONS = ("json", "txt")  # carried as strings in every row; other members as binary
MEMBERS = "_wds_members"  # plan records: JSON {extension: span} of the sample (tar: [offset, size]; zip: zip_shards)
IMAGE_MEMBER = "_wds_image"  # plan records: the image member's name (drives alignment)
PLAN_ERROR = "_wds_error"  # plan records: why the sample cannot be read (damaged shard)
UNREADABLE = "<unreadable>"  # the key of a damaged shard's record for what follows the damage
INDEX_THREADS = 16
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'shards/{00000..00002}.tar' -> three names; '{a,b}' lists; several groups multiply."""
    groups = _BRACES.findall(pattern)
    if not groups:
        return [pattern]
    choices = []
    for group in groups:
        if ".." in group:
            lo, hi = group.split("..", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"cannot expand {{{group}}} in {pattern}: expected {{N..M}} with digits")
            width = len(lo) if lo.startswith("0") else 0
            choices.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
        else:
            choices.append(group.split(","))
    parts = _BRACES.split(pattern)[::2]  # the literal text around the groups
    return ["".join(p + c for p, c in zip(parts, combo)) + parts[-1] for combo in itertools.product(*choices)]


def has_braces(uri: str) -> bool:
    return bool(_BRACES.search(uri))


SHARD_SUFFIXES = (".tar", ".zip")  # archives read as shards of samples


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def is_webdataset_uri(uri: str) -> bool:
    """Shards by name: one `.tar` or `.zip`, or a brace pattern of any files but Parquet ones."""
    return (has_braces(uri) and not uri.lower().endswith(".parquet")) or is_shard_name(uri)


def split_key(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the extension is everything after the
    first dot of the base name, lower-cased ('000123.seg.png' -> 'seg.png')."""
    if name.startswith(("/", "./")) or name.endswith(("/", "/.")) or "//" in name or "/./" in name or name == ".":
        path = PurePosixPath(name)  # rare names, normalized: './a//b.jpg' -> 'a/b.jpg'
        folder, base = str(path.parent), path.name
        folder = "" if folder == "." else folder
    else:  # the usual name needs no normalizing: string operations, a million members a second
        folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")  # a hidden name ('.keep') has an empty stem: key 'dir/'
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


TAR_PADDING_MAX = 64 * 1024  # end-of-archive blocks + record padding (10 KiB by default)


def _zero_padding(f, start: int, size: int) -> bool:
    """Whether the bytes after the last member are the end-of-archive zeros, not more data."""
    if size - start > TAR_PADDING_MAX:
        return False
    f.seek(start)
    return not f.read(size - start).strip(b"\0")


def _json_field(data: bytes, name: str):
    """The `name` field of a .json member; None when absent or the member is no JSON object
    (metadata that holds no label: the row still carries its text)."""
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    return meta.get(name) if isinstance(meta, dict) else None


def sample_label(found: dict, label: str, where: str) -> int | None:
    """A sample's label from what indexing read of it: the text of its `label` member
    (key.cls holding '1' for label 'cls'), else its .json member's `label` field; None when
    it has neither. A value that is not a label is a ValueError naming the sample (the
    plan fails, as for a bad label in a manifest)."""
    try:
        return label_value(found[label] if label in found else found.get("json"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _tar_members(f, size: int | None, read_now) -> tuple[list[tuple[str, list[int], str | None]],
                                                       dict[str, bytes], str | None]:
    """An open tar -> (its files: name, span [data offset, size], None; the content of the
    whole files `read_now(name)` asks for, read as the index passes; why reading stopped
    before the archive's end, or None)."""
    members, content, stopped = [], {}, None
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.isfile():  # a name that is not UTF-8 (read as the disk's: surrogates) is escaped
                    members.append((name_as_text(info.name), [info.offset_data, info.size], None))
                    whole = size is None or info.offset_data + info.size <= size  # else the sample is cut
                    if whole and read_now(info.name):  # small members (labels, .json)
                        content[members[-1][0]] = tar.extractfile(info).read()
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as err:
        stopped = error_text(err)
        end = None
    if stopped is None and size is not None and end is not None and end < size and not _zero_padding(f, end, size):
        stopped = f"unreadable tar header at offset {end}"  # tarfile ends quietly at a corrupt header
    if stopped is not None:
        stopped = f"tar shard unreadable past this point: {stopped}"
    return members, content, stopped


def _zip_members(f, size: int | None, read_now):
    """`_tar_members` for a zip archive (`zip_shards.index_zip`): all or nothing."""
    members, content, stopped = zip_shards.index_zip(f, read_now)
    return members, content, None if stopped is None else f"zip archive unreadable: {stopped}"


def index_shard(uri: str, label: str = "label", root: str = "",
                folders: dict[str, int] = LABEL_FOLDERS) -> tuple[list[dict], int, str]:
    """One shard (a tar, or a zip) -> (records, samples without an image, the version read:
    `storage.opened_version`, which decode tasks check before trusting the offsets).
    Records: uri, the members' spans, the image member's name, the sample's label
    (`sample_label`, else that of its label folder: the folders from the input's folder
    `root` to the shard and on inside it, as for images of a folder, label folders named as
    `folders` says; so is its subset), and
    an error for what damage makes unreadable."""
    kind = "zip" if zip_shards.is_zip(uri) else "tar"
    with fsspec.open(uri, "rb") as f:
        size = f.size if hasattr(f, "size") else None
        version = opened_version(f)
        members, content, stopped = (_zip_members if kind == "zip" else _tar_members)(
            f, size, lambda name: split_key(name)[1] in (label, "json"))
        if stopped is not None and not members and (what := what_file_holds(f)):  # no archive at all
            stopped += f"; the file is {what}"
    samples: dict[str, dict[str, list[int]]] = {}
    problems: dict[str, str] = {}  # per sample: why it cannot be read
    found: dict[str, dict] = {}  # per sample: its label member's text, its .json's label field
    metadata = 0  # members an operating system made beside the images (never images)
    for name, span, problem in members:
        if is_os_metadata(name):
            metadata += 1
            continue
        key, ext = split_key(name)
        samples.setdefault(key, {})[ext] = span
        if problem is None and size is not None and span[0] + span[1] > size:
            problem = f"{kind} member cut short: {uri} ends inside sample {key}"
        if problem is not None:
            problems.setdefault(key, problem)
        if name in content:
            found.setdefault(key, {})[ext] = content[name] if ext == label else _json_field(content[name], label)
    records, no_image = [], metadata
    outside = shard_folders(uri, root)
    for key, members_of in samples.items():
        image = next((e for e in members_of if e in IMAGE_EXTENSIONS), None)
        if image is None:
            no_image += 1
            continue
        folder_label, subset = label_and_subset(outside + tuple(key.split("/")[:-1]), folders)
        label_found = sample_label(found.get(key, {}), label, f"{uri}#{key}")
        records.append({"uri": f"{uri}#{key}", MEMBERS: json.dumps(members_of), IMAGE_MEMBER: f"{key}.{image}",
                        PLAN_ERROR: problems.get(key), "subset": subset,
                        "label": folder_label if label_found is None else label_found})
    if stopped is not None:
        folder_label, subset = label_and_subset(outside, folders)
        records.append({"uri": f"{uri}#{UNREADABLE}", MEMBERS: "{}", IMAGE_MEMBER: None, PLAN_ERROR: stopped,
                        "label": folder_label, "subset": subset})
    return records, no_image, version


SHARDS_SCHEMA = pa.schema([("uri", pa.string()), ("records", pa.int64()), ("no_image", pa.int64()),
                           ("damaged", pa.bool_()), ("version", pa.string())])  # one row per indexed shard


# Ray tasks pay a worker start-up each (seconds, importing pyarrow and fsspec) that small
# shards never earn back: the cluster indexes only a corpus of more shards than this.
CLUSTER_INDEX_MIN_SHARDS = 64


def _indexed_on_cluster(uris: list[str], address: str | None, label: str, root: str, folders: dict[str, int]
                        ) -> Iterator[tuple[list[dict], int, str]]:
    """index_shard over `uris` as Ray tasks across the cluster, results in shard order, a
    bounded number in flight (finished indexes wait in the object store, not by the thousand)."""
    import ray

    from pipeline.cluster import ensure_ray, task_window

    ensure_ray(address)
    task = ray.remote(num_cpus=1)(index_shard)
    window = task_window(INDEX_THREADS)
    pending: deque = deque()
    for uri in uris:
        pending.append(task.remote(uri, label, root, folders))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


SAMPLES_SCHEMA = pa.schema([("uri", pa.string()), (MEMBERS, pa.string()), (IMAGE_MEMBER, pa.string()),
                            (PLAN_ERROR, pa.string()), ("label", pa.int64()),
                            ("subset", pa.string())])  # a shard's sample records, as planned


def shard_folders(shard: str, root: str) -> tuple[str, ...]:
    """The folders between the input's root and a shard ('<root>/gen/1_fake/000.tar' -> ('gen', '1_fake'))."""
    rel = relative_paths(pa.array([shard], pa.string()), root)[0].as_py()
    return tuple(rel.split("/")[:-1]) if rel is not None else ()


def indexed_shards(uris: list[str], on_cluster: bool = False, address: str | None = None, label: str = "label",
                   root: str = "", folders: dict[str, int] = LABEL_FOLDERS) -> Iterator[tuple[pa.Table, dict]]:
    """Each shard's records (SAMPLES_SCHEMA) and its row of SHARDS_SCHEMA (record count,
    samples without an image, whether it could not be read whole, its version), in shard order, a
    bounded number indexed ahead. `on_cluster`: more than CLUSTER_INDEX_MIN_SHARDS shards
    are indexed by Ray tasks over the cluster (`address`, else RAY_ADDRESS, else a local
    Ray), so reading every shard's headers scales with its nodes rather than one driver's
    network. `label`, `root`, `folders`: where samples' labels come from (`index_shard`)."""
    from pipeline.progress import progress

    indexed = (_indexed_on_cluster(uris, address, label, root, folders)
               if on_cluster and len(uris) > CLUSTER_INDEX_MIN_SHARDS
               else read_ahead(functools.partial(index_shard, label=label, root=root, folders=folders), uris,
                               INDEX_THREADS))
    for uri, (records, no_image, version) in zip(uris, progress(indexed, "indexing tar shards", total=len(uris),
                                                                unit="shard")):
        yield pa.Table.from_pylist(records, schema=SAMPLES_SCHEMA), {
            "uri": uri, "records": len(records), "no_image": no_image,
            "damaged": any(r[PLAN_ERROR] is not None for r in records), "version": version}


def shards_table(shards: pa.Table | None) -> pa.Table:
    """A plan's shards in SHARDS_SCHEMA (a plan stored before versions were recorded: null
    versions; none yet: empty)."""
    if shards is None:
        return SHARDS_SCHEMA.empty_table()
    if "version" not in shards.column_names:
        shards = shards.append_column("version", pa.nulls(shards.num_rows, pa.string()))
    return shards.select(SHARDS_SCHEMA.names).cast(SHARDS_SCHEMA)


# A sample's uri is '<shard>#<key>', and a key may hold '#' (a zip of 'photo #12.jpg'): the
# shard ends at the first '.tar#' or '.zip#' (a shard of another name, at the last '#').
# RE2 (Arrow) and Python read it alike; an unmatched group replaces as ''.
SAMPLE_SHARD = r"(?i)^(.*?\.(?:tar|zip))#.*$|^(.*)#[^#]*$"


def sample_shard(uri: str) -> str:
    """The shard a sample's uri names ('<shard>#<key>' -> '<shard>')."""
    return re.sub(SAMPLE_SHARD, r"\1\2", uri, count=1)


def sample_shards(uris: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`sample_shard` of each."""
    return pc.replace_substring_regex(uris, SAMPLE_SHARD, r"\1\2", max_replacements=1)




def read_samples(records: pa.Table, threads: int, max_bytes: int, version: str | None = None):
    """(member columns, names, payloads) for a unit's sample records: each sample's members
    with one range read; json/txt members as strings, others as binary columns. `version`:
    the shard's as indexed (the records of a unit are one shard's); a shard written again
    since holds other bytes at those offsets, so once read its version is checked, and if
    it differs every row is an error (`schema.shard_changed`) instead of another sample's image."""
    shard_of = [sample_shard(u) for u in records["uri"].to_pylist()]
    members = [json.loads(m) for m in records[MEMBERS].to_pylist()]
    errors = records[PLAN_ERROR].to_pylist()
    images = records[IMAGE_MEMBER].to_pylist()

    def fetch(i: int):
        if errors[i] is not None:
            return None, errors[i]
        spans = members[i]
        if spans[images[i].rpartition(".")[2]][-1] > max_bytes:  # the last of a span is the member's size
            return None, f"file too large: over {max_bytes:,} bytes"
        try:
            fs, path = fsspec.core.url_to_fs(shard_of[i])
            if zip_shards.is_zip(path):
                return zip_shards.read_members(fs, path, spans), None
            start = min(off for off, _ in spans.values())
            end = max(off + n for off, n in spans.values())
            blob = fs.cat_file(path, start=start, end=end)
        except zip_shards.ZipMemberError as err:
            return None, str(err)
        except Exception as err:  # recorded on the row, never raised
            return None, f"read failed: {error_text(err)}"
        if len(blob) < end - start:
            return None, f"tar member cut short: {shard_of[i]} ends inside the sample"
        return {e: blob[off - start : off - start + n] for e, (off, n) in spans.items()}, None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        fetched = list(pool.map(fetch, range(records.num_rows)))
    if version is not None and shard_of:
        stale = _shard_change(shard_of[0], version)
        if stale is not None:
            fetched = [(None, stale)] * len(fetched)
    # json / txt always (null when absent): every part of a scan then has them, whatever
    # its samples hold; rarer members only where some sample of the unit has them
    extensions = sorted(({e for spans in members for e in spans} | set(TEXT_EXTENSIONS)) - set(IMAGE_EXTENSIONS))
    columns = {}
    for ext in extensions:
        values = [None if got is None else got.get(ext) for got, _ in fetched]
        if ext in TEXT_EXTENSIONS:
            columns[ext] = pa.array([None if v is None else v.decode("utf-8", "replace") for v in values], pa.string())
        else:
            columns[ext] = pa.array(values, pa.binary())
    payloads = [(None, err) if got is None else (got[images[i].rpartition(".")[2]], None)
                for i, (got, err) in enumerate(fetched)]
    return columns, images, payloads


def _shard_change(shard: str, version: str) -> str | None:
    """Why a unit's samples read from `shard` cannot be trusted (it is not the version they
    were indexed in: written again, or gone), else None."""
    try:
        now = current_version(shard)
    except Exception as err:  # recorded on the rows, never raised
        return f"read failed: {error_text(err)}"
    if now == version:
        return None
    return shard_changed(shard, f"was written again since it was planned (version {now}, planned {version})")
