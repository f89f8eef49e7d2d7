"""The data layer's error: a problem with one row (or one file), located as `file:row: field: reason`.

Kept apart from `formats` (which parses rows) and `readers` (which reads files), so both raise it without
importing each other.
"""

from __future__ import annotations

from rlhf.errors import UserError


class DataError(UserError):
    """A problem with the data, located as precisely as we can: `file:row: field: reason`.

    `row` is a 1-based line number for .jsonl and .csv files and a 1-based row index otherwise; it is None
    for problems with the whole file. `category` is the short name skips are counted under.
    """

    def __init__(self, file: str, row: int | None, field: str | None, reason: str, category: str | None = None) -> None:
        self.file, self.row, self.field, self.reason = file, row, field, reason
        self.category = category or reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}:{self.row}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"
