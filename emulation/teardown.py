"""What every emulation resource does on entry and exit.

A resource builds itself in ``_create``; whatever it built before a failure
is removed before the failure propagates, and teardown errors surface only
when the body itself succeeded, so they never mask the body's own exception.
"""

from __future__ import annotations

from typing import Self


class Teardown:
    def _create(self) -> None:
        raise NotImplementedError

    def close(self, *, raise_errors: bool = True) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_errors=exc_type is None)
