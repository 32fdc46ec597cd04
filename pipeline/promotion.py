"""Promotion at the end of a loop run: the smoke-tested candidate becomes the live version (the live
pointer beside the versions, and MLflow's ``champion`` alias in the same step).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionOutcome:
    """What promotion did: the live version (and the one before it) and the registered ``champion``."""

    version: int
    previous: int | None
    registered_version: int
    live_pointer: str
    champion_alias: str


def promote_live(
    *, model_name: str, model_base: str, version: int, tracking_uri: str, promoted_by: str
) -> PromotionOutcome:
    """Make ``version`` live: the live pointer beside the versions, then MLflow's ``champion`` alias."""
    from export.registry import promote_version

    promotion = promote_version(
        model_name=model_name,
        model_base=model_base,
        version=version,
        tracking_uri=tracking_uri,
        promoted_by=promoted_by,
    )
    return PromotionOutcome(
        version=promotion.version,
        previous=promotion.previous,
        registered_version=promotion.registered_version,
        live_pointer=promotion.live_pointer,
        champion_alias=f"{model_name} registered version {promotion.registered_version}",
    )


def current_live_version(*, model_base: str, model_name: str) -> int | None:
    """The version unpinned requests get now (``storage.versions.live_version``)."""
    from storage import versions

    return versions.live_version(model_base, model_name)
