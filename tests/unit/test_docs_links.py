"""The documentation: README.md stays an entry, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

from pathlib import Path

from support.markdown_links import ROOT, anchors, broken, markdown_files, relative_links, slug

README_MAX_LINES = 400
DOCS = ROOT / "docs"


def test_the_readme_is_an_entry_of_at_most_400_lines() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move reference to docs/"
    )


def test_the_docs_are_split_into_reference_pages() -> None:
    pages = {p.name for p in markdown_files() if p.parent == DOCS}
    assert {"guarantees.md", "install.md", "cli.md", "operations.md", "development.md"} <= pages


def test_every_relative_link_and_anchor_resolves() -> None:
    links = [link for page in markdown_files() for link in relative_links(page)]
    # The README links into every docs page and the docs link into each other: if this finds
    # almost nothing, the link parser is broken, not the docs perfect.
    assert len(links) >= 30
    problems = [f"{link}: {why}" for link in links if (why := broken(link))]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    readme_targets = {
        (ROOT / link.target.partition("#")[0]).resolve()
        for link in relative_links(ROOT / "README.md")
    }
    for page in markdown_files():
        if page.parent == DOCS:
            assert page.resolve() in readme_targets, f"README.md does not link to {page.name}"


def test_slugs_follow_github() -> None:
    # github-slugger's rules on headings of these docs; the first three ids are the ones the README's
    # own links used before the split.
    assert slug("4. The broadcaster and the syncers: pick the runtime") == (
        "4-the-broadcaster-and-the-syncers-pick-the-runtime"
    )
    assert slug("`image-syncer broadcaster`") == "image-syncer-broadcaster"
    assert slug("Keeping images: the kubelet's image GC, pinning and the disk budget") == (
        "keeping-images-the-kubelets-image-gc-pinning-and-the-disk-budget"
    )
    assert slug("Node status, `wait` and `replay`") == "node-status-wait-and-replay"
    assert slug("max_ack_pending") == "max_ack_pending"


def test_a_repeated_heading_gets_a_numbered_id(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Syncer\n\n```sh\n# Syncer\n```\n\n## Syncer\n")
    assert anchors(page) == ["a", "syncer", "syncer-1"]
