"""wikigpt/data/wikitext.py: lm-evaluation-harness's WikiText documents, detokenizer and word/byte
counts."""

from conftest import WT2

from wikigpt.data.blocks import DataArguments, load_raw_splits
from wikigpt.data.wikitext import byte_count, detokenize, rows_to_lines, split_documents, word_count


def _rows(name):
    split = "test" if "test" in name else "validation"
    return load_raw_splits(DataArguments(**{f"{split}_file": str(WT2 / name)}), 0, (split,))[split][
        "text"
    ]


def test_documents_partition_the_real_test_split_into_62_articles():
    raw = (WT2 / "wiki.test.raw").read_text(encoding="utf-8")
    pages = split_documents(_rows("wiki.test.raw"))
    assert len(pages) == 62  # EleutherAI/wikitext_document_level, wikitext-2-raw-v1, test
    assert pages[0].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film")
    # Every page starts at a top-level heading, and together they are the file (less its first blank
    # line).
    assert all(p.split("\n")[0].startswith(" = ") and not p.startswith(" = = ") for p in pages)
    assert "\n".join(pages) == raw[len(" \n") :]
    assert len(split_documents(_rows("wiki.valid.raw"))) == 60


def test_rows_to_lines_undoes_hub_rows():
    assert rows_to_lines([" = A = \n", "", " text .\n", "last"]) == [
        " = A = ",
        " ",
        " text .",
        "last",
    ]


def test_detokenizer_rules():
    assert (
        detokenize(
            " = = Career = = \n \n In 2000 he was 1 @,@ 000 @-@ strong , and 3 @.@ 5 m tall . \n"
        )
        == " == Career ==\n\nIn 2000 he was 1,000-strong, and 3.5 m tall.\n"
    )
    assert (
        detokenize('the players \' club has N members ( in 2001 ) ; " quoted "')
        == 'the players\' club has 1 members (in 2001); "quoted"'
    )
    assert detokenize("it 's") == "it's"
    assert detokenize("a = = = = b") == "a ==== b"


def test_word_and_byte_counts_are_the_harness_definitions():
    page = " = Café = \n \n One two . \n"
    assert word_count(page) == 8  # re.split(r"\s+") keeps the empty strings at both ends
    assert byte_count(page) == len(page) + 1  # é is two UTF-8 bytes
