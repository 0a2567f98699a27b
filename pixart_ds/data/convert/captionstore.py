"""Captions keyed by image id, held in an SQLite file instead of memory.

The paper's SA-1B captions (PixArt-alpha/SAM-LLaVA-Captions10M, `SA1B_caption.tar.gz`: one `sa_N.txt` per image,
about 10M) and JourneyDB's annotation JSONL (about 4M records) are too large for a Python dict: a 600-byte caption
costs about 800 bytes as a dict entry, 8 GB for 10M. They are streamed once into `OUT.partial/captions.sqlite`
(rows in arrival order, an index on the id built afterwards, which sorts instead of inserting into a B-tree at
random), then looked up one id at a time by every writer process. Memory stays flat (SQLite's page cache); disk is
about the caption text plus 60 bytes per row.

The semantics are those of the converters' id -> caption join, record by record:
- a record with an id and a non-empty caption: the first one per id wins, later ones are skipped as "duplicate id";
- a record with an id whose caption field is unusable (wrong type): a "problem" for that id (the last one is kept);
  the image then counts as "bad annotation";
- a record that names no id (or does not parse): a plan-time skip, "bad annotation", named by file and line;
- an empty caption: ignored (the image then counts as "image without caption").

A store made from a file is reused while the file keeps its size and modification time (a resumed conversion does
not read 10M captions again); one made from a directory of `.txt` files is rebuilt on every run. `digest` (SHA-1 of
the records as read) enters the fingerprint of every partition whose captions come from the store, so a changed
caption set rewrites them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from typing import Callable, Iterable, Iterator, Optional

from tqdm import tqdm

from pixart_ds.data.convert._engine import BAD_ANNOTATION, DUPLICATE, Skip

STORE_FILE = "captions.sqlite"
_BATCH = 20_000

# Events a caption reader yields (see `build`).
CAPTION, PROBLEM, SKIP, META = "caption", "problem", "skip", "meta"


class CaptionStore:
    """Read side of a built store. Opens its own read-only connection in each process (a connection must not cross
    a fork), so it can be handed to writer processes."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._con: Optional[sqlite3.Connection] = None
        self._pid = -1
        meta = dict(self._q("SELECT key, value FROM meta"))
        self.digest: str = meta["digest"]
        self.meta: dict = json.loads(meta["extra"])
        self.source: str = meta["source"]

    def __getstate__(self):  # pickled to writer processes: the path only
        return {"path": self.path, "digest": self.digest, "meta": self.meta, "source": self.source}

    def __setstate__(self, state):
        self.__dict__.update(state, _con=None, _pid=-1)

    def _conn(self) -> sqlite3.Connection:
        if self._con is None or self._pid != os.getpid():
            self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._pid = os.getpid()
        return self._con

    def _q(self, sql: str, args: tuple = ()):
        return self._conn().execute(sql, args)

    def close(self) -> None:
        if self._con is not None and self._pid == os.getpid():
            self._con.close()
        self._con = None

    def caption(self, sid: str) -> Optional[str]:
        """The first non-empty caption recorded for `sid`, or None."""
        row = self._q("SELECT caption FROM rows WHERE id = ? ORDER BY rowid LIMIT 1", (sid,)).fetchone()
        return row[0] if row else None

    def problem(self, sid: str) -> Optional[str]:
        """Why the last unusable record naming `sid` is unusable, or None."""
        row = self._q("SELECT detail FROM problems WHERE id = ? ORDER BY rowid DESC LIMIT 1", (sid,)).fetchone()
        return row[0] if row else None

    def caption_ids(self) -> Iterator[str]:
        """Every id with a caption, sorted (SQLite compares UTF-8 bytes: the same order as Python's sorted)."""
        for (sid,) in self._conn().execute("SELECT DISTINCT id FROM rows ORDER BY id"):
            yield sid

    def problem_ids(self) -> Iterator[str]:
        for (sid,) in self._conn().execute("SELECT DISTINCT id FROM problems ORDER BY id"):
            yield sid

    def caption_ids_not_in(self, seen_path: str) -> Iterator[str]:
        """Sorted ids with a caption that table `seen(id)` of the SQLite file `seen_path` does not hold."""
        con = self._attached(seen_path)
        try:
            yield from (r[0] for r in con.execute(
                "SELECT DISTINCT id FROM rows WHERE id NOT IN (SELECT id FROM s.seen) ORDER BY id"))
        finally:
            con.close()

    def problems_not_in(self, seen_path: str) -> Iterator[tuple[str, str]]:
        """(id, problem) for ids with a bad record that `seen(id)` does not hold, sorted (the last record's)."""
        con = self._attached(seen_path)
        try:
            yield from con.execute("""SELECT id, detail FROM problems WHERE rowid IN (SELECT MAX(rowid) FROM problems
                                      GROUP BY id) AND id NOT IN (SELECT id FROM s.seen) ORDER BY id""")
        finally:
            con.close()

    def _attached(self, seen_path: str) -> sqlite3.Connection:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        con.execute("ATTACH DATABASE ? AS s", (f"file:{os.path.abspath(seen_path)}?mode=ro",))
        return con

    def skips(self) -> list[Skip]:
        """Plan-time skips: records naming no id, then second captions for an id, each in reading order."""
        return [Skip(i, r, d) for i, r, d in self._q("SELECT id, reason, detail FROM skips ORDER BY rowid")]

    def __len__(self) -> int:
        return int(self._q("SELECT COUNT(DISTINCT id) FROM rows").fetchone()[0])


def source_key(path: str, **params) -> Optional[str]:
    """What identifies a caption source between runs: a file's path, size and mtime (plus reader parameters);
    None for a directory (its files are re-read every run)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return None
    st = os.stat(path)
    return json.dumps({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **params}, sort_keys=True)


def open_or_build(store_path: str, key: Optional[str], events: Callable[[], Iterable[tuple]],
                  progress: bool = True, desc: str = "captions") -> CaptionStore:
    """The store at `store_path` when it was built from the same source (`key`), else a new one built from
    `events()` into a temporary file and renamed into place (a killed build leaves no store behind)."""
    if key is not None and os.path.isfile(store_path):
        try:
            store = CaptionStore(store_path)
            if store.source == key:
                return store
            store.close()
        except (sqlite3.Error, KeyError, ValueError):
            pass  # an unreadable or foreign file: rebuilt below
    build(store_path, events(), key=key or "", progress=progress, desc=desc)
    return CaptionStore(store_path)


def build(store_path: str, events: Iterable[tuple], key: str = "", progress: bool = True,
          desc: str = "captions") -> None:
    """Write a store from caption-reader events:
    (CAPTION, id, text, where) | (PROBLEM, id, detail) | (SKIP, Skip) | (META, key, value)."""
    os.makedirs(os.path.dirname(os.path.abspath(store_path)), exist_ok=True)
    tmp = f"{store_path}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    con = sqlite3.connect(tmp)
    # A temporary file renamed into place when complete: no journal or fsync per batch is needed.
    con.executescript("""
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
        CREATE TABLE rows (id TEXT NOT NULL, caption TEXT NOT NULL, loc TEXT NOT NULL);
        CREATE TABLE problems (id TEXT NOT NULL, detail TEXT NOT NULL);
        CREATE TABLE skips (id TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """)
    h = hashlib.sha1()
    rows, problems, extra = [], [], {}
    n = 0
    bar = tqdm(desc=desc, unit="rec", disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for ev in events:
            kind = ev[0]
            if kind == CAPTION:
                _, sid, text, where = ev
                rows.append((sid, text, where))
                h.update(json.dumps([sid, text]).encode())
            elif kind == PROBLEM:
                problems.append((ev[1], ev[2]))
                h.update(json.dumps(["!", ev[1], ev[2]]).encode())
            elif kind == SKIP:
                s = ev[1]
                con.execute("INSERT INTO skips VALUES (?, ?, ?)", (s.id, s.reason, s.detail))
            elif kind == META:
                extra[ev[1]] = ev[2]
            else:
                raise ValueError(f"unknown caption event {kind!r}")
            n += 1
            if len(rows) >= _BATCH:
                con.executemany("INSERT INTO rows VALUES (?, ?, ?)", rows)
                rows.clear()
                bar.update(n - bar.n)
            if len(problems) >= _BATCH:
                con.executemany("INSERT INTO problems VALUES (?, ?)", problems)
                problems.clear()
        con.executemany("INSERT INTO rows VALUES (?, ?, ?)", rows)
        con.executemany("INSERT INTO problems VALUES (?, ?)", problems)
        bar.update(n - bar.n)
        con.executescript("CREATE INDEX rows_id ON rows (id); CREATE INDEX problems_id ON problems (id);")
        # Second (third, ...) captions of an id: the first one read wins.
        con.execute(f"""INSERT INTO skips SELECT id, '{DUPLICATE}', loc || ': second caption for this id ignored'
                        FROM rows WHERE rowid NOT IN (SELECT MIN(rowid) FROM rows GROUP BY id) ORDER BY rowid""")
        con.executemany("INSERT INTO meta VALUES (?, ?)", [("digest", h.hexdigest()), ("source", key),
                                                            ("extra", json.dumps(extra))])
        con.commit()
        con.close()
        os.replace(tmp, store_path)
    except BaseException:
        con.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        bar.close()


def bad_record(where: str, detail: str) -> tuple:
    """The event for a record that names no usable id."""
    return SKIP, Skip(where, BAD_ANNOTATION, detail)
