"""Requests and responses of ``/aliases`` and ``POST /adapters/{name}/aliases`` (service/jobs/aliases.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.jobs.models import RESERVED_ALIASES, Alias, Promotion, PromotionStatus

# An alias name as the published schema states it (service.jobs.models.check_alias_name decides): a letter, then up
# to 63 letters, digits, '.', '_' or '-'; not a reserved word, not an adapter's own name.
ALIAS_NAME: dict[str, Any] = {
    "pattern": r"^[A-Za-z][A-Za-z0-9._-]{0,63}$",
    "not": {"anyOf": [{"enum": list(RESERVED_ALIASES)}, {"pattern": r"^job-(0|[1-9][0-9]{0,17})$"}]},
}


class AliasSet(BaseModel):
    """``PUT /aliases/{alias}``: point the alias at an adapter."""

    model_config = ConfigDict(extra="forbid", strict=True)
    adapter: str = Field(min_length=1, max_length=128, description="an adapter name (job-<id>), GET /adapters")
    reason: str | None = Field(default=None, max_length=200, description="why, for the adapter's job events")


class AdapterAliasSet(BaseModel):
    """``POST /adapters/{name}/aliases``: point an alias at this adapter (promote it by hand)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    alias: str = Field(min_length=1, max_length=64, description="e.g. 'production'", json_schema_extra=ALIAS_NAME)
    reason: str | None = Field(default=None, max_length=200, description="why, for the adapter's job events")


class AliasPublic(BaseModel):
    alias: str
    adapter: str
    updated_at: datetime
    reason: str

    @classmethod
    def of(cls, row: Alias) -> AliasPublic:
        return cls(alias=row.name, adapter=row.adapter, updated_at=row.updated_at, reason=row.reason)


class PromotionPublic(BaseModel):
    """A job's ``promote_to`` and what became of it: the comparison of macro-F1 on its held-out items."""

    alias: str
    status: PromotionStatus = Field(description="pending until the job succeeds; then promoted or kept")
    reason: str | None
    comparison: dict[str, Any] = Field(
        description="metric, items, and the scores of the adapter, the base and the alias's adapter then (incumbent)"
    )
    decided_at: datetime | None

    @classmethod
    def of(cls, row: Promotion) -> PromotionPublic:
        return cls.model_validate(row, from_attributes=True)
