"""Read rosbag2 folders (mcap or sqlite3, any metadata version, split files) as raw CDR messages.

``rosbags``' own readers match a storage file's topics to metadata.yaml's by topic, type *and* QoS,
so bags whose recorded QoS differs between the two (the classic talker bags of ``ros2 bag``) read as
empty, and ``AnyReader`` gives up on message definitions it cannot parse (service events of missing
packages). We only need raw bytes, so we open the bag with ``rosbags.rosbag2.Reader`` and then read
every storage file ourselves, matching its connections by topic and type only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from surgery_r1_ros.ros_fields import ns_to_seconds

log = logging.getLogger(__name__)

STORAGES = ("mcap", "sqlite3")
_SUFFIX_STORAGE = {".mcap": "mcap", ".db3": "sqlite3"}


class BagError(RuntimeError):
    """A bag that cannot be read, with the file and the reason."""


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag as metadata.yaml describes it."""

    name: str
    msgtype: str
    count: int
    qos: tuple = ()  # rosbags Qos profiles recorded for the topic (often empty)


@dataclass(frozen=True)
class BagMessage:
    """One message: topic, type, receive time (ns since epoch) and CDR bytes."""

    topic: str
    msgtype: str
    timestamp: int
    data: bytes


@dataclass
class BagInfo:
    """What a bag holds, read without touching its messages."""

    path: Path
    storage: str
    version: int | None
    files: list[Path]
    topics: list[TopicInfo]
    message_count: int
    start_ns: int
    end_ns: int
    compression: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return ns_to_seconds(max(0, self.end_ns - self.start_ns)) if self.message_count else 0.0

    def topic(self, name: str) -> TopicInfo:
        for topic in self.topics:
            if topic.name == name:
                return topic
        raise BagError(f"{self.path}: no topic {name!r}; topics: {', '.join(t.name for t in self.topics) or 'none'}")

    def summary(self) -> str:
        lines = [
            f"bag {self.path} ({self.storage}, metadata v{self.version}, {len(self.files)} file(s))",
            f"  {self.message_count} messages over {self.duration_s:.3f} s",
        ]
        for t in self.topics:
            lines.append(f"  {t.name:<40} {t.msgtype:<45} {t.count}")
        return "\n".join(lines)


class BagReader:
    """A rosbag2 folder (or a single .mcap/.db3 file) opened for reading raw messages.

    Use as a context manager. Errors name the bag and what is wrong with it, as :class:`BagError`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader = None
        self.info: BagInfo | None = None

    # -- opening ---------------------------------------------------------------------------------
    def open(self) -> BagInfo:
        from rosbags.rosbag2 import Reader

        path = self.path
        if not path.exists():
            raise FileNotFoundError(f"bag {path} does not exist")
        if path.is_dir() and not (path / "metadata.yaml").exists():
            found = sorted(p.name for p in path.iterdir() if p.suffix in _SUFFIX_STORAGE)
            hint = f" (it holds {', '.join(found)}: pass one of those files)" if found else ""
            raise BagError(f"{path}: not a rosbag2 folder, metadata.yaml is missing{hint}")
        if path.is_file() and path.suffix not in _SUFFIX_STORAGE:
            raise BagError(f"{path}: unknown bag file type {path.suffix!r}; expected a rosbag2 folder, .mcap or .db3")
        try:
            reader = Reader(path)
            reader.open()
        except FileNotFoundError as err:
            raise BagError(f"{path}: {err}") from None
        except Exception as err:  # rosbags ReaderError, apsw/mcap errors on corrupt files, yaml errors
            detail = _describe(err)
            if any(word in detail.lower() for word in ("magic", "database", "corrupt", "malformed", "truncat")):
                detail += " (a storage file is truncated or corrupt)"
            raise BagError(f"{path}: cannot open bag: {detail}") from err
        self._reader = reader
        storage_obj = getattr(reader, "storage", reader)
        storages = getattr(storage_obj, "storages", None) or [storage_obj]
        files = [Path(getattr(s, "path", path)) for s in storages]
        storage = "mcap" if any(f.suffix == ".mcap" for f in files) else "sqlite3"
        if path.is_file():
            storage = _SUFFIX_STORAGE[path.suffix]
        meta = getattr(storage_obj, "metadata", None)
        compression = getattr(meta, "compression_mode", None) if meta is not None else None
        topics = [
            TopicInfo(c.topic, c.msgtype, int(c.msgcount), tuple(getattr(c.ext, "offered_qos_profiles", ()) or ()))
            for c in reader.connections
        ]
        count = int(reader.message_count)
        start, end = (int(reader.start_time), int(reader.end_time)) if count else (0, 0)
        self.info = BagInfo(
            path=path,
            storage=storage,
            version=_metadata_version(path),
            files=files,
            topics=topics,
            message_count=count,
            start_ns=start,
            end_ns=end,
            compression=compression,
        )
        return self.info

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception as err:  # closing a half-broken storage must not hide the real error
                log.debug("closing %s: %s", self.path, err)
            self._reader = None

    def __enter__(self) -> BagReader:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------
    def messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None) -> Iterator[BagMessage]:
        """Raw messages of ``topics`` (all when None) in bag order, from ``start_ns`` on."""
        if self._reader is None or self.info is None:
            raise BagError(f"{self.path}: bag is not open")
        wanted = set(topics) if topics is not None else None
        if wanted is not None:
            unknown = wanted - {t.name for t in self.info.topics}
            if unknown:
                raise BagError(
                    f"{self.path}: no topic(s) {', '.join(sorted(unknown))}; "
                    f"topics: {', '.join(t.name for t in self.info.topics) or 'none'}"
                )
        storage_obj = getattr(self._reader, "storage", self._reader)
        storages = getattr(storage_obj, "storages", None)
        decompress = None
        if getattr(getattr(storage_obj, "metadata", None), "compression_mode", None) == "message":
            from rosbags.rosbag2.reader import zstd

            decompress = zstd.decompress
        if storages is None:  # a single storage file opened directly
            storages = [storage_obj]
        for storage in storages:
            conns = [c for c in storage.connections if wanted is None or c.topic in wanted]
            if not conns:
                continue
            name = getattr(storage, "path", self.path)
            try:
                for conn, timestamp, data in storage.messages(conns, start_ns, None):
                    raw = decompress(data) if decompress else data
                    yield BagMessage(conn.topic, conn.msgtype, int(timestamp), bytes(raw))
            except BagError:
                raise
            except Exception as err:  # truncated/corrupt storage file
                raise BagError(f"{name}: cannot read messages (truncated or corrupt?): {_describe(err)}") from err


def open_bag(path: str | Path) -> BagReader:
    """Open a bag for reading; use ``with open_bag(p) as bag: ...``."""
    reader = BagReader(path)
    reader.open()
    return reader


def bag_info(path: str | Path) -> BagInfo:
    """Metadata of a bag (topics, counts, time range) without reading its messages."""
    with BagReader(path) as bag:
        assert bag.info is not None
        return bag.info


def _metadata_version(path: Path) -> int | None:
    meta = path / "metadata.yaml" if path.is_dir() else None
    if meta is None or not meta.exists():
        return None
    for line in meta.read_text(errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith("version:"):
            try:
                return int(stripped.split(":", 1)[1])
            except ValueError:
                return None
    return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
