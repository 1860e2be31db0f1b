"""Where a Parquet shard keeps its images: a binary column, or a Hugging Face `Image` struct.

The Hub's image datasets store `image` as `struct<bytes: binary, path: string>` and describe
their features (Image, ClassLabel and its names) as JSON under the `huggingface` schema
metadata key. A struct image column is found from that metadata, else from the struct's
shape; its `path` names the image (alignment by extension) and serves as `uri` when the
shard has no uri column. A configured column of another type is refused while planning.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

PATH_SUFFIX = "_path"  # the struct's path, carried to the output as <column>_path


class ImageColumnError(ValueError):
    """A configured image column that cannot hold images (wrong type, missing field)."""


@dataclass(frozen=True)
class ImageColumn:
    column: str  # top-level column
    field: str | None = None  # the struct's bytes field; None: the column is binary itself
    path_field: str | None = None  # the struct's path field, if any

    @property
    def path_column(self) -> str | None:
        return f"{self.column}{PATH_SUFFIX}" if self.path_field else None


def _binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _struct_image(t: pa.DataType, field: str = "bytes") -> ImageColumn | None:
    """(bytes field, path field) of an image struct type; None if it is not one."""
    if not pa.types.is_struct(t) or t.get_field_index(field) < 0 or not _binary(t.field(field).type):
        return None
    path = t.get_field_index("path")
    has_path = path >= 0 and (pa.types.is_string(t.field(path).type) or pa.types.is_large_string(t.field(path).type))
    return ImageColumn("", field, "path" if has_path else None)


def hf_features(schema: pa.Schema) -> dict:
    """The `datasets` feature description stored with the file ({} when there is none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def find_image_column(schema: pa.Schema, configured: str, where: str) -> ImageColumn | None:
    """The shard's image column: `configured` ('bytes', 'image', or 'image.bytes') when the
    schema has it, else a Hugging Face Image column (metadata, then struct shape); None when
    the shard holds no images. Raises ImageColumnError for a configured column of a wrong type."""
    name, _, field = configured.partition(".")
    if name in schema.names:
        t = schema.field(name).type
        if field:
            found = _struct_image(t, field)
        else:
            found = ImageColumn(name) if _binary(t) else _struct_image(t)
        if found is None:
            wanted = (f"a struct with a binary {field!r} field" if field
                      else "binary image bytes, or a struct with a binary 'bytes' field (a Hugging Face Image)")
            raise ImageColumnError(f"{where}: column {name!r} is {t}; expected {wanted} (columns.bytes: {configured!r})")
        return ImageColumn(name, found.field, found.path_field) if found.field else found
    features = hf_features(schema)
    candidates = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    candidates += [f.name for f in schema if f.name not in candidates]
    for candidate in candidates:
        if candidate in schema.names:
            found = _struct_image(schema.field(candidate).type)
            if found is not None:
                return ImageColumn(candidate, found.field, found.path_field)
    return None


def split_image_column(table: pa.Table, image: ImageColumn) -> pa.Table:
    """The struct column -> `bytes` (+ `<column>_path`); a binary column -> `bytes`."""
    if image.field is None:
        return table.rename_columns(["bytes" if n == image.column else n for n in table.column_names])
    struct = table[image.column].combine_chunks()
    at = table.column_names.index(image.column)
    table = table.remove_column(at)
    for name, field in ((image.path_column, image.path_field), ("bytes", image.field)):
        if field and struct.type.get_field_index(field) >= 0:  # read without its bytes: path only
            table = table.add_column(at, name, pc.struct_field(struct, field))
    return table


def class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """Names of a ClassLabel feature (label i is names[i]), if the metadata describes one."""
    feature = hf_features(schema).get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None
