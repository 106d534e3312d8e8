"""Client of Caddy's admin API for the per-project routes of the service.

The service owns one route per project, tagged with an `@id`, in one HTTP server of a Caddy that
other sites may share. It changes only those routes and the server that contains them, and never
loads a whole configuration. Caddy started with `caddy run --config FILE` (without `--resume`)
comes up without the changes made through the API. The worker therefore applies the routes again
from the database, and `apply_route` is idempotent for that purpose.
"""

import asyncio
import re
import time
from types import TracebackType
from typing import Any, Self

import httpx
import structlog

from jarvis_deploy.proxy.lookup import UpstreamLookup

log = structlog.get_logger(__name__)

ROUTE_ID_PREFIX = "jarvis-deploy-route-"
# The route id becomes a segment of the admin API's URL path, so it is limited to characters that
# need no escaping there.
ROUTE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
# Caddy tries a request whose dial failed again, on any upstream, every TRY_INTERVAL for up to
# TRY_DURATION, so a container that is stopping or not yet listening costs a delay instead of a 502.
TRY_DURATION = "5s"
TRY_INTERVAL = "100ms"
# Copies of one route that delete_route removes at most. Caddy 2.6 accepts several objects with
# the same @id, and /id/ then reaches only one of them, so a duplicate from a race needs its own DELETE.
MAX_ROUTE_COPIES = 10
# Attempts of ensure_server. A PUT fails when another client created the same level first, and
# the next attempt then finds it.
ENSURE_SERVER_ATTEMPTS = 3
# Seconds to wait before each new attempt of a request whose connection failed, about 1.5 s in all.
# Caddy 2.6 restarts its admin server after every change, and for a moment it refuses or resets
# connections, which makes concurrent changes (from several processes, say) fail.
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
# Requests that can be sent again after the connection broke before the response: a GET reads,
# a PATCH sets the same value again, and a repeated DELETE of an @id finds nothing (404). A POST or
# PUT could insert a second copy, so those are only repeated when the connection was refused.
REPLAYABLE_METHODS = frozenset({"GET", "PATCH", "DELETE"})


class CaddyError(Exception):
    """Failure of a request to Caddy's admin API, with `status` the HTTP status or None when no response came."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class CaddyUnavailable(CaddyError):
    """Failure to reach the admin API, or a request to it that timed out."""


class RouteNotFound(CaddyError):
    def __init__(self, route_id: str) -> None:
        super().__init__(
            f"route {route_id!r} not found in Caddy. Create it with apply_route before switching its upstreams",
            status=404,
        )
        self.route_id = route_id


def route_id(project: str) -> str:
    return f"{ROUTE_ID_PREFIX}{project}"


def build_route(
    route_id: str, hosts: list[str], upstreams: list[str], lookup: UpstreamLookup | None = None
) -> dict[str, Any]:
    """Build the JSON of a route that proxies requests for `hosts` to `upstreams` (`host:port` each).

    With `lookup`, the route lists no upstreams and Caddy looks them up through the upstream resolver.
    Raises ValueError on an invalid route id, an empty host list or an invalid upstream list.
    """
    check_route_id(route_id)
    if not hosts:
        raise ValueError(
            f"route {route_id!r} has no hosts. Give at least one, because a route without a host matcher takes every request"
        )
    check_upstreams(upstreams)

    handler: dict[str, Any] = {"handler": "reverse_proxy"}
    if lookup is None:
        handler["upstreams"] = upstream_objects(upstreams)
    else:
        # No static upstreams as a fallback: after a switch they would name removed containers. While
        # the resolver is unreachable, Caddy looks up again on each try for TRY_DURATION.
        handler["dynamic_upstreams"] = lookup.caddy_json()
    handler["load_balancing"] = {"try_duration": TRY_DURATION, "try_interval": TRY_INTERVAL}
    return {
        "@id": route_id,
        "match": [{"host": list(hosts)}],
        "handle": [handler],
        "terminal": True,
    }


def check_route_id(route_id: str) -> None:
    if not ROUTE_ID_PATTERN.match(route_id):
        raise ValueError(f"invalid route id {route_id!r}. Use only letters, digits, '.', '_' and '-'")


def check_upstreams(upstreams: list[str]) -> None:
    """Raise ValueError unless `upstreams` is a non-empty list of `host:port` dial addresses."""
    if not upstreams:
        raise ValueError("upstream list is empty. Give at least one host:port, so that the route has somewhere to send requests")
    for address in upstreams:
        host, separator, port = address.rpartition(":")
        if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"invalid upstream {address!r}. Expected host:port with a port from 1 to 65535, e.g. app-v2-1:8080"
            )
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"invalid upstream {address!r}. Put an IPv6 address in brackets, e.g. [::1]:8080")


def upstream_objects(upstreams: list[str]) -> list[dict[str, str]]:
    return [{"dial": address} for address in upstreams]


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


class CaddyClient:
    """Client that changes the service's routes in one HTTP server (`server`) through Caddy's admin API at `admin_url`.

    `listen` is used only when ensure_server creates that server, and so is `disable_automatic_https`,
    which turns off Caddy's certificate management for it (for loopback test servers).
    """

    def __init__(
        self,
        admin_url: str,
        server: str,
        listen: list[str],
        *,
        timeout: float = 10.0,
        disable_automatic_https: bool = False,
    ) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.server = server
        self.listen = list(listen)
        self.disable_automatic_https = disable_automatic_https
        # Every change makes Caddy reload its configuration before it responds, so reads get the
        # whole timeout. A connection to the admin API is local and should open at once.
        # Caddy 2.6 restarts its admin server on each reload and closes idle connections shortly
        # after the response, so a kept-alive connection could fail on its next request. Each
        # request therefore opens a new connection.
        self._http = httpx.AsyncClient(
            base_url=self.admin_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
            headers={"Accept": "application/json"},
        )
        # Runs one operation of this client at a time, so concurrent apply_route calls cannot insert
        # one route twice, and this client sends no change while another of its changes is applied.
        self._lock = asyncio.Lock()

    @property
    def server_path(self) -> str:
        return f"/config/apps/http/servers/{self.server}"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def ping(self) -> None:
        """Read one small value from the admin API, raising CaddyUnavailable or CaddyError when that fails."""
        async with self._lock:
            await self._get(f"{self.server_path}/listen")

    async def ensure_server(self) -> None:
        """Create the HTTP server and whichever of `apps`, `http` and `servers` above it are missing.

        An existing server keeps its settings. Only a missing `routes` list or an empty `listen` list is added.
        """
        async with self._lock:
            await self._ensure_server()

    async def apply_route(
        self, route_id: str, hosts: list[str], upstreams: list[str], lookup: UpstreamLookup | None = None
    ) -> None:
        """Create the route, or replace the route with this id in place. A repeated call with the same values changes nothing."""
        route = build_route(route_id, hosts, upstreams, lookup)
        started = time.perf_counter()

        async with self._lock:
            replaced = await self._send("PATCH", f"/id/{route_id}", route, missing_ok=True)
            if not replaced:
                await self._ensure_server()
                try:
                    await self._insert_route(route)
                except CaddyUnavailable:
                    # After a connection that broke mid-request the route may exist, and a PATCH finds out.
                    if not await self._send("PATCH", f"/id/{route_id}", route, missing_ok=True):
                        raise

        log.info(
            "caddy.route_applied",
            route_id=route_id,
            hosts=list(hosts),
            upstream_count=len(upstreams),
            lookup=lookup.name if lookup else None,
            created=not replaced,
            duration_ms=elapsed_ms(started),
        )

    async def set_upstreams(self, route_id: str, upstreams: list[str]) -> None:
        """Switch the route to `upstreams` with one PATCH, which Caddy applies in one configuration reload.

        Raises ValueError on an empty or invalid list and RouteNotFound when the route is missing.
        Requests in flight finish on the old upstreams, and requests sent after the return reach the new ones.
        NOTE: while it reloads, Caddy 2.6 on Linux reset or refused up to two of some 500 connections in
        test_switch_under_load (tests/integration/test_caddy.py), before any response, so a client may see an error.
        """
        check_route_id(route_id)
        check_upstreams(upstreams)
        started = time.perf_counter()

        async with self._lock:
            found = await self._send(
                "PATCH", f"/id/{route_id}/handle/0/upstreams", upstream_objects(upstreams), missing_ok=True
            )
        if not found:
            raise RouteNotFound(route_id)

        log.info(
            "caddy.upstreams_switched",
            route_id=route_id,
            upstreams=list(upstreams),
            upstream_count=len(upstreams),
            duration_ms=elapsed_ms(started),
        )

    async def get_route(self, route_id: str) -> dict[str, Any] | None:
        """Return the route's JSON, or None when Caddy has no route with this id."""
        check_route_id(route_id)
        path = f"/id/{route_id}"
        async with self._lock:
            response = await self._request("GET", path)
        if response.status_code == 404:
            return None
        self._raise_for_status("GET", path, response)
        return response.json()

    async def get_upstreams(self, route_id: str) -> list[str] | None:
        """Return the dial addresses the route lists, or None when Caddy has no route with this id.

        A route that finds its upstreams through a lookup lists none.
        """
        route = await self.get_route(route_id)
        if route is None:
            return None
        return [upstream["dial"] for upstream in route["handle"][0].get("upstreams") or []]

    async def delete_route(self, route_id: str) -> None:
        """Delete every copy of the route. A route that does not exist is not an error."""
        check_route_id(route_id)
        started = time.perf_counter()
        copies = 0
        async with self._lock:
            while copies < MAX_ROUTE_COPIES:
                if not await self._send("DELETE", f"/id/{route_id}", missing_ok=True):
                    break
                copies += 1

        if copies == 0:
            log.info("caddy.route_already_absent", route_id=route_id)
            return
        if copies > 1:
            log.warning("caddy.route_duplicates_deleted", route_id=route_id, copies=copies)
        log.info("caddy.route_deleted", route_id=route_id, copies=copies, duration_ms=elapsed_ms(started))

    async def _ensure_server(self) -> None:
        for attempt in range(1, ENSURE_SERVER_ATTEMPTS + 1):
            try:
                await self._ensure_server_once()
                return
            except CaddyUnavailable:
                raise
            except CaddyError as error:
                if attempt == ENSURE_SERVER_ATTEMPTS:
                    raise
                log.warning("caddy.ensure_server_retry", server=self.server, attempt=attempt, error=error.message)

    async def _ensure_server_once(self) -> None:
        # Caddy 2.6 responds to a GET below a missing level with 400 (invalid traversal path)
        # instead of null, so the levels are read from the top down.
        value: dict[str, Any] = {"listen": self.listen, "routes": []}
        if self.disable_automatic_https:
            value["automatic_https"] = {"disable": True}
        levels = [
            ("/config/apps", {"http": {"servers": {self.server: value}}}),
            ("/config/apps/http", {"servers": {self.server: value}}),
            ("/config/apps/http/servers", {self.server: value}),
            (self.server_path, value),
        ]
        for path, body in levels:
            existing = await self._get(path)
            if existing is None:
                # PUT creates and never replaces, so a level that another client created in the
                # meantime makes it fail instead of being overwritten.
                await self._send("PUT", path, body)
                log.info("caddy.server_created", server=self.server, listen=self.listen, created_at=path)
                return
        await self._complete_server(existing)

    async def _complete_server(self, server: dict[str, Any]) -> None:
        if server.get("routes") is None:
            await self._send("POST", f"{self.server_path}/routes", [])
            log.info("caddy.server_routes_created", server=self.server)
        current_listen = server.get("listen") or []
        if not current_listen:
            # POST creates a missing key, but on an existing list it would append the list as one element.
            method = "PATCH" if "listen" in server else "POST"
            await self._send(method, f"{self.server_path}/listen", self.listen)
            log.info("caddy.server_listen_set", server=self.server, listen=self.listen)
        elif sorted(current_listen) != sorted(self.listen):
            # An existing server is part of the operator's configuration, so its addresses stay as they are.
            log.warning(
                "caddy.server_listen_differs", server=self.server, listen=current_listen, configured=self.listen
            )

    async def _insert_route(self, route: dict[str, Any]) -> None:
        routes_path = f"{self.server_path}/routes"
        routes = await self._get(routes_path)
        # Prepended because Caddy tries routes in order, and a catch-all route of another site would shadow this one.
        # NOTE: routes without a matcher that others put first for every request (headers, logging) then skip these hosts.
        if routes:
            await self._send("PUT", f"{routes_path}/0", route)
        else:
            # Caddy 2.6 rejects a PUT at index 0 of an empty list as out of bounds.
            await self._send("POST", routes_path, route)

    async def _get(self, path: str) -> Any:
        response = await self._request("GET", path)
        self._raise_for_status("GET", path, response)
        return response.json()

    async def _send(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> bool:
        """Send a change and return True, or False when `missing_ok` is set and Caddy responds 404 (an unknown @id)."""
        response = await self._request(method, path, body)
        if missing_ok and response.status_code == 404:
            return False
        self._raise_for_status(method, path, response)
        return True

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """Send one request, again after each delay in RETRY_DELAYS while the connection fails and a new attempt is safe."""
        delays = iter(RETRY_DELAYS)
        attempt = 0
        while True:
            attempt += 1
            try:
                if body is None:
                    return await self._http.request(method, path)
                return await self._http.request(method, path, json=body)
            except httpx.TimeoutException as error:
                raise CaddyUnavailable(
                    f"{method} {self.admin_url}{path} timed out ({type(error).__name__}). Check that Caddy is"
                    " running and not overloaded"
                ) from error
            except httpx.ConnectError as error:
                failure: httpx.TransportError = error
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as error:
                if method not in REPLAYABLE_METHODS:
                    raise CaddyUnavailable(
                        f"connection to the Caddy admin API at {self.admin_url} broke during {method} {path}"
                        f" ({error!r}). The change may or may not have been applied, so read the configuration"
                        " before sending it again"
                    ) from error
                failure = error
            except httpx.TransportError as error:
                raise CaddyUnavailable(
                    f"{method} {self.admin_url}{path} failed ({error!r}). Check that Caddy is running"
                ) from error

            delay = next(delays, None)
            if delay is None:
                raise CaddyUnavailable(
                    f"Caddy admin API at {self.admin_url} cannot be reached ({method} {path} failed {attempt} times,"
                    f" last with {failure!r}). Check that Caddy is running and that its admin.listen address matches"
                ) from failure
            log.info("caddy.request_retry", method=method, path=path, attempt=attempt, error=repr(failure))
            await asyncio.sleep(delay)

    def _raise_for_status(self, method: str, path: str, response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip() or response.reason_phrase
        raise CaddyError(
            f"Caddy admin API: {method} {path} failed with HTTP {response.status_code}: {message}",
            status=response.status_code,
        )
