"""Lookup names, the routes that name them, loopback addresses, and the resolver's DNS responses."""

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from jarvis_deploy.config import Settings
from jarvis_deploy.proxy.addresses import address_at
from jarvis_deploy.proxy.caddy import build_route
from jarvis_deploy.proxy.lookup import (
    UpstreamLookup,
    common_port,
    lookup_name,
    parse_lookup_name,
)
from jarvis_deploy.proxy.resolver import UpstreamTable, answer


def test_lookup_name_round_trip() -> None:
    name = lookup_name("shop_2-a", 8080, "0123abcd")

    assert name == "shop_2-a.p8080.0123abcd.upstreams.jarvis.internal."
    assert parse_lookup_name(name) == ("shop_2-a", 8080, "0123abcd")
    assert parse_lookup_name(name.upper()) == ("shop_2-a", 8080, "0123abcd")


@pytest.mark.parametrize(
    "name",
    [
        "shop.p8080.i1.example.com.",
        "shop.p8080.upstreams.jarvis.internal.",
        "a.shop.p8080.i1.upstreams.jarvis.internal.",
        "shop.8080.i1.upstreams.jarvis.internal.",
        "shop.p0.i1.upstreams.jarvis.internal.",
        "shop.p65536.i1.upstreams.jarvis.internal.",
        "shop.px.i1.upstreams.jarvis.internal.",
        "upstreams.jarvis.internal.",
    ],
)
def test_parse_lookup_name_rejects(name: str) -> None:
    assert parse_lookup_name(name) is None


@pytest.mark.parametrize(
    ("upstreams", "port"),
    [
        (["127.77.0.1:8080"], 8080),
        (["127.77.0.1:8080", "127.77.0.2:8080"], 8080),
        (["127.77.0.1:8080", "127.77.0.2:9090"], None),
        (["127.0.0.1:49153", "127.0.0.1:49154"], None),
        (["shop-v1-1:8080"], None),
        (["[::1]:8080"], None),
        ([], None),
    ],
)
def test_common_port(upstreams: list[str], port: int | None) -> None:
    assert common_port(upstreams) == port


def test_route_with_lookup_lists_no_upstreams() -> None:
    lookup = UpstreamLookup(lookup_name("shop", 8080, "i1"), 8080, 0.02, "127.0.0.1:5353")

    route = build_route("jarvis-deploy-route-shop", ["shop.test"], ["127.77.0.1:8080"], lookup)

    handler = route["handle"][0]
    assert "upstreams" not in handler
    assert handler["dynamic_upstreams"] == {
        "source": "a",
        "name": "shop.p8080.i1.upstreams.jarvis.internal.",
        "port": "8080",
        "refresh": "20ms",
        "resolver": {"addresses": ["udp/127.0.0.1:5353"]},
    }


def test_route_without_lookup_lists_upstreams() -> None:
    route = build_route("jarvis-deploy-route-shop", ["shop.test"], ["127.0.0.1:49153"])

    assert route["handle"][0]["upstreams"] == [{"dial": "127.0.0.1:49153"}]
    assert "dynamic_upstreams" not in route["handle"][0]


def test_lookup_with_ipv6_resolver() -> None:
    lookup = UpstreamLookup("x.", 80, 1.5, "[::1]:5353")

    assert lookup.caddy_json()["resolver"] == {"addresses": ["udp/[::1]:5353"]}
    assert lookup.caddy_json()["refresh"] == "1500ms"


def test_address_at_wraps_within_network() -> None:
    assert address_at("127.77.0.0/16", 1) == "127.77.0.1"
    assert address_at("127.77.0.0/16", 65534) == "127.77.255.254"
    assert address_at("127.77.0.0/16", 65535) == "127.77.0.1"
    assert address_at("127.77.0.0/30", 3) == "127.77.0.1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("upstream_resolver", "localhost:5353"),
        ("upstream_resolver", "127.0.0.1"),
        ("upstream_resolver", "127.0.0.1:70000"),
        ("upstream_address_range", "10.0.0.0/16"),
        ("upstream_address_range", "127.77.0.1/32"),
        ("upstream_address_range", "not a network"),
    ],
)
def test_settings_reject_invalid_resolver_values(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})


def test_default_range_follows_instance() -> None:
    first = Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/one")
    second = Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/two")

    assert first.upstream_network == first.upstream_network
    assert first.upstream_network.startswith("127.")
    assert first.upstream_network.endswith(".0.0/16")
    assert 64 <= int(first.upstream_network.split(".")[1]) <= 191
    assert first.upstream_network != second.upstream_network
    assert Settings(upstream_address_range="127.91.0.0/24").upstream_network == "127.91.0.0/24"


def test_resolved_upstreams_needs_loopback_mode() -> None:
    assert Settings(upstream_resolver="127.0.0.1:5353", upstream_mode="loopback").resolved_upstreams
    assert not Settings(upstream_resolver="127.0.0.1:5353", upstream_mode="network").resolved_upstreams
    assert not Settings(upstream_resolver="", upstream_mode="loopback").resolved_upstreams


def table_of(routes: dict[str, list[str]]) -> UpstreamTable:
    table = UpstreamTable()
    table.replace(routes)
    return table


def ask(table: UpstreamTable, name: str, rdtype: dns.rdatatype.RdataType = dns.rdatatype.A) -> dns.message.Message:
    wire = answer(table, "i1", dns.message.make_query(name, rdtype).to_wire())
    assert wire is not None
    return dns.message.from_wire(wire)


def test_table_addresses_by_port() -> None:
    table = table_of({"shop": ["127.77.0.2:8080", "127.77.0.1:8080"], "mixed": ["127.77.0.3:8080", "127.77.0.4:9090"]})

    assert table.addresses("shop", 8080) == ["127.77.0.1", "127.77.0.2"]
    assert table.addresses("shop", 9090) is None
    assert table.addresses("mixed", 8080) is None
    assert table.addresses("absent", 8080) is None


def test_table_before_first_read_raises() -> None:
    with pytest.raises(LookupError):
        UpstreamTable().addresses("shop", 8080)


def test_answer_returns_addresses() -> None:
    table = table_of({"shop": ["127.77.0.1:8080", "127.77.0.2:8080"]})

    response = ask(table, lookup_name("shop", 8080, "i1"))

    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert sorted(item.address for item in response.answer[0]) == ["127.77.0.1", "127.77.0.2"]
    assert response.answer[0].ttl == 0


def test_answer_unknown_project_is_nxdomain() -> None:
    response = ask(table_of({}), lookup_name("shop", 8080, "i1"))

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []


def test_answer_aaaa_has_no_records() -> None:
    response = ask(table_of({"shop": ["127.77.0.1:8080"]}), lookup_name("shop", 8080, "i1"), dns.rdatatype.AAAA)

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []


def test_answer_other_instance_is_nxdomain() -> None:
    response = ask(table_of({"shop": ["127.77.0.1:8080"]}), lookup_name("shop", 8080, "i2"))

    assert response.rcode() == dns.rcode.NXDOMAIN


def test_answer_refuses_names_outside_zone() -> None:
    response = ask(table_of({}), "example.com.")

    assert response.rcode() == dns.rcode.REFUSED


def test_answer_without_database_is_servfail() -> None:
    response = ask(UpstreamTable(), lookup_name("shop", 8080, "i1"))

    assert response.rcode() == dns.rcode.SERVFAIL


def test_answer_ignores_garbage_and_responses() -> None:
    table = table_of({})
    response = dns.message.make_response(dns.message.make_query("x.", dns.rdatatype.A))

    assert answer(table, "i1", b"\x00\x01garbage") is None
    assert answer(table, "i1", response.to_wire()) is None
