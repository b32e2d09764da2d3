"""Fleet filtering: the opt-out annotation and the label selector with the API server's meaning."""

from __future__ import annotations

import pytest

from syncer.folding.filtering import SYNC_ANNOTATION, FleetFilter, LabelSelector, SelectorError
from wire.contract import Fleet, ObjectMeta


def _fleet(
    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
) -> Fleet:
    return Fleet(metadata=ObjectMeta(name="f", labels=labels, annotations=annotations))


LABELS = {"app": "game", "tier": "prod", "region": "eu-west-1", "example.com/team": "core"}

SELECTOR_CASES = [
    ("", True),
    ("   ", True),
    ("app=game", True),
    ("app==game", True),
    ("app = game", True),
    ("app=lobby", False),
    ("app!=lobby", True),
    ("app!=game", False),
    ("missing!=x", True),  # absent labels satisfy != and notin, as in Kubernetes
    ("tier in (prod, staging)", True),
    ("tier in (staging)", False),
    ("tier notin (staging,dev)", True),
    ("tier notin (prod)", False),
    ("missing notin (x)", True),
    ("missing in (x)", False),
    ("app", True),
    ("missing", False),
    ("!missing", True),
    ("!app", False),
    ("app=game,tier=prod", True),
    ("app=game,tier=dev", False),
    ("example.com/team=core,!example.com/retired", True),
    ("region in (eu-west-1,eu-north-1),app,tier!=dev", True),
    ("empty=", False),
    ("app in ()", False),
]


@pytest.mark.parametrize(("text", "expected"), SELECTOR_CASES)
def test_selector_matches_like_the_api_server(text: str, expected: bool) -> None:
    assert LabelSelector.parse(text).matches(LABELS) is expected


def test_empty_value_selects_an_empty_label() -> None:
    assert LabelSelector.parse("canary=").matches({"canary": ""})
    assert LabelSelector.parse("canary in (,x)").matches({"canary": ""})


def test_selector_round_trips_to_text() -> None:
    text = "app=game,tier!=dev,region in (eu-north-1,eu-west-1),x notin (a),y,!z"
    selector = LabelSelector.parse(text)
    assert str(selector) == text
    assert LabelSelector.parse(str(selector)) == selector


BAD_SELECTORS = [
    ("app=game,", "expected a label key, found the end"),
    (",app", "expected a label key, found ','"),
    ("app=game tier=prod", "expected ',' or the end, found 'tier'"),
    ("app in prod", "expected '(' to open the value set"),
    ("app in (a,b", "expected ',' or ')' in the value set"),
    ("app > 3", "expected =, ==, !=, in or notin after 'app', found '>'"),
    ("app gt 3", "expected =, ==, !=, in or notin after 'app', found 'gt'"),
    ("-app=x", "'-app' is not a valid label key"),
    ("app=x/y", "'x/y' is not a valid label value"),
    ("app=" + "v" * 64, "is not a valid label value"),
    ("Example.COM/team=x", "is not a valid label key"),
    ("!", "expected a label key, found the end"),
    ("app=(x)", "'(' is not a valid label value"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_SELECTORS)
def test_bad_syntax_is_refused_with_the_text_and_the_place(text: str, problem: str) -> None:
    with pytest.raises(SelectorError) as caught:
        FleetFilter.parse(text)
    message = str(caught.value)
    assert repr(text) in message
    assert problem in message
    assert "at character" in message


@pytest.mark.parametrize("value", ["false", "False", "0", "no", " NO "])
def test_annotation_opts_a_fleet_out(value: str) -> None:
    admitted, reason = FleetFilter.parse(None).admits(_fleet(annotations={SYNC_ANNOTATION: value}))
    assert not admitted
    assert SYNC_ANNOTATION in reason
    assert reason == f"opted out by annotation image-syncer.octops.io/sync={value!r}"


@pytest.mark.parametrize("value", ["true", "1", "yes", "", "maybe"])
def test_other_annotation_values_keep_the_fleet(value: str) -> None:
    assert FleetFilter.parse("").admits(_fleet(annotations={SYNC_ANNOTATION: value})) == (
        True,
        "admitted",
    )


def test_selector_applies_to_fleet_labels() -> None:
    only_prod = FleetFilter.parse("tier=prod")
    assert only_prod.admits(_fleet(labels={"tier": "prod"}))[0]
    admitted, reason = only_prod.admits(_fleet(labels={"tier": "dev"}))
    assert not admitted
    assert "tier=prod" in reason
    assert not only_prod.admits(_fleet(labels=None))[0]
    assert FleetFilter.parse("tier!=dev").admits(_fleet(labels=None))[0]


def test_opt_out_wins_over_a_matching_selector() -> None:
    fleet = _fleet(labels={"tier": "prod"}, annotations={SYNC_ANNOTATION: "false"})
    admitted, reason = FleetFilter.parse("tier=prod").admits(fleet)
    assert not admitted
    assert "annotation" in reason


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # Positions are 1-based and point at the token itself, past any whitespace before it.
        ("app=x   y", "at character 9: expected ',' or the end, found 'y'"),
        ("app   (x)", "at character 7: expected =, ==, !=, in or notin after 'app', found '('"),
        ("a=b,c (x)", "at character 7: expected =, ==, !=, in or notin after 'c', found '('"),
        ("app in   x", "at character 10: expected '(' to open the value set"),
        ("app in (a   b)", "at character 13: expected ',' or ')' in the value set"),
        ("a,  ,b", "at character 5: expected a label key, found ','"),
        ("a=b,", "at character 5: expected a label key, found the end"),
        ("a=  -b", "at character 5: '-b' is not a valid label value"),
        ("x,  Bad_/y", "at character 5: 'Bad_/y' is not a valid label key"),
    ],
)
def test_errors_name_the_character_where_the_mistake_starts(text: str, error: str) -> None:
    with pytest.raises(SelectorError) as caught:
        LabelSelector.parse(text)

    assert str(caught.value) == f"invalid label selector {text!r} {error}"


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("n" * 63, True),
        ("n" * 64, False),
        ("p" * 253 + "/n", True),
        ("p" * 254 + "/n", False),
        ("k=" + "v" * 63, True),
        ("k=" + "v" * 64, False),
        ("k in (a," + "v" * 64 + ")", False),
    ],
)
def test_key_and_value_lengths_end_where_kubernetes_ends_them(text: str, valid: bool) -> None:
    if valid:
        assert str(LabelSelector.parse(text)) == text
    else:
        with pytest.raises(SelectorError):
            LabelSelector.parse(text)


def test_an_empty_selector_is_false_and_selects_everything() -> None:
    assert not LabelSelector.parse("  ")
    assert LabelSelector.parse("  ").matches(None)
    assert LabelSelector.parse("a")
