"""The shadow candidate's second opinion: how often the candidate agreed with the live version on a copy
of live traffic, and how both did on the images people labelled since (read from the prediction log and
the feedback records, with ``storage`` alone). The gate's decision carries it (``training.gate``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import storage
from storage.layout import RECORDS
from storage.predictions import read_predictions


@dataclass(frozen=True)
class ShadowReport:
    """The candidate against live on the same requests. Accuracies are on the reviewed items: logged
    requests whose image got a label from a person (an image labelled differently twice is left out)."""

    candidate_version: int
    compared: int
    agreed: int
    reviewed: int
    candidate_correct: int
    live_correct: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def candidate_accuracy(self) -> float | None:
        return self.candidate_correct / self.reviewed if self.reviewed else None

    @property
    def live_accuracy(self) -> float | None:
        return self.live_correct / self.reviewed if self.reviewed else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "agreement": self.agreement,
            "candidate_accuracy": self.candidate_accuracy,
            "live_accuracy": self.live_accuracy,
        }

    def render(self) -> str:
        if not self.compared:
            return f"second opinion: no shadow traffic recorded for version {self.candidate_version} yet"
        text = (
            f"second opinion: on {self.compared} live requests the candidate "
            f"(version {self.candidate_version}) agreed with live {100 * (self.agreement or 0):.1f}%"
        )
        if self.reviewed:
            text += (
                f"; on {self.reviewed} reviewed items candidate {100 * (self.candidate_accuracy or 0):.0f}% "
                f"correct, live {100 * (self.live_accuracy or 0):.0f}%"
            )
        return text

    def to_markdown(self) -> str:
        """The second opinion as the rows of a small table (or one line when there was no shadow traffic)."""
        if not self.compared:
            return self.render() + "\n"

        def percent(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}%"

        return (
            "\n".join(
                [
                    f"Version {self.candidate_version} answered a copy of live traffic in the shadow.",
                    "",
                    "| measure | items | candidate | live |",
                    "| --- | --- | --- | --- |",
                    f"| agreement with live | {self.compared} | {percent(self.agreement)} | - |",
                    f"| accuracy on reviewed items | {self.reviewed} | {percent(self.candidate_accuracy)} | "
                    f"{percent(self.live_accuracy)} |",
                ]
            )
            + "\n"
        )


def labelled_images(feedback_uri: str) -> dict[str, str]:
    """sha256 -> the label people gave it, from the feedback records (images with two labels left out)."""
    labels: dict[str, str] = {}
    conflicting: set[str] = set()
    for name in storage.list_files(storage.join(feedback_uri, RECORDS)):
        if not name.endswith(".json"):
            continue
        try:
            record = json.loads(storage.read_bytes(storage.join(feedback_uri, RECORDS, name)))
            sha, label = str(record["image_sha256"]), str(record["label"])
        except (ValueError, KeyError, TypeError):
            continue
        if labels.get(sha, label) != label:
            conflicting.add(sha)
        labels[sha] = label
    return {sha: label for sha, label in labels.items() if sha not in conflicting}


def shadow_report(
    *, feedback_uri: str, model_name: str, candidate_version: int, since: datetime | None = None
) -> ShadowReport:
    """What the log says of ``candidate_version`` answering live traffic in the shadow."""
    labels = labelled_images(feedback_uri)
    compared = agreed = reviewed = candidate_correct = live_correct = 0
    for record in read_predictions(feedback_uri, model_name, since=since):
        shadow = record.shadow
        if shadow is None or shadow.version != candidate_version:
            continue
        compared += 1
        agreed += shadow.agrees
        truth = labels.get(record.sha256)
        if truth is not None:
            reviewed += 1
            candidate_correct += shadow.label == truth
            live_correct += record.label == truth
    return ShadowReport(
        candidate_version=candidate_version,
        compared=compared,
        agreed=agreed,
        reviewed=reviewed,
        candidate_correct=candidate_correct,
        live_correct=live_correct,
    )
