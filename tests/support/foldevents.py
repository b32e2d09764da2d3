"""Events as the log delivers them, and a desired state read whole: for the fold's unit tests."""

from __future__ import annotations

from typing import Any

from syncer.folding.desired import DesiredState
from wire.contract import Event, decode_event, encode_event

__all__ = ["event", "whole"]


def event(action: str, obj: dict[str, Any], kind: str = "fleet") -> Event:
    return decode_event(encode_event(f"{kind}.events.{action}", obj))


def whole(state: DesiredState) -> dict[str, object]:
    """Everything a reader of the state can see, to compare in one assert."""
    return {
        "fleets": state.fleets(),
        "excluded": state.excluded(),
        "seqs": state.fleet_seqs(),
        "last_seq": state.last_seq,
        "by_image": state.by_image(),
        "len": len(state),
    }
