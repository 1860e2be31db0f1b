"""Paths below a local directory or an fsspec URI (s3://...), spelled one way."""
from __future__ import annotations

from urllib.parse import urlsplit

SCHEME_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://"  # 's3://', 'https://', 'file://'
WEB_SCHEMES = ("http://", "https://")
WEB_URL_PATTERN = r"^(?i)https?://"  # the same test as is_web_url, for vectorized (Arrow) matching


def join_uri(base: str, *parts: str) -> str:
    """'s3://b/x/' + 'y', '/z.json' -> 's3://b/x/y/z.json' (no doubled or trailing slashes)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def is_within(uri: str, folder: str) -> bool:
    """Whether `uri` is `folder` or lies below it ('s3://b/x/y' in 's3://b/x', not in 's3://b/x-y')."""
    return (uri.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")


def below_start(folder: str) -> int:
    """Where the part below `folder` begins in a path listed under it: path[below_start(folder):]
    ('s3://b/x/' and 's3://b/x' list 's3://b/x/y/z.jpg': 'y/z.jpg')."""
    return len(folder.rstrip("/")) + 1


def is_web_url(uri: str) -> bool:
    return uri[:8].lower().startswith(WEB_SCHEMES)


def image_name(uri: str) -> str:
    """The file name a URI gives its image: a web URL's path without its query and fragment
    ('https://cdn/x.png?w=512' -> 'https://cdn/x.png'); any other URI as it is ('#' and
    '?' are plain characters of file names and object keys)."""
    if not is_web_url(uri):
        return uri
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# What operating systems leave beside images, never images themselves: macOS's AppleDouble
# files ('._photo.jpg', its copies on other filesystems, and in zips below '__MACOSX/'),
# folder settings and thumbnail caches.
OS_METADATA_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
OS_METADATA_FOLDER = "__MACOSX"


def is_os_metadata(path: str) -> bool:
    """Whether a file (its path, '/'-separated) is one an operating system made beside images."""
    name = path.rsplit("/", 1)[-1]
    return (name.startswith("._") or name.lower() in OS_METADATA_NAMES
            or path.startswith(OS_METADATA_FOLDER + "/") or f"/{OS_METADATA_FOLDER}/" in path)
