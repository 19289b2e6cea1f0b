"""The errors that mean "this input cannot be used": every one derives from InputError, whose
message names the file, the line (or row) and the field where that applies. The CLI catches
InputError and prints the message without a traceback; anything else is a bug."""

from __future__ import annotations

__all__ = ["BeirFormatError", "CheckpointError", "DataError", "InputError", "RecipeError", "Stage1InputError"]


class InputError(ValueError):
    """Input that cannot be used: a recipe, a data file, a checkpoint. The message says where."""


class DataError(InputError):
    """A record or a file that cannot be used. The message names the file (or dataset),
    the line (1-based) or row (0-based) and the field.

    Attributes:
        source: "file:line" / "name[row]" of the record, or None for a whole-file problem.
        field: the offending field, or None.
        reason: a short key counted in ReadStats.skipped when bad records are skipped.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None, reason: str = "invalid"):
        super().__init__(message)
        self.source = source
        self.field = field
        self.reason = reason


# A BEIR folder, a `datasets` collection or a TREC run file that cannot be read as it is: the
# same kind of error as any other data (one loader, one set of rules), under the name the
# evaluation API has always raised.
BeirFormatError = DataError


class RecipeError(InputError):
    """A recipe or override that cannot be used; the message names the file and key."""


class Stage1InputError(InputError):
    """Stage-1 input that cannot be used (labels, empty prompts, settings); names the source."""


class CheckpointError(InputError):
    """A checkpoint folder that cannot be resumed from (incomplete, foreign or tampered with)."""
