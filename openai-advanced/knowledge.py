"""Domain knowledge: the Markdown files in knowledge/, as passages searched with SQLite FTS5 (BM25).

The index lives in memory, one per worker process, built at start-up in a few milliseconds and
rebuilt when a file in the folder changes. No extra dependency: FTS5 comes with Python's SQLite.
"""

import re
import sqlite3
import time
import unicodedata
from pathlib import Path

# a passage is one section of a document, split further if it is longer than this
MAX_PASSAGE_CHARS = 700
# Words that match almost every passage and would only add noise to a caller's question.
STOPWORDS = set("""a about an and are as at be can could do does for from have how i i'd i'm if
in is it its just me my of on or our please so than that the their them then there these they this
to too us was we what when where which who why will with would you your yeah hi hello okay ok um uh
like want need know""".split())


def split_passages(text, source):
    """Split a Markdown document into (source, heading, text) passages: one per section or less."""
    title, passages = source, []
    for section in re.split(r"^(?=#)", text, flags=re.MULTILINE):
        heading_line, _, body = section.partition("\n")
        if not heading_line.startswith("#"):
            heading_line, body = "", section
        heading = heading_line.lstrip("#").strip()
        if heading_line.startswith("# "):
            title = heading
        label = title if heading in ("", title) else f"{title}: {heading}"
        body = " ".join(body.split())
        while body:  # cut long sections after a sentence, MAX_PASSAGE_CHARS at most
            cut = len(body) if len(body) <= MAX_PASSAGE_CHARS else \
                body.rfind(". ", 0, MAX_PASSAGE_CHARS) + 1  # just after the last ". " that fits
            cut = cut or MAX_PASSAGE_CHARS  # no sentence end to cut at (rfind gave -1, so 0)
            passages.append((source, label, body[:cut].strip()))
            body = body[cut:].strip()
    return passages


class Knowledge:
    """Search the documents of one folder; `search(question)` returns the best passages as text."""

    def __init__(self, folder, check_every_seconds=1.0):
        self.folder = Path(folder)
        self.check_every_seconds = check_every_seconds
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.execute("CREATE VIRTUAL TABLE passages USING fts5(source, heading, body, "
                        "tokenize='porter unicode61')")
        self.signature = None
        self.checked_at = 0.0
        self.refresh()

    def files_signature(self):
        """What changes when a document is added, removed or edited."""
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                     for p in sorted(self.folder.glob("*.md")))

    def refresh(self):
        """Rebuild the index if the documents changed (it looks at most once a second)."""
        now = time.monotonic()
        if self.signature is not None and now - self.checked_at < self.check_every_seconds:
            return
        self.checked_at = now
        signature = self.files_signature()
        if signature == self.signature:
            return
        with self.db:
            self.db.execute("DELETE FROM passages")
            for path in sorted(self.folder.glob("*.md")):
                self.db.executemany("INSERT INTO passages VALUES (?, ?, ?)",
                                    split_passages(path.read_text(encoding="utf-8"), path.stem))
        self.signature = signature

    def passage_count(self):
        """How many passages the index holds (for the benchmark)."""
        return self.db.execute("SELECT count(*) FROM passages").fetchone()[0]

    def summary(self):
        """What the start-up line says: the folder, its documents and their passages."""
        return f"{self.folder} ({len(self.signature)} documents, {self.passage_count()} passages)"

    def search(self, question, limit=3, max_chars=1500):
        """The passages that match the question best (BM25), best first, max_chars at most."""
        self.refresh()
        # Words in any script (NFC: an accent typed as a separate mark stays part of its letter).
        words = {w for w in re.findall(r"\w+", unicodedata.normalize("NFC", question).lower())
                 if w not in STOPWORDS and len(w) > 1}
        if not words:
            return []
        # quoted: no FTS5 syntax from callers
        query = " OR ".join(f'"{word}"' for word in sorted(words))
        rows = self.db.execute(
            "SELECT heading, body FROM passages WHERE passages MATCH ? "
            "ORDER BY bm25(passages, 0, 2, 1) LIMIT ?",
            (query, limit)).fetchall()
        found, used = [], 0
        for heading, body in rows:
            passage = f"[{heading}] {body}"
            if used + len(passage) > max_chars:
                break
            found.append(passage)
            used += len(passage)
        return found
