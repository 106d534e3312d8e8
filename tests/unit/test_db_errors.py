"""Which database errors mean "unavailable, retry later" (503) rather than a failed statement."""

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from jarvis_deploy.db.errors import database_unavailable


class DriverError(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


def wrapped(sqlstate: str | None, kind: type[DBAPIError] = DBAPIError) -> DBAPIError:
    return kind("SELECT 1", {}, DriverError(sqlstate))


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (wrapped("57P03"), True),  # cannot connect now: starting up or shutting down
        (wrapped("57P01"), True),  # terminated by an administrator
        (wrapped("08006"), True),  # connection failure
        (wrapped("23505", IntegrityError), False),
        (wrapped("42P01"), False),  # undefined table: a bug, not an outage
        (wrapped(None), False),
        (wrapped(None, OperationalError), True),
        (wrapped(None, InterfaceError), True),
        (ConnectionRefusedError(), True),
        (ValueError("not a database error"), False),
    ],
)
def test_database_unavailable(error: BaseException, unavailable: bool) -> None:
    assert database_unavailable(error) is unavailable


def test_sqlstate_on_the_cause_counts() -> None:
    adapted = Exception("adapted")
    adapted.__cause__ = DriverError("57P03")
    assert database_unavailable(DBAPIError("SELECT 1", {}, adapted))


def test_invalidated_connection_counts() -> None:
    error = DBAPIError("SELECT 1", {}, DriverError(None), connection_invalidated=True)
    assert database_unavailable(error)
