"""Per-app chunked log files with an index, rolling, compression and retention.

Layout (``ROOT`` is ``DATA_DIR/logs``)::

    ROOT/<app>/00000001.log.gz   closed chunk: one gzip member per block
    ROOT/<app>/00000002.log      the open chunk (plain text, appended to)
    ROOT/<app>/index.json        closed chunks: blocks, time range, counts

A chunk is a sequence of *blocks* (at most ``block_lines`` lines or
``block_bytes`` bytes).  For every block the index keeps its byte offset and
length in the file, its line count, the app-local number of its first line,
its smallest and largest timestamp and the sources it holds.  When a chunk is
closed, each block is compressed as its own gzip member, so one block can be
read without decompressing the chunk.  "The last N lines", "since T" and a
filter over a time range read only the blocks that can match, newest first.

The open chunk rolls when it reaches ``chunk_max_bytes`` or has been open for
``chunk_max_age`` seconds.  Retention deletes closed chunks older than
``retention_age`` and, oldest first, those that push an app over
``retention_bytes``.  Time comes from the injected clock only.

Every record names the (sender, source) stream position it came from, so after
a crash the logger recovers exactly which lines it has stored (see
:meth:`LogStore.stream_position`) and counts the rest as lost.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.config.settings import LoggerSettings
from epio.logs.records import APP_RE, CorruptRecord, LogRecord, decode

INDEX = "index.json"
INDEX_VERSION = 1
IDLE_CLOSE = 300.0  # seconds without a line after which an app's open chunk file is closed
_CHUNK_RE = re.compile(r"^(\d{8})\.log(\.gz)?$")

RunBlocking = Callable[[Callable[[], Any]], "Deferred[Any]"]


def run_inline(f: Callable[[], Any]) -> Deferred[Any]:
    """Run blocking work at once (tests and tools); the service uses a thread pool."""
    try:
        return succeed(f())
    except BaseException:
        from twisted.internet.defer import fail

        return fail()


@frozen
class StoreConfig:
    chunk_max_bytes: int = 8 * 1024 * 1024
    chunk_max_age: float = 3600.0
    retention_age: float = 7 * 86400.0
    retention_bytes: int = 256 * 1024 * 1024
    block_lines: int = 1000
    block_bytes: int = 64 * 1024
    compress_level: int = 6

    @classmethod
    def from_settings(cls, settings: LoggerSettings) -> StoreConfig:
        return cls(
            chunk_max_bytes=settings.chunk_max_bytes,
            chunk_max_age=settings.chunk_max_age,
            retention_age=settings.retention_age,
            retention_bytes=settings.retention_bytes,
        )


@define
class Block:
    offset: int
    length: int
    count: int
    first_lineno: int
    min_ts: float
    max_ts: float
    sources: set[str] = field(factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset, "length": self.length, "count": self.count,
            "first": self.first_lineno, "min_ts": self.min_ts, "max_ts": self.max_ts,
            "sources": sorted(self.sources),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Block:
        return cls(d["offset"], d["length"], d["count"], d["first"], d["min_ts"], d["max_ts"],
                   set(d["sources"]))

    def add(self, rec: LogRecord, nbytes: int) -> None:
        if self.count == 0:
            self.min_ts = self.max_ts = rec.timestamp
        else:
            if rec.timestamp < self.min_ts:
                self.min_ts = rec.timestamp
            if rec.timestamp > self.max_ts:
                self.max_ts = rec.timestamp
        self.count += 1
        self.length += nbytes
        self.sources.add(rec.source)


@define
class Chunk:
    number: int
    first_lineno: int
    opened_at: float
    count: int = 0
    raw_bytes: int = 0  # uncompressed size
    disk_bytes: int = 0  # size of the file as it is now
    closed_at: float | None = None
    last_write: float = 0.0  # logger clock at the last append: retention age
    compressed: bool = False
    blocks: list[Block] = field(factory=list)

    @property
    def min_ts(self) -> float:
        return min((b.min_ts for b in self.blocks if b.count), default=0.0)

    @property
    def max_ts(self) -> float:
        return max((b.max_ts for b in self.blocks if b.count), default=0.0)

    def filename(self) -> str:
        return f"{self.number:08d}.log" + (".gz" if self.compressed else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number, "first": self.first_lineno, "opened_at": self.opened_at,
            "closed_at": self.closed_at, "last_write": self.last_write, "count": self.count, "raw_bytes": self.raw_bytes,
            "disk_bytes": self.disk_bytes, "compressed": self.compressed,
            "min_ts": self.min_ts, "max_ts": self.max_ts,
            "blocks": [b.to_json() for b in self.blocks],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Chunk:
        return cls(
            number=d["number"], first_lineno=d["first"], opened_at=d["opened_at"],
            count=d["count"], raw_bytes=d["raw_bytes"], disk_bytes=d["disk_bytes"],
            closed_at=d["closed_at"], last_write=d.get("last_write", d["closed_at"] or 0.0),
            compressed=d["compressed"],
            blocks=[Block.from_json(b) for b in d["blocks"]],
        )


@frozen
class ChunkView:
    """An immutable snapshot of what a query may read from one chunk."""

    path: Path
    compressed: bool
    blocks: tuple[Block, ...]


@frozen
class Query:
    """What to read.  ``n``: the last n matching lines (or the first n after
    ``after``); ``sources``: a name matches itself and, without a dot, every
    instance of it (``web`` matches ``web.1``); ``grep``: a compiled regex
    searched in the text; ``since``/``until``: timestamp range [since, until)."""

    n: int = 100
    since: float | None = None
    until: float | None = None
    sources: frozenset[str] = frozenset()
    grep: Any = None  # a compiled pattern (RE2 from epio.logclient.compile_grep)
    after: int | None = None

    def source_ok(self, source: str) -> bool:
        if not self.sources:
            return True
        if source in self.sources:
            return True
        return source.split(".", 1)[0] in self.sources

    def block_ok(self, b: Block) -> bool:
        if b.count == 0:
            return False
        if self.since is not None and b.max_ts < self.since:
            return False
        if self.until is not None and b.min_ts >= self.until:
            return False
        if self.after is not None and b.first_lineno + b.count - 1 <= self.after:
            return False
        return not self.sources or any(self.source_ok(s) for s in b.sources)

    def line_ok(self, r: LogRecord) -> bool:
        if self.since is not None and r.timestamp < self.since:
            return False
        if self.until is not None and r.timestamp >= self.until:
            return False
        if self.after is not None and r.lineno <= self.after:
            return False
        if not self.source_ok(r.source):
            return False
        # a lost marker passes the text filter: a reader must see lines are missing
        return r.lost > 0 or self.grep is None or self.grep.search(r.text) is not None


@frozen
class QueryResult:
    lines: list[LogRecord]
    scanned_blocks: int
    # the app's next line number at the time of the query: a live follower
    # continues with lines numbered >= this
    next_lineno: int
    # a file vanished under the query (compressed or deleted meanwhile)
    incomplete: bool = False


def read_block(path: Path, compressed: bool, block: Block) -> list[LogRecord]:
    """Read and decode one block (blocking I/O)."""
    with open(path, "rb") as f:
        f.seek(block.offset)
        data = f.read(block.length)
    if compressed:
        data = zlib.decompress(data, wbits=31)
    out = []
    lineno = block.first_lineno
    for raw in data.decode("utf-8", "surrogateescape").split("\n")[: block.count]:
        try:
            out.append(decode(raw, lineno))
        except CorruptRecord:
            pass
        lineno += 1
    return out


def run_query(views: list[ChunkView], q: Query, next_lineno: int) -> QueryResult:
    """Execute ``q`` over chunk snapshots (blocking I/O: run it in a thread)."""
    scanned = 0
    missing = False
    blocks = [(v, b) for v in views for b in v.blocks if q.block_ok(b)]
    result: list[LogRecord] = []
    if q.after is not None:
        for v, b in blocks:
            scanned += 1
            try:
                recs = read_block(v.path, v.compressed, b)
            except FileNotFoundError:  # compressed or deleted by retention meanwhile
                missing = True
                continue
            result.extend(r for r in recs if q.line_ok(r))
            if len(result) >= q.n:
                return QueryResult(result[: q.n], scanned, next_lineno, missing)
        return QueryResult(result, scanned, next_lineno, missing)
    for v, b in reversed(blocks):
        scanned += 1
        try:
            recs = read_block(v.path, v.compressed, b)
        except FileNotFoundError:
            missing = True
            continue
        matched = [r for r in recs if q.line_ok(r)]
        result[:0] = matched
        if len(result) >= q.n:
            break
    return QueryResult(result[-q.n :] if q.n else [], scanned, next_lineno, missing)


def _compress_chunk(src: Path, dst: Path, blocks: list[Block], level: int) -> tuple[list[Block], int]:
    """Write ``src`` to ``dst`` as one gzip member per block; return new blocks."""
    tmp = dst.with_name(dst.name + ".tmp")
    new_blocks = []
    offset = 0
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        for b in blocks:
            fin.seek(b.offset)
            data = fin.read(b.length)
            co = zlib.compressobj(level, zlib.DEFLATED, 31)
            comp = co.compress(data) + co.flush()
            fout.write(comp)
            new_blocks.append(Block(offset, len(comp), b.count, b.first_lineno, b.min_ts,
                                    b.max_ts, set(b.sources)))
            offset += len(comp)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    return new_blocks, offset


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


class AppLog:
    """One app's log: closed chunks plus one open chunk."""

    log = Logger()

    def __init__(self, store: LogStore, app: str) -> None:
        self.store = store
        self.app = app
        self.dir = store.root / app
        self.chunks: list[Chunk] = []
        self.next_lineno = 1
        # (sender, source) -> [last seq stored, logger time last seen]
        self.streams: dict[tuple[str, str], list[float]] = {}
        self._file: IO[bytes] | None = None
        self._dirty = False
        self._compressing: set[int] = set()

    # --- recovery -------------------------------------------------------------

    def recover(self) -> None:
        """Load the index and reconcile it with the files on disk."""
        self.dir.mkdir(parents=True, exist_ok=True)
        now = self.store.clock.seconds()
        index: dict[str, Any] = {}
        try:
            index = json.loads((self.dir / INDEX).read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            self.log.warn("log index of {app} unreadable ({err}); rebuilding", app=self.app, err=str(e))
        indexed = {c["number"]: Chunk.from_json(c) for c in index.get("chunks", [])}
        for key, val in index.get("streams", []):
            self.streams[(key[0], key[1])] = [val[0], val[1]]
        self.next_lineno = index.get("next_lineno", 1)
        files: dict[int, set[bool]] = {}
        for p in list(self.dir.iterdir()):
            if p.name.endswith(".tmp"):
                p.unlink()
                continue
            m = _CHUNK_RE.match(p.name)
            if m:
                files.setdefault(int(m.group(1)), set()).add(m.group(2) is not None)
        chunks: list[Chunk] = []
        for number in sorted(files):
            kinds = files[number]
            meta = indexed.get(number)
            plain = self.dir / f"{number:08d}.log"
            gz = self.dir / f"{number:08d}.log.gz"
            if meta is not None and meta.compressed and True not in kinds:
                meta = None  # the compressed file is gone: trust the plain one
            if meta is not None and meta.compressed and True in kinds:
                if False in kinds:
                    plain.unlink()  # compression finished and was recorded
                chunks.append(meta)
                self.next_lineno = max(self.next_lineno, meta.first_lineno + meta.count)
                continue
            if meta is not None:
                self.next_lineno = max(self.next_lineno, meta.first_lineno + meta.count)
            if True in kinds:
                gz.unlink()  # a compression that was not recorded: redo it
            if False not in kinds:
                continue
            chunk = meta if meta is not None else self._scan(plain, number)
            chunks.append(chunk)
            self.next_lineno = max(self.next_lineno, chunk.first_lineno + chunk.count)
        self.chunks = chunks
        if chunks and not chunks[-1].compressed and chunks[-1].closed_at is None:
            # the last plain chunk becomes the open one again
            last = chunks[-1]
            self._open_file(last)
        for c in chunks:
            if c.closed_at is None and c is not self.open_chunk:
                c.closed_at = now
            if c.closed_at is not None and not c.compressed:
                self._start_compress(c)
        self._write_index()

    def _scan(self, path: Path, number: int) -> Chunk:
        """Rebuild a plain chunk's metadata from its content; cut a torn tail."""
        first = self.next_lineno
        chunk = Chunk(number, first, opened_at=0.0)
        cfg = self.store.config
        offset = 0
        block: Block | None = None
        good_end = 0
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        lineno = first
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn last line
            raw = data[pos:nl]
            nbytes = nl + 1 - pos
            try:
                rec = decode(raw.decode("utf-8", "surrogateescape"), lineno)
            except CorruptRecord:
                self.log.warn("dropping corrupt record at {path}:{pos}", path=str(path), pos=pos)
                # keep the bytes (they are in the file) but do not count a line
                break
            if block is None or block.count >= cfg.block_lines or block.length >= cfg.block_bytes:
                block = Block(offset, 0, 0, lineno, 0.0, 0.0)
                chunk.blocks.append(block)
            block.add(rec, nbytes)
            offset += nbytes
            lineno += 1
            chunk.count += 1
            pos = nl + 1
            good_end = pos
            if rec.sender:
                key = (rec.sender, rec.source)
                # file order is receive order: the last record is the position
                self.streams[key] = [rec.seq, self.store.clock.seconds()]
        if good_end < len(data):
            with open(path, "r+b") as f:
                f.truncate(good_end)
        chunk.raw_bytes = chunk.disk_bytes = good_end
        chunk.opened_at = chunk.min_ts if chunk.count else self.store.clock.seconds()
        chunk.last_write = chunk.max_ts if chunk.count else chunk.opened_at
        self.next_lineno = lineno
        return chunk

    # --- writing ----------------------------------------------------------------

    @property
    def open_chunk(self) -> Chunk | None:
        if self.chunks and self.chunks[-1].closed_at is None:
            return self.chunks[-1]
        return None

    def _open_file(self, chunk: Chunk) -> None:
        self._file = open(self.dir / chunk.filename(), "ab", buffering=256 * 1024)

    def _new_chunk(self) -> Chunk:
        number = self.chunks[-1].number + 1 if self.chunks else 1
        chunk = Chunk(number, self.next_lineno, opened_at=self.store.clock.seconds())
        self.chunks.append(chunk)
        self._open_file(chunk)
        return chunk

    def append(self, timestamp: float, source: str, text: str, sender: str = "", seq: int = 0,
               lost: int = 0) -> LogRecord:
        cfg = self.store.config
        chunk = self.open_chunk
        now = self.store.clock.seconds()
        if chunk is not None and chunk.count and (
            chunk.raw_bytes >= cfg.chunk_max_bytes or now - chunk.opened_at >= cfg.chunk_max_age
        ):
            self.close_chunk()
            chunk = None
        if chunk is None:
            chunk = self._new_chunk()
        elif self._file is None:
            self._open_file(chunk)  # closed while idle
        rec = LogRecord(self.next_lineno, timestamp, source, text, lost, sender, seq)
        data = rec.encode().encode("utf-8", "surrogateescape")
        assert self._file is not None
        self._file.write(data)
        nbytes = len(data)
        block = chunk.blocks[-1] if chunk.blocks else None
        if block is None or block.count >= cfg.block_lines or block.length >= cfg.block_bytes:
            block = Block(chunk.raw_bytes, 0, 0, rec.lineno, timestamp, timestamp)
            chunk.blocks.append(block)
        # Block.add, inlined (once per line)
        if timestamp < block.min_ts:
            block.min_ts = timestamp
        elif timestamp > block.max_ts:
            block.max_ts = timestamp
        block.count += 1
        block.length += nbytes
        block.sources.add(source)
        chunk.count += 1
        chunk.raw_bytes += nbytes
        chunk.disk_bytes += nbytes
        chunk.last_write = now
        self.next_lineno += 1
        self._dirty = True
        if sender:
            st = self.streams.get((sender, source))
            if st is None:
                self.streams[(sender, source)] = [seq, now]
            else:
                st[0] = seq  # the receiver decides what comes next (restarts go back to 1)
                st[1] = now
        return rec

    def flush(self) -> None:
        if self._dirty and self._file is not None:
            self._file.flush()
            self._dirty = False

    def close_chunk(self) -> None:
        """Close the open chunk (if it has lines) and compress it."""
        chunk = self.open_chunk
        if chunk is None:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
            self._dirty = False
        if chunk.count == 0:
            (self.dir / chunk.filename()).unlink(missing_ok=True)
            self.chunks.pop()
            return
        chunk.closed_at = self.store.clock.seconds()
        self._write_index()
        self._start_compress(chunk)

    def _start_compress(self, chunk: Chunk) -> None:
        if chunk.number in self._compressing:
            return
        self._compressing.add(chunk.number)
        src = self.dir / chunk.filename()
        dst = self.dir / f"{chunk.number:08d}.log.gz"
        blocks = [Block(b.offset, b.length, b.count, b.first_lineno, b.min_ts, b.max_ts,
                        set(b.sources)) for b in chunk.blocks]
        level = self.store.config.compress_level
        d = self.store.run_blocking(lambda: _compress_chunk(src, dst, blocks, level))

        def done(result: tuple[list[Block], int]) -> None:
            self._compressing.discard(chunk.number)
            if chunk not in self.chunks:  # deleted meanwhile
                dst.unlink(missing_ok=True)
                return
            chunk.blocks, chunk.disk_bytes = result
            chunk.compressed = True
            self._write_index()
            # readers holding the plain file's snapshot keep an open fd or
            # retry; the plain file goes now
            src.unlink(missing_ok=True)
            self.store.compressed += 1

        def failed(f: Any) -> None:
            self._compressing.discard(chunk.number)
            self.log.failure("compressing {path} failed; it stays uncompressed", f,
                             path=str(src))

        d.addCallbacks(done, failed)

    def _write_index(self) -> None:
        # never record a stream position whose line is not yet in the file
        self.flush()
        closed = [c.to_json() for c in self.chunks if c.closed_at is not None]
        streams = [[list(k), v] for k, v in self.streams.items()]
        # the first line number after the closed chunks (the open chunk's
        # first line): what recovery numbers a re-scanned open chunk from
        oc = self.open_chunk
        after_closed = oc.first_lineno if oc is not None else self.next_lineno
        _write_json_atomic(self.dir / INDEX, {
            "version": INDEX_VERSION, "app": self.app, "next_lineno": after_closed,
            "chunks": closed, "streams": streams,
        })

    # --- maintenance --------------------------------------------------------------

    def maintain(self) -> int:
        """Roll an old open chunk, apply retention; return chunks deleted."""
        cfg = self.store.config
        now = self.store.clock.seconds()
        chunk = self.open_chunk
        if chunk is not None and chunk.count and now - chunk.opened_at >= cfg.chunk_max_age:
            self.close_chunk()
        elif chunk is not None and self._file is not None and now - chunk.last_write >= IDLE_CLOSE:
            self.flush()
            self._file.close()  # an idle app holds no file descriptor
            self._file = None
        deleted = 0
        while True:
            closed = [c for c in self.chunks if c.closed_at is not None]
            if not closed:
                break
            oldest = closed[0]
            total = sum(c.disk_bytes for c in self.chunks)
            too_old = oldest.last_write <= now - cfg.retention_age
            too_big = total > cfg.retention_bytes
            if not (too_old or too_big):
                break
            self.chunks.remove(oldest)
            for suffix in (".log", ".log.gz"):
                (self.dir / f"{oldest.number:08d}{suffix}").unlink(missing_ok=True)
            deleted += 1
            self.store.deleted_lines += oldest.count
            self.log.info(
                "retention removed {app} chunk {number} ({count} lines, {why})",
                app=self.app, number=oldest.number, count=oldest.count,
                why="age" if too_old else "size",
            )
        # forget streams not heard from for longer than the retention age
        for key in [k for k, v in self.streams.items() if v[1] <= now - cfg.retention_age]:
            del self.streams[key]
        if deleted:
            self._write_index()
        return deleted

    def views(self) -> list[ChunkView]:
        """Snapshot of every readable chunk for a query (flushes first)."""
        self.flush()
        out = []
        for c in self.chunks:
            blocks = tuple(Block(b.offset, b.length, b.count, b.first_lineno, b.min_ts,
                                 b.max_ts, b.sources) for b in c.blocks)
            out.append(ChunkView(self.dir / c.filename(), c.compressed, blocks))
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._write_index()

    @property
    def disk_bytes(self) -> int:
        return sum(c.disk_bytes for c in self.chunks)


class LogStore:
    """Every app's log under ``root``; see the module docstring."""

    log = Logger()

    def __init__(self, root: Path, clock: IReactorTime, config: StoreConfig = StoreConfig(),
                 run_blocking: RunBlocking = run_inline) -> None:
        self.root = root
        self.clock = clock
        self.config = config
        self.run_blocking = run_blocking
        self.apps: dict[str, AppLog] = {}
        self.compressed = 0
        self.deleted_lines = 0

    def open(self) -> None:
        """Recover every app found on disk (blocking; call once at start)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and APP_RE.match(p.name):
                self.app(p.name)

    def app(self, app: str) -> AppLog:
        a = self.apps.get(app)
        if a is None:
            if not APP_RE.match(app):
                raise ValueError(f"invalid app name {app!r}")
            a = AppLog(self, app)
            a.recover()
            self.apps[app] = a
        return a

    def append(self, app: str, timestamp: float, source: str, text: str, sender: str = "",
               seq: int = 0, lost: int = 0) -> LogRecord:
        return self.app(app).append(timestamp, source, text, sender, seq, lost)

    def stream_position(self, app: str, sender: str, source: str) -> int | None:
        """The last seq stored for a stream, or None if it was never seen."""
        st = self.app(app).streams.get((sender, source))
        return None if st is None else int(st[0])

    def flush(self) -> None:
        for a in self.apps.values():
            a.flush()

    def maintain(self) -> int:
        return sum(a.maintain() for a in list(self.apps.values()))

    def query(self, app: str, q: Query) -> Deferred[QueryResult]:
        """Run ``q`` over ``app``'s log (in the blocking runner)."""
        if app not in self.apps and not (self.root / app).is_dir():
            return succeed(QueryResult([], 0, 1))
        a = self.app(app)

        def run() -> Deferred[QueryResult]:
            views = a.views()
            next_lineno = a.next_lineno
            return self.run_blocking(lambda: run_query(views, q, next_lineno))

        def retry(result: QueryResult) -> Any:
            # a chunk was compressed (or deleted) under the query: once more on a
            # fresh snapshot of the index
            return run() if result.incomplete else result

        return run().addCallback(retry)

    def close(self) -> None:
        for a in self.apps.values():
            a.close()

    def iter_apps(self) -> Iterable[str]:
        return list(self.apps)

    def __iter__(self) -> Iterator[AppLog]:
        return iter(list(self.apps.values()))
