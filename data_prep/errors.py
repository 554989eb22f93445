"""The error types every data_prep stage raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the byte offset where known.

    `reason` is the message without the place (what a list of bad records shows per row).
    """

    def __init__(
        self, message: str, *, path: object = None, record: int | None = None, offset: int | None = None
    ):
        parts = []
        if path is not None:
            parts.append(str(path))
        if record is not None:
            parts.append(f"record {record}")
        if offset is not None:
            parts.append(f"byte offset {offset}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.record = record
        self.offset = offset
        self.reason = message


class OutputLockedError(DataError):
    """Another run holds the lock of an output folder (the message names its host and pid)."""
