"""Experiment kinds: one module each, one registry.

Each kind is an :class:`AnalysisKind`: its config class (a member of the discriminated
union :data:`AnalysisUnion` on ``kind``), ``run``, ``figures``, ``markdown`` and
``summary``. The runner and the report look kinds up in :data:`KINDS` and branch on
nothing else. Adding a kind is one new module here and one line in the tuple below
(``weight_norms.py`` is the smallest example).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Field

from . import (
    gaussian_attack,
    interclass_confusion,
    moments_tightness,
    nin_phases,
    nin_regularization,
    noise_profile,
    sensitivity_map,
    weight_margin,
    weight_norms,
)
from ._base import AnalysisConfig as AnalysisConfig
from ._base import AnalysisKind as AnalysisKind
from ._base import Context as Context
from ._base import summary_row as summary_row

KINDS: dict[str, AnalysisKind] = {
    kind.name: kind for kind in (
        *noise_profile.KINDS,
        moments_tightness.KIND,
        sensitivity_map.KIND,
        gaussian_attack.KIND,
        weight_norms.KIND,
        interclass_confusion.KIND,
        nin_phases.KIND,
        nin_regularization.KIND,
        weight_margin.KIND,
    )
}
"""Every experiment kind by name."""

if TYPE_CHECKING:  # statically: any analysis config
    AnalysisUnion = AnalysisConfig
else:
    AnalysisUnion = Annotated[
        Union[tuple(kind.config for kind in KINDS.values())],  # noqa: UP007 - built at runtime
        Field(discriminator="kind"),
    ]
"""The config of any analysis, validated into its kind's class by ``kind``."""

__all__ = ["KINDS", "AnalysisUnion", "AnalysisConfig", "AnalysisKind", "Context", "summary_row"]
