"""The base of every section of a run's config, wherever the section is declared (:mod:`fedtune.config`, or an
adapter kind's own module, :mod:`fedtune.models.kinds`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict section: an unknown key is an error, assignments are validated, and each field's docstring is its
    description (the comments of ``fedtune config init`` / ``show``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
