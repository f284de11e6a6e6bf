"""WikiText as lm-evaluation-harness scores it: whole articles, detokenized, with word and byte
counts.

lm-evaluation-harness's `wikitext` task reads `EleutherAI/wikitext_document_level` (one row per
article, split at top-level `" = Title = "` headings), scores the detokenized page with rolling
windows, and normalises the summed log-likelihood by the words and UTF-8 bytes of the ORIGINAL page.
The functions here rebuild those documents from the line rows that `wikigpt.data.blocks` loads
(local files or the Hub's `wikitext`), so the harness's word perplexity and bits-per-byte can be
computed offline with no second data pipeline.
"""

import re


def rows_to_lines(rows: list[str]) -> list[str]:
    """Hub-format rows (newline kept, blank lines as "") back to the file's lines (WikiText blank
    lines are " ")."""
    return [row[:-1] if row.endswith("\n") else (row or " ") for row in rows]


def is_article_heading(line: str) -> bool:
    """A top-level `` = Title = `` line (not `` = = Section = = ``): where a WikiText article
    starts."""
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def article_spans(rows: list[str]) -> list[range]:
    """Row ranges of the articles, in order; rows before the first heading belong to the first
    article."""
    starts = [0] + [i for i, row in enumerate(rows) if is_article_heading(row)][1:]
    return [range(a, b) for a, b in zip(starts, starts[1:] + [len(rows)])]


def split_documents(rows: list[str]) -> list[str]:
    """Articles exactly as the `wikitext_document_level` builder yields them (62 in WikiText-2
    test).

    The builder reads the file, splits it on "\\n" (so a final "" follows the last line) and starts
    a new page at every line that is a top-level heading once "= = =" / "= =" are collapsed; empty
    pages are skipped.
    """
    lines = rows_to_lines(rows) + [""]
    pages, current = [], []
    for line in lines:
        if is_article_heading(line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return [page for page in pages if page.strip()]


def detokenize(page: str) -> str:
    """lm-evaluation-harness's `wikitext_detokenizer` (tasks/wikitext/preprocess_wikitext.py), rule
    for rule."""
    string = page
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    for mark in ":;.!?,":
        string = string.replace(f" {mark} ", f"{mark} ")
    # brackets and quotes
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def word_count(page: str) -> int:
    """The harness's count: `len(re.split(r"\\s+", page))` of the original page (edge empties
    included)."""
    return len(re.split(r"\s+", page))


def byte_count(page: str) -> int:
    return len(page.encode("utf-8"))
