"""Image references compare in normal form: the Fleet's spelling and the runtime's agree."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from syncer.folding.references import ImageRef, InvalidImageReference, PresentImages, normalize
from syncer.runtime.cri import RuntimeImage

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.25", "docker.io/library/nginx:1.25"),
        ("docker.io/library/nginx:latest", "docker.io/library/nginx:latest"),
        ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
        ("containous/traefik", "docker.io/containous/traefik:latest"),
        ("127.0.0.1:5000/test/img:v1", "127.0.0.1:5000/test/img:v1"),
        ("localhost/x", "localhost/x:latest"),
        (f"nginx@{DIGEST}", f"docker.io/library/nginx@{DIGEST}"),
        (f"nginx:1@{DIGEST}", f"docker.io/library/nginx:1@{DIGEST}"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert str(normalize(text)) == expected


@pytest.mark.parametrize("text", ["", " nginx", "Nginx", "a b", "nginx@sha256:abc", "x::1"])
def test_invalid_reference_says_why(text: str) -> None:
    with pytest.raises(InvalidImageReference, match="invalid image reference"):
        normalize(text)


def test_nginx_equals_its_full_name() -> None:
    assert normalize("nginx") == normalize("docker.io/library/nginx:latest")


def test_present_matches_tags_and_digests() -> None:
    present = PresentImages.of(
        [
            RuntimeImage(
                id="sha256:" + "1" * 64,
                repo_tags=("docker.io/library/nginx:latest",),
                repo_digests=(f"docker.io/library/redis@{DIGEST}",),
                size=1,
            ),
            RuntimeImage(id="sha256:" + "2" * 64, repo_tags=(), repo_digests=(), size=1),
        ]
    )
    assert normalize("nginx") in present
    assert normalize("nginx:1.25") not in present
    assert normalize(f"redis@{DIGEST}") in present
    # A digest pins content: the tag next to it does not matter, another repository does.
    assert normalize(f"redis:7@{DIGEST}") in present
    assert normalize(f"postgres@{DIGEST}") not in present
    assert normalize("redis") not in present


def test_present_add_records_a_pull() -> None:
    present = PresentImages()
    ref = ImageRef("127.0.0.1:5000/a", "v1")
    assert ref not in present
    present.add(ref)
    assert ref in present


def test_present_add_of_a_digest_reference_records_the_content() -> None:
    present = PresentImages()
    present.add(normalize(f"redis:7@{DIGEST}"))

    assert normalize(f"redis@{DIGEST}") in present
    assert normalize(f"redis:8@{DIGEST}") in present
    assert normalize(f"postgres@{DIGEST}") not in present
    assert normalize(f"redis@sha256:{'b' * 64}") not in present
    # The digest was recorded, not the tag beside it (which may have moved since).
    assert normalize("redis:7") not in present
    assert len(present) == 1


def test_present_counts_tags_and_digests_and_skips_what_does_not_parse() -> None:
    present = PresentImages(
        tags=["nginx:1", "docker.io/library/nginx:1", "redis:7", "Bad Tag!"],
        digests=[f"redis@{DIGEST}", "Not A Reference"],
    )

    # nginx:1 twice in two spellings is one image.
    assert len(present) == 3


def test_present_of_objects_that_lack_tags_or_digests() -> None:
    present = PresentImages.of(
        [SimpleNamespace(repo_tags=["nginx:1"]), SimpleNamespace(repo_digests=[f"redis@{DIGEST}"])]
    )

    assert normalize("nginx:1") in present
    assert normalize(f"redis@{DIGEST}") in present
    assert len(present) == 2


def test_present_discard_forgets_exactly_the_name_removed() -> None:
    present = PresentImages(tags=["nginx:1", "nginx:2"], digests=[f"redis@{DIGEST}"])

    present.discard(normalize("nginx:1"))
    assert normalize("nginx:1") not in present
    assert normalize("nginx:2") in present
    # A digest reference forgets the content whatever tag it was spelled with.
    present.discard(normalize(f"redis:7@{DIGEST}"))
    assert normalize(f"redis@{DIGEST}") not in present
    assert len(present) == 1
    # Forgetting what is not there is harmless.
    present.discard(normalize("postgres"))
    present.discard(normalize(f"postgres@{DIGEST}"))
    assert len(present) == 1
