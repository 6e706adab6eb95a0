"""Which exceptions raised by workflow code are bugs that end a run, not a workflow task retried.

Temporal's default is to fail only the workflow *task* on an exception that is not a Temporal
failure, and to retry that task forever, hoping a fixed worker will be deployed. For an overflow,
a missing key or a bad value that is wrong: the same history raises the same error on every
retry, the run stays open with its compensations never run, and because a start returns the open
run, the runbook cannot be started again for that subject.

The list is of Python's "bad data" errors on purpose, and not ``Exception``: a
``NondeterminismError`` (a deploy that changed what a released workflow does, or workflow code
touching what the sandbox forbids) must keep failing the task, so that rolling the deploy back
lets the run carry on where it was; failing the run there would strand whatever it had changed.
``RuntimeError`` is left out too: the SDK raises it for its own broken invariants, which a fixed
worker resolves.

Raised inside a runbook's body, these pass through ``StepRunner.compensating`` (the undo runs)
and ``StepRunner.run`` turns them into a failure that says a bug stopped the run. Outside it
(an input or activity result that does not decode into its model), the worker's
``workflow_failure_exception_types`` fails the run at once. Activity results decode wherever
activities run, from the same models, which only gain fields with defaults; so in practice that
is a history whose input no longer passes the request model's bounds.

Signal handlers must not raise these: the SDK fails the run at once on them, without the
compensations of the body. The approval gate records a bad decision instead of raising; a
signal's payload that does not decode is dropped by the SDK before any handler runs.
"""

from __future__ import annotations

CODE_ERRORS: tuple[type[Exception], ...] = (
    ArithmeticError,  # OverflowError: a duration past what timedelta holds
    AssertionError,
    AttributeError,
    LookupError,  # KeyError, IndexError
    TypeError,
    ValueError,  # pydantic's ValidationError: an input or a model built from bad values
)
