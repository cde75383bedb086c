"""The README and docs/*.md link only inside the repository, to files (and headings) that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(path: Path) -> str:
    """A markdown file without its fenced code blocks and code spans (their brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lowercased, punctuation dropped, spaces as hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_documents_exist():
    assert (ROOT / "docs" / "design.md").is_file(), "docs/design.md, the design document, is missing"
    assert "docs/design.md" in links(ROOT / "README.md"), "README.md does not link the design document"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_stay_inside_the_repository_and_resolve(doc: Path):
    problems = []
    for target in links(doc):
        if SCHEME.match(target):
            problems.append(f"{target}: links outside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_mention_of_files_outside_the_repository(doc: Path):
    text = doc.read_text(encoding="utf-8")
    assert "shared/" not in text and "DESIGN.md" not in text, \
        f"{doc.relative_to(ROOT)} names a file outside the repository; the design is docs/design.md"


# Words about how the project was made, not about what it does: a reader has no use for them.
MAKING_OF = re.compile(r"\bissues?\b(?! requests)|\b(?:this|the|a|coding) session\b(?! (?:per|for|state))|"
                       r"\bhelpers?\b|\blent\b|\blending\b|\bleases?\b", re.I)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documents_speak_of_the_project_not_of_its_making(doc: Path):
    found = [f"{doc.relative_to(ROOT)}:{n}: {line.strip()}"
             for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1) if MAKING_OF.search(line)]
    assert not found, "words about how the project was made:\n" + "\n".join(found)


def test_architecture_layer_table_is_the_one_tested():
    """docs/architecture.md's layer table says what tests/test_layers.py enforces, layer for layer."""
    from tests.test_layers import LAYERS

    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"), re.M)
    table = {name: set() if deps.strip() == "nothing of tcgraph" else {d.strip() for d in deps.split(",")}
             for name, deps in rows}
    assert table == {k: v for k, v in LAYERS.items() if not k.startswith("__")}
