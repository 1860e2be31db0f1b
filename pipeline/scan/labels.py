"""Labels of input records: 0 real, 1 fake, null unknown; one vocabulary for every source
(label folders of a tree, label columns of shards and manifests, WebDataset members)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

LABEL_FOLDERS = {"0_real": 0, "nature": 0, "1_fake": 1, "ai": 1}
LABEL_NAMES = {**LABEL_FOLDERS, "0": 0, "1": 1, "real": 0, "fake": 1}
LABEL_VALUES = "0/1/real/fake/0_real/1_fake/nature/ai"


def label_folders(extra: dict[str, object] | None = None) -> dict[str, int]:
    """The folder names that label what is below them: the official ones, and `extra`
    (a corpus's own, such as CIFAKE's {'REAL': 'real', 'FAKE': 'fake'}; a value is any label
    value, `label_value`); a value that is no label is a ValueError naming the folder."""
    if not extra:
        return LABEL_FOLDERS
    folders = dict(LABEL_FOLDERS)
    for name, value in extra.items():
        try:
            folders[name] = label_value(value if isinstance(value, (bool, int)) else str(value))
        except ValueError as err:
            raise ValueError(f"label folder {name!r}: {err}") from None
        if folders[name] is None:
            raise ValueError(f"label folder {name!r}: no label given")
    return folders


def label_folders_identity(extra: dict[str, object] | None) -> dict[str, int] | None:
    """A corpus's own label folders as an output's identity records them: each name's label
    (REAL=real and REAL=0 are one setting), by name; None when unset."""
    if not extra:
        return None
    folders = label_folders(extra)
    return {name: folders[name] for name in sorted(extra)}


def label_like(parts: tuple[str, ...], folders: dict[str, int] = LABEL_FOLDERS) -> str | None:
    """The first folder named like a label that is not a label folder ('REAL', 'fake',
    '0_Real'): official label folders are named exactly, so its images are unlabeled."""
    return next((name for name in parts if name not in folders and name.lower() in LABEL_LIKE), None)


LABEL_LIKE = {name.lower() for name in LABEL_NAMES if not name.isdigit()} | {"reals", "fakes", "generated", "synthetic"}


def label_and_subset(parts: tuple[str, ...], folders: dict[str, int] = LABEL_FOLDERS) -> tuple[int | None, str | None]:
    """Folders of a file below the root -> (label of the deepest label folder, subset);
    `folders`: the label folders' names (`label_folders`)."""
    label, depth = None, None
    for i, name in enumerate(parts):
        if name in folders:
            label, depth = folders[name], i
    subset = parts[0] if depth is not None and parts[0] not in folders else None
    return label, subset


def label_value(value) -> int | None:
    """One label as given (0/1, a boolean, a name in any case, text such as b'1\\n') -> 0, 1
    or None; anything else is a ValueError naming the value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    key = str(value).strip().lower()
    if isinstance(value, str) and key in LABEL_NAMES:
        return LABEL_NAMES[key]
    raise ValueError(f"label value {value!r} is not one of {LABEL_VALUES}")


def normalize_labels(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """0/1 integers, booleans, or names (real/fake, 0_real/1_fake, nature/ai) -> int64."""
    if pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
        out = pc.cast(col, pa.int64())
    else:
        out = pa.array([label_value(None if v is None else str(v)) for v in col.to_pylist()], pa.int64())
    bad = pc.sum(pc.and_(pc.is_valid(out), pc.invert(pc.is_in(out, pa.array([0, 1]))))).as_py()
    if bad:
        raise ValueError(f"{bad} label values are not 0 or 1")
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out
