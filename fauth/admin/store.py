# -*- test-case-name: tests.admin.test_store -*-
"""
Where the admin API's changes are kept: one small JSON file,
C{{"routes": {id: doc}, "upstreams": {id: doc}, "meta": {...}}} (and
C{"services"}, C{"plugin_configs"} when there are any), replaced atomically
on every change so that a crash at any moment leaves either the old or the
new state on disk, never a torn file.

C{meta} holds what etcd would keep beside the documents: a revision counted
up by every change, each object's C{createdIndex} and C{modifiedIndex} (the
revisions that created and last changed it, as APISIX's admin API shows
them) and, for objects written with C{?ttl=}, when they expire.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import attr

from fauth.config import ConfigError

__all__ = ["Store", "StoreContents", "atomic_write"]

#: The object kinds, in APISIX's etcd and admin API names; an object may
#: name one of an earlier kind (a route its service, a service its upstream).
KINDS = ("upstreams", "plugin_configs", "services", "routes")


@attr.frozen
class StoreContents:
    """
    The raw documents the admin API accepted (routes, upstreams, services,
    plugin configs), by id, in the order they were first written.  Never
    mutated: a change builds a new one (see L{with_doc} and L{without}).
    """

    routes: Mapping[str, Mapping[str, Any]] = attr.field(factory=dict)
    upstreams: Mapping[str, Mapping[str, Any]] = attr.field(factory=dict)
    services: Mapping[str, Mapping[str, Any]] = attr.field(factory=dict)
    plugin_configs: Mapping[str, Mapping[str, Any]] = attr.field(factory=dict)
    # (The bookkeeping below is not compared: two contents are equal when
    # they hold the same documents.)
    revision: int = attr.field(default=0, eq=False)
    #: C{(kind, id)}: C{(createdIndex, modifiedIndex)}.
    indexes: Mapping[Tuple[str, str], Tuple[int, int]] = attr.field(factory=dict, eq=False)
    #: C{(kind, id)}: when it expires (seconds since the epoch), for objects written with a TTL.
    expires: Mapping[Tuple[str, str], float] = attr.field(factory=dict, eq=False)

    def of(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        """The documents of C{kind} (one of L{KINDS})."""
        docs: Mapping[str, Mapping[str, Any]] = getattr(self, kind)
        return docs

    def with_doc(
        self, kind: str, doc_id: str, doc: Mapping[str, Any], expires: Optional[float] = None
    ) -> "StoreContents":
        """
        A copy with C{doc} stored under C{doc_id} (in place if it existed),
        expiring at C{expires} if given (a write without one keeps none, as
        an etcd put without a lease).
        """
        docs = dict(self.of(kind))
        docs[doc_id] = doc
        revision = self.revision + 1
        indexes = dict(self.indexes)
        created = indexes.get((kind, doc_id), (revision, revision))[0]
        indexes[(kind, doc_id)] = (created, revision)
        expiry = dict(self.expires)
        expiry.pop((kind, doc_id), None)
        if expires is not None:
            expiry[(kind, doc_id)] = expires
        return attr.evolve(self, revision=revision, indexes=indexes, expires=expiry, **{kind: docs})

    def without(self, kind: str, doc_id: str) -> "StoreContents":
        """A copy without the document C{doc_id}."""
        docs = dict(self.of(kind))
        del docs[doc_id]
        indexes = dict(self.indexes)
        indexes.pop((kind, doc_id), None)
        expiry = dict(self.expires)
        expiry.pop((kind, doc_id), None)
        return attr.evolve(self, revision=self.revision + 1, indexes=indexes, expires=expiry, **{kind: docs})

    def to_json(self) -> bytes:
        """The file's bytes."""
        doc: Dict[str, Any] = {"routes": dict(self.routes), "upstreams": dict(self.upstreams)}
        # The newer kinds only when used: an older fauth can still read the file.
        doc.update((kind, dict(self.of(kind))) for kind in ("services", "plugin_configs") if self.of(kind))
        meta: Dict[str, Any] = {"revision": self.revision}
        for kind in list(doc):
            entries = meta[kind] = {}
            for doc_id in self.of(kind):
                created, modified = self.indexes.get((kind, doc_id), (0, 0))
                entry: Dict[str, Any] = {"created": created, "modified": modified}
                if (kind, doc_id) in self.expires:
                    entry["expires"] = self.expires[(kind, doc_id)]
                entries[doc_id] = entry
        doc["meta"] = meta
        # Compact: indent would turn off json's C encoder (5x slower).
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


def _fsync_directory(directory: str) -> None:
    # The rename is only durable once the directory entry itself is on disk.
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(directory, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """
    Replace the file at C{path} with C{data} atomically and durably: a
    temporary file in the same directory is written, flushed and fsynced,
    renamed over C{path} with C{os.replace}, and the directory is fsynced.

    A crash before the rename leaves the old file untouched (and at worst a
    stray C{.<name>.*.tmp} next to it); after it, the new one.  Synchronous:
    meant for small files.

    @raise OSError: the file could not be written; C{path} is unchanged.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                # Keep the permissions an operator gave the existing file.
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
            except OSError:
                pass
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _shape_error(path: str, what: str) -> ConfigError:
    return ConfigError(
        'store %s: %s (expected {"routes": {id: route}, "upstreams": {id: upstream}}); '
        "fix or remove the file" % (path, what)
    )


def _read_meta(
    path: str, meta: object, found: Mapping[str, Mapping[str, Any]]
) -> Tuple[int, Dict[Tuple[str, str], Tuple[int, int]], Dict[Tuple[str, str], float]]:
    """The revision, indexes and expiry times of a store file's C{meta}; a file written before it had one gets indexes in its order."""
    if not isinstance(meta, dict) or not isinstance(meta.get("revision", 0), int):
        raise _shape_error(path, '"meta" is not an object with an integer "revision"')
    revision = meta.get("revision", 0)
    indexes: Dict[Tuple[str, str], Tuple[int, int]] = {}
    expires: Dict[Tuple[str, str], float] = {}
    for kind in KINDS:
        entries = meta.get(kind, {})
        if not isinstance(entries, dict):
            raise _shape_error(path, '"meta.%s" is not an object' % kind)
        for doc_id in found[kind]:
            entry = entries.get(doc_id)
            if not isinstance(entry, dict):
                revision += 1
                indexes[(kind, doc_id)] = (revision, revision)
                continue
            created, modified, expiry = entry.get("created"), entry.get("modified"), entry.get("expires")
            if not isinstance(created, int) or not isinstance(modified, int):
                raise _shape_error(path, '"meta.%s.%s" lacks integer "created" and "modified"' % (kind, doc_id))
            indexes[(kind, doc_id)] = (created, modified)
            if isinstance(expiry, (int, float)) and not isinstance(expiry, bool):
                expires[(kind, doc_id)] = float(expiry)
    return revision, indexes, expires


class Store:
    """
    The store file.

    @param path: made absolute at construction, so a later C{chdir} (twistd
        daemonising) does not move it.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def load(self) -> StoreContents:
        """
        Read the store; a missing file is an empty store.  Only the shape is
        checked here (the documents are validated with the configuration).

        @raise ConfigError: one line naming the file.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            # Refuse now rather than answer every later change with 500.
            directory = os.path.dirname(self.path)
            if not os.path.isdir(directory):
                raise ConfigError("store %s: its directory does not exist" % self.path)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise ConfigError("store %s: its directory is not writable" % self.path)
            return StoreContents()
        except OSError as e:
            raise ConfigError("store %s: cannot read it: %s" % (self.path, e.strerror or e))

        def refuse_constant(name: str) -> Any:
            raise ValueError("%s is not allowed in JSON" % name)

        try:
            doc = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
            raise ConfigError("store %s: not valid JSON: %s; fix or remove the file" % (self.path, e))
        if not isinstance(doc, dict):
            raise _shape_error(self.path, "not a JSON object")
        for key in doc:
            if key not in KINDS and key != "meta":
                raise _shape_error(self.path, 'unknown key "%s"' % key)
        found: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for kind in KINDS:
            docs = doc.get(kind, {})
            if not isinstance(docs, dict):
                raise _shape_error(self.path, '"%s" is not an object' % kind)
            for doc_id, item in docs.items():
                if not isinstance(item, dict):
                    raise _shape_error(self.path, '%s "%s" is not an object' % (kind[:-1], doc_id))
                if str(item.get("id")) != doc_id:
                    raise _shape_error(
                        self.path, '%s "%s" holds a document with id "%s"' % (kind[:-1], doc_id, item.get("id"))
                    )
            found[kind] = docs
        revision, indexes, expires = _read_meta(self.path, doc.get("meta", {}), found)
        return StoreContents(revision=revision, indexes=indexes, expires=expires, **found)

    def save(self, contents: StoreContents) -> None:
        """
        Write C{contents} atomically (see L{atomic_write}); when this returns
        the change is on disk.

        @raise OSError: nothing was changed.
        """
        atomic_write(self.path, contents.to_json())
