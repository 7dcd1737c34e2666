"""Domain knowledge: the Markdown files in knowledge/, as passages searched with SQLite FTS5 (BM25).

The index lives in memory, one per worker process, built at start-up in a few milliseconds and
rebuilt when a file in the folder changes. No extra dependency: FTS5 comes with Python's SQLite.
Chinese, Japanese and Korean are indexed and searched as overlapping pairs of characters.
"""

import re
import sqlite3
import time
import unicodedata
from pathlib import Path

# a passage is one section of a document, split further if it is longer than this
MAX_PASSAGE_CHARS = 700
SENTENCE_END = re.compile(r"\.(?= )|[。！？]")  # Chinese and Japanese put no space after theirs
# Words that match almost every passage and would only add noise to a caller's question.
STOPWORDS = set("""a about an and are as at be can could do does for from have how i i'd i'm if
in is it its just me my of on or our please so than that the their them then there these they this
to too us was we what when where which who why will with would you your yeah hi hello okay ok um uh
like want need know""".split())

# Chinese and Japanese put no spaces between words, and Korean writes a word and its particle as
# one (보험은 is 보험 + 은): runs of these scripts are indexed and searched as their overlapping
# pairs of characters (営業時間: 営業 業時 時間), as search engines' CJK analysers do.
HAN_AND_KANA = ("\u3005-\u3007\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff"
                "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f")
HANGUL = "\u1100-\u11ff\u3131-\u318e\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff"
PAIRED_RUN = re.compile(f"[{HAN_AND_KANA}]+|[{HANGUL}]+")
HIRAGANA = re.compile("[\u3041-\u309f]")
# The pairs of a question that are grammar, not its subject, as STOPWORDS are: a pair that starts
# with hiragana (Japanese endings and particles: です, ます, は使), a pair with a particle or a
# Chinese function character in it, and the pairs below: katakana -ing and -tion, Korean endings
# and particles, question words, politeness; the last line has Korean words of one syllable.
STOP_CHARACTERS = set("はがをにのへとでもやかねよ"
                      "的了吗呢吧啊呀嘛么们是你我您他她这那哪谁什想嗎麼們這誰")
STOP_PAIRS = set("""ング ョン 何時 下さ 頂け 致し 出来 御座 お願 願い 大丈 丈夫
可以 时候 時候 请问 請問 多少 怎样 為什 为什 一下 知道 需要 能否 有没 没有 沒有 谢谢 謝謝
니다 습니 합니 입니 됩니 세요 나요 까요 해요 어요 아요 여요 가요 예요 에요 이에 시나 으시
하나 하는 있나 있어 있습 있는 없나 없어 되나 돼요 인가 는데 은데 네요 지요 데요 할까 을까
니까 싶어 싶은 주세 에서 에게 으로 부터 까지 처럼 보다 하고 이랑 이나 에는 에도 것을 것이
것은 어떤 어떻 무엇 무슨 뭐가 언제 어디 얼마 어느 혹시 저기 안녕 녕하 하세 감사 사합
수 것 좀 더 잘 안 못 저 제 그 이 거 때 뭐 네 예""".split())
# A question with more pairs than this must share two of them with a passage: in a long question,
# one pair in common (時間, 시간) is a coincidence more often than an answer.
FEW_PAIRS = 3


def searchable(text):
    """The text as the index and the question are both split: NFKC, every CJK run as its pairs."""
    # NFKC: an accent typed as a separate mark joins its letter, full-width ＡＢ is AB, ｶﾅ is カナ
    text = unicodedata.normalize("NFKC", text)
    return PAIRED_RUN.sub(lambda run: f" {' '.join(character_pairs(run.group()))} ", text)


def character_pairs(run):
    """営業時間 -> 営業, 業時, 時間; a lone character stays as it is."""
    return [run[i:i + 2] for i in range(len(run) - 1)] or [run]


def is_grammar(pair):
    """Whether a CJK pair of the question is grammar (a particle, an ending), not its subject."""
    return (pair in STOP_PAIRS or HIRAGANA.match(pair) is not None
            or not STOP_CHARACTERS.isdisjoint(pair))


def question_terms(question):
    """The words of a question in any script (STOPWORDS left out) and its CJK pairs (grammar left
    out), split as the documents were."""
    words, pairs = set(), set()
    for term in re.findall(r"\w+", searchable(question).lower()):
        if PAIRED_RUN.match(term):
            if not is_grammar(term):
                pairs.add(term)
        elif term not in STOPWORDS and len(term) > 1:
            words.add(term)
    return words, pairs


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
            ends = [end.end() for end in SENTENCE_END.finditer(body, 0, MAX_PASSAGE_CHARS)]
            cut = len(body) if len(body) <= MAX_PASSAGE_CHARS else \
                ends[-1] if ends else MAX_PASSAGE_CHARS  # after the last sentence that fits
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
        self.passages = []  # (heading, body, its CJK pairs) as written; rowid n is at n - 1
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
        passages = [passage for path in sorted(self.folder.glob("*.md"))
                    for passage in split_passages(path.read_text(encoding="utf-8"), path.stem)]
        indexed = [tuple(map(searchable, passage)) for passage in passages]
        with self.db:
            self.db.execute("DELETE FROM passages")
            self.db.executemany("INSERT INTO passages(rowid, source, heading, body) "
                                "VALUES (?, ?, ?, ?)",
                                [(rowid, *texts) for rowid, texts in enumerate(indexed, 1)])
        self.passages = [(heading, body, set(PAIRED_RUN.findall(f"{texts[1]} {texts[2]}")))
                         for (_, heading, body), texts in zip(passages, indexed)]
        self.signature = signature

    def passage_count(self):
        """How many passages the index holds."""
        return len(self.passages)

    def matching(self, terms, limit=-1):
        """The rowids of the passages with any of the terms, best first (BM25, headings count
        double); all of them unless limit is given."""
        query = " OR ".join(f'"{term}"' for term in sorted(terms))  # quoted: no FTS5 syntax
        return [rowid for (rowid,) in self.db.execute(
            "SELECT rowid FROM passages WHERE passages MATCH ? "
            "ORDER BY bm25(passages, 0, 2, 1) LIMIT ?", (query, limit))]

    def summary(self):
        """What the start-up line says: the folder, its documents and their passages."""
        return f"{self.folder} ({len(self.signature)} documents, {self.passage_count()} passages)"

    def search(self, question, limit=3, max_chars=1500):
        """The passages that match the question best (BM25), best first, max_chars at most."""
        self.refresh()
        words, pairs = question_terms(question)
        if not words and not pairs:
            return []
        rowids = self.matching(words | pairs, -1 if pairs else limit)
        if pairs:  # a passage needs one of the other words or enough of the pairs
            shared = {rowid: len(pairs & self.passages[rowid - 1][2]) for rowid in rowids}
            # two in common when the question is long, or when a passage has two: then one pair
            # alone (時間 in "2時間") is a coincidence beside a better answer
            need = 2 if len(pairs) > FEW_PAIRS or max(shared.values(), default=0) >= 2 else 1
            by_words = set(self.matching(words)) if words else set()
            rowids = [rowid for rowid in rowids if rowid in by_words
                      or shared[rowid] >= need][:limit]
        found, used = [], 0
        for rowid in rowids:
            heading, body, _ = self.passages[rowid - 1]
            passage = f"[{heading}] {body}"
            if used + len(passage) > max_chars:
                break
            found.append(passage)
            used += len(passage)
        return found
