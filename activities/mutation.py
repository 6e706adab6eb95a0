"""The contract every mutating activity shares with the step runner.

The step runner fills ``dry_run`` and ``token`` in; an activity never invents them. ``token`` is
derived from the workflow id and the step name, so a retried activity recognises its own earlier
work and does not repeat it.
"""

from pydantic import BaseModel


class Mutation(BaseModel):
    """Base of every mutating activity's input."""

    dry_run: bool = False
    token: str = ""


class MutationResult(BaseModel):
    """What a mutating activity did, or in dry-run what it would have done."""

    changed: bool
    detail: str
