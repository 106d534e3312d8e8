"""Classifies database errors: a database that cannot be reached, or a statement that failed."""

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

# SQLSTATE classes of a server that cannot serve: 08 connection exception, 57 operator
# intervention (shutting down, starting up, terminated by an administrator).
UNAVAILABLE_SQLSTATE_CLASSES = ("08", "57")

# What the callers catch; `database_unavailable` then decides whether the database was the cause.
DATABASE_ERRORS = (DBAPIError, OSError)


def database_unavailable(error: BaseException) -> bool:
    """Tell whether `error` means the database could not be reached or is restarting, rather than a failed statement."""
    if isinstance(error, (OperationalError, InterfaceError, OSError)):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    for cause in (error.orig, getattr(error.orig, "__cause__", None)):
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES:
            return True
    return False
