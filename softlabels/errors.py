"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``error: <message>`` and exits non-zero for any :class:`SoftlabelsError`,
without a traceback; everything else is a bug and keeps its traceback.
"""


class SoftlabelsError(Exception):
    """A mistake the user can fix (bad input, wrong store, missing file)."""

    exit_code = 2


class StoreNotFoundError(SoftlabelsError):
    pass


class NotAStoreError(SoftlabelsError):
    pass


class UnsupportedFormatError(SoftlabelsError):
    pass


class StoreExistsError(SoftlabelsError):
    pass


class SchemaMismatchError(SoftlabelsError):
    pass


class IncompleteStoreError(SoftlabelsError):
    pass


class InvalidTargetsError(SoftlabelsError):
    pass


class SpecError(SoftlabelsError):
    """An unknown or malformed teacher/dataset/student spec, or a bad checkpoint."""


class DamagedStoreError(SoftlabelsError):
    """A store marked complete has a missing, undecodable, altered or impossible object."""

    exit_code = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the command stops cleanly (``finally`` blocks run, Ray is shut down)
    and exits 128 + ``signum``, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
