"""What a loop run reports: why it started, its step-by-step result (:class:`LoopResult`, what the flow
returns and the demo prints) and the human summary of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def describe_trigger(reason: str | None, trigger: Mapping[str, Any] | None) -> str:
    """One line saying why a retraining run started (a manual call, a schedule, or an event)."""
    text = reason or "started manually"
    if trigger:
        details = ", ".join(
            f"{key}={value}" for key, value in sorted(trigger.items()) if value not in ("", None)
        )
        if details:
            text += f" ({details})"
    return text


@dataclass
class LoopResult:
    """The outcome of one train-and-deploy run, step by step (what the flow returns and the demo prints)."""

    run_id: str | None = None
    reason: str = ""
    model_name: str = ""
    gate_passed: bool | None = None
    gate_reason: str = ""
    candidate_metrics: dict[str, Any] = field(default_factory=dict)
    champion_metrics: dict[str, Any] | None = None
    exported_version: int | None = None
    export_path: str | None = None
    registered_version: str | None = None
    image: str | None = None
    rollout: str | None = None
    smoke_test: str | None = None
    feedback_consumed: int = 0
    quarantined: int = 0
    champion_alias: str | None = None
    live_version: int | None = None
    live_previous: int | None = None
    promoted: bool = False
    second_opinion: str | None = None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopResult:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known)


def format_summary(result: LoopResult) -> str:
    """A human summary of a run: what was trained, the gate's verdict, what happened after it."""
    lines = [f"run {result.run_id} ({result.reason})"]
    if result.gate_passed is not None:
        lines.append(f"gate: {'PASSED' if result.gate_passed else 'REFUSED'}: {result.gate_reason}")
    if result.exported_version is not None:
        lines.append(f"exported version {result.exported_version} -> {result.export_path}")
    if result.registered_version:
        lines.append(f"registered {result.model_name} version {result.registered_version}")
    if result.image:
        lines.append(f"image: {result.image}")
    if result.rollout:
        lines.append(f"rollout: {result.rollout}")
    if result.smoke_test:
        lines.append(f"smoke test: {result.smoke_test}")
    if result.feedback_consumed:
        lines.append(f"feedback consumed: {result.feedback_consumed} item(s)")
    if result.quarantined:
        lines.append(
            f"quarantined: {result.quarantined} image(s) under different labels, held out of training "
            "(listed in /feedback/stats; settle each with `tfloop feedback resolve SHA256 --label LABEL`)"
        )
    if result.second_opinion:
        lines.append(result.second_opinion)
    if result.champion_alias:
        lines.append(f"champion: {result.champion_alias}")
    if result.live_version is not None:
        change = (
            f"promoted (was {result.live_previous})"
            if result.promoted and result.live_previous is not None
            else "promoted"
            if result.promoted
            else "unchanged"
        )
        lines.append(f"live: version {result.live_version} ({change})")
    else:
        lines.append("live: no version yet")
    lines += [f"skipped: {reason}" for reason in result.skipped]
    return "\n".join(lines)
