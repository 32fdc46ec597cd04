"""The loop's typed parameters, shown in the Prefect UI and passed by the CLI: how to train a candidate,
the gate's policy, and how to deliver a version (image build, rollout, smoke test, promotion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from training.fit import TrainConfig, TrainingParameters
from training.gate import GatePolicy


class TrainingOptions(TrainingParameters):
    """How to train a candidate (the fields of :class:`training.fit.TrainingParameters`, among them the split
    fractions ``validation_fraction`` and ``test_fraction``); defaults are small enough for a CPU."""

    image_size: int = Field(default=64, ge=32, le=512)
    epochs: int = Field(default=5, ge=1)
    extra: dict[str, Any] = Field(
        default_factory=dict, description="More training fields (override the ones above)."
    )

    def train_config(self, *, data: Sequence[str], model_name: str) -> TrainConfig:
        """The run's :class:`training.fit.TrainConfig`: these fields, ``extra`` on top."""
        fields = {**self.model_dump(exclude={"extra"}), **self.extra}
        return TrainConfig(data=tuple(data), model_name=model_name, **fields)


class GateOptions(GatePolicy):
    """The gate's margins, minimum counts and floors: the fields of :class:`training.gate.GatePolicy`."""

    def policy(self) -> GatePolicy:
        return GatePolicy(**self.model_dump())


class DeliveryOptions(BaseModel):
    """Image build, rollout and smoke test. ``None`` means: do it when the tools/cluster are there."""

    build_image: bool | None = Field(
        default=None, description="None: build when a builder and a cluster exist"
    )
    registry: str | None = Field(default=None, description="HOST[:PORT] to push the image to")
    push: bool | None = None
    base_image: str | None = None
    rollout: bool | None = Field(default=None, description="None: roll out when a cluster is configured")
    kubeconfig: str | None = None
    kube_context: str | None = None
    namespace: str | None = None
    rollout_timeout_s: float = Field(default=600.0, gt=0)
    serving_url: str | None = Field(
        default=None,
        description="A serving process to smoke-test the candidate on (pinned version route)",
    )
    smoke_timeout_s: float = Field(default=120.0, gt=0)
    promote: bool = Field(
        default=True,
        description="Make the smoke-tested version live; false leaves it a candidate for `tfloop promote`",
    )
