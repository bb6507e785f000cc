"""The one listing of a folder of inputs, shared by ingest and scoring, so both see the same files.

Only regular files are inputs. Whatever else the walk meets is an entry with the reason it is not
read — a FIFO (``pipe.png`` would block the reader forever), a socket or device (a link to
``/dev/zero`` never ends), a dangling or looping link, a link to a folder — so that ingest can
quarantine it and scoring can give it its row with an error: nothing under the root disappears.

Links to folders are never followed: one out of the root would list another archive, one inside
it would list the same images twice (under two classes or patients), one above itself loops. A
link to a regular file is read when the file lies inside the root too, and recorded as skipped when
it points out of it: what an ingest or a scoring run reads is what its root holds. Folders are also tracked by device and inode, so a loop made without
links (a bind mount) is walked once. An S3 prefix holds objects only, all of them inputs. A
``dicomweb://`` URI lists the instances its QIDO-RS filters choose (medray.io.pacs), whatever their
extension: instances have none.

The order is stable (each folder's files by name, then its sub-folders by name, depth first), as
scoring's resumption compares the listing of each part with what it committed.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from medray.io import dicomweb, storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


@dataclass(frozen=True)
class Entry:
    uri: str
    skipped: str = ""  # why this entry is not read; "" for a regular file


def walk(uri: str, extensions: tuple[str, ...] | list[str] | None = None) -> Iterator[Entry]:
    """Every file under ``uri`` whose name ends in one of ``extensions`` (all when None), and every
    entry that looks like one but is not a regular file, and every link to a folder, as it goes."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    if storage.is_s3(uri):
        yield from (Entry(u) for u in storage.iter_files(uri, exts))
        return
    if dicomweb.is_dicomweb(uri):
        from medray.io.pacs import iter_instances

        yield from (Entry(instance.uri) for instance in iter_instances(uri))
        return
    root = storage.absolute(uri)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{uri}: no such folder")
    yield from _walk_local(root, exts)


def _walk_local(root: str, exts: tuple[str, ...] | None) -> Iterator[Entry]:
    real_root = os.path.realpath(root)
    first = os.stat(root)
    seen = {(first.st_dev, first.st_ino)}
    stack = [root]  # folders still to walk, the next one last
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            yield Entry(folder, f"folder cannot be listed ({err.__class__.__name__})")
            continue
        folders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry)
            elif entry.is_symlink() and _points_to_folder(entry.path):
                folders.append(entry)
            elif exts is None or entry.name.lower().endswith(exts):
                yield Entry(entry.path, _not_a_file(entry, real_root))
        below = []
        for entry in folders:
            if entry.is_symlink():
                yield Entry(entry.path, _folder_link(entry.path, real_root))
                continue
            info = entry.stat(follow_symlinks=False)
            if (info.st_dev, info.st_ino) in seen:
                yield Entry(entry.path, "folder already listed under another path (a loop): not listed again")
                continue
            seen.add((info.st_dev, info.st_ino))
            below.append(entry.path)
        stack.extend(reversed(below))


def _points_to_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:  # dangling or looping: reported as a file entry
        return False


def _inside(path: str, real_root: str) -> bool:
    target = os.path.realpath(path)
    return target == real_root or target.startswith(real_root + os.sep)


def _not_a_file(entry: os.DirEntry, real_root: str) -> str:
    """Why the entry is not read, or "" for a regular file (or a link to one inside the root)."""
    try:
        mode = entry.stat(follow_symlinks=True).st_mode
    except FileNotFoundError:
        return "dangling link: its target does not exist"
    except OSError as err:
        if entry.is_symlink():
            return f"link that cannot be followed ({os.strerror(err.errno) if err.errno else err.__class__.__name__})"
        return f"cannot be read ({err.__class__.__name__})"
    if stat.S_ISREG(mode):
        return "" if not entry.is_symlink() or _inside(entry.path, real_root) else "link to a file out of the root: not read"
    what = storage.file_kind(mode)
    return f"link to a {what}, not a regular file" if entry.is_symlink() else f"a {what}, not a regular file"


def _folder_link(path: str, real_root: str) -> str:
    target = os.path.realpath(path)
    here = os.path.realpath(os.path.dirname(path))
    if here == target or here.startswith(target + os.sep):
        return "link to a folder above it (a loop): not followed"
    if _inside(path, real_root):
        return "link to a folder inside the root: not followed (its files are listed under their own path)"
    return "link to a folder out of the root: not followed"


def manifest_uri(folder: str, uri) -> str:
    """A manifest's relative path starts at the manifest's folder (local or S3), wherever the worker runs."""
    uri = str(uri).strip()
    if storage.is_remote(uri) or os.path.isabs(uri) or not uri:
        return uri
    if storage.is_s3(folder):
        return storage.S3 + posixpath.normpath(posixpath.join(folder[len(storage.S3) :], uri))
    return os.path.normpath(os.path.join(folder, uri))
