import re

import pytest

from jarvis_deploy.references import (
    ImageReference,
    normalize_domain,
    parse_image_reference,
)

SHA256_HEX = "0123456789abcdef" * 4
SHA512_HEX = "0123456789abcdef" * 8


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("nginx", ImageReference(None, "nginx")),
        ("nginx:1.25", ImageReference(None, "nginx", tag="1.25")),
        ("library/nginx:latest", ImageReference(None, "library/nginx", tag="latest")),
        ("localhost/app", ImageReference("localhost", "app")),
        ("localhost:5000/testapp:v1", ImageReference("localhost:5000", "testapp", tag="v1")),
        (
            f"registry.example.com:443/team/app@sha256:{SHA256_HEX}",
            ImageReference("registry.example.com:443", "team/app", digest=f"sha256:{SHA256_HEX}"),
        ),
        (f"app:v1@sha256:{SHA256_HEX}", ImageReference(None, "app", tag="v1", digest=f"sha256:{SHA256_HEX}")),
        (f"app@sha512:{SHA512_HEX}", ImageReference(None, "app", digest=f"sha512:{SHA512_HEX}")),
        ("[::1]:5000/app", ImageReference("[::1]:5000", "app")),
        ("[2001:db8::1]/team/app:1", ImageReference("[2001:db8::1]", "team/app", tag="1")),
        ("127.0.0.1:5000/app:v1", ImageReference("127.0.0.1:5000", "app", tag="v1")),
        ("Registry.Example.com/app", ImageReference("Registry.Example.com", "app")),
        ("a.b/c", ImageReference("a.b", "c")),
        ("team/a.b_c__d-e---f", ImageReference(None, "team/a.b_c__d-e---f")),
        ("app:V1_x.y-z", ImageReference(None, "app", tag="V1_x.y-z")),
        ("app:_", ImageReference(None, "app", tag="_")),
        ("localhost:5000", ImageReference(None, "localhost", tag="5000")),
    ],
)
def test_parse_image_reference_valid(value: str, expected: ImageReference) -> None:
    parsed = parse_image_reference(value)

    assert parsed == expected
    assert str(parsed) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("app:", "empty tag"),
        ("MyApp", "must be lowercase"),
        ("team/MyApp:v1", "must be lowercase"),
        ("nginx latest", "white space"),
        (" nginx", "white space"),
        ("nginx\n", "white space"),
        ("a" * 256, "at most 255"),
        ("example.com/" + "a" * 244, "at most 255"),
        ("team//app", "empty path component"),
        ("team/app/", "empty path component"),
        ("/app", "empty path component"),
        ("app___x", "invalid repository component"),
        ("-app", "invalid repository component"),
        ("app-", "invalid repository component"),
        ("app:.v1", "invalid tag"),
        ("app:-v1", "invalid tag"),
        ("app:" + "a" * 129, "invalid tag"),
        ("app:v1:v2", "invalid repository component"),
        ("app@", "empty digest"),
        ("app@sha256", "Expected algorithm:hex"),
        ("app@sha256:abc", "exactly 64"),
        (f"app@sha256:{SHA256_HEX}0", "exactly 64"),
        (f"app@sha256:{SHA256_HEX.upper()}", "lowercase hex"),
        (f"app@md5:{SHA256_HEX}", "does not support"),
        (f"app@sha256:{SHA256_HEX}@sha256:{SHA256_HEX}", "exactly 64"),
        ("-registry.example.com/app", "invalid registry host"),
        ("registry..example.com/app", "invalid registry host"),
        ("localhost:port/app", "invalid registry port"),
        ("localhost:0/app", "outside 1-65535"),
        ("localhost:65536/app", "outside 1-65535"),
        ("[::1/app", "without a closing"),
        ("[zz::1]:5000/app", "not a valid IPv6"),
        ("[::1]x/app", "expected ':port'"),
        ("[::1]:5000", "invalid repository component"),
        ("nginx:1.25\u00e9", "invalid tag"),
        ("ng\u00efnx", "invalid repository component"),
    ],
)
def test_parse_image_reference_invalid(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        parse_image_reference(value)

    if value:
        assert repr(value) in str(caught.value)


def test_image_reference_name_joins_registry() -> None:
    assert parse_image_reference("localhost:5000/testapp:v1").name == "localhost:5000/testapp"
    assert parse_image_reference("nginx:1.25").name == "nginx"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", "example.com"),
        ("App.Example.COM", "app.example.com"),
        ("example.com.", "example.com"),
        ("localhost", "localhost"),
        ("*.example.com", "*.example.com"),
        ("*.Bücher.example", "*.xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("straße.de", "xn--strae-oqa.de"),
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\u3002com", "example.com"),
        ("a-b--c.example", "a-b--c.example"),
        ("1password.example", "1password.example"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (".".join(["a" * 62] * 4), ".".join(["a" * 62] * 4)),
    ],
)
def test_normalize_domain_valid(value: str, expected: str) -> None:
    assert normalize_domain(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("app example.com", "white space"),
        (" example.com", "white space"),
        ("http://example.com", "URL scheme"),
        ("https://example.com/", "URL scheme"),
        ("example.com:8080", "port"),
        ("example.com/path", "path"),
        ("example.com?x=1", "path"),
        ("user@example.com", "user information"),
        ("my_app.example.com", "'_'"),
        ("app.*.example.com", "'*' outside"),
        ("*example.com", "'*' outside"),
        ("**.example.com", "'*' outside"),
        ("*", "'*' outside"),
        ("*.", "no labels"),
        (".", "no labels"),
        ("127.0.0.1", "IP address"),
        ("::1", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("\uff11\uff12\uff17.0.0.1", "IP address"),
        ("10.1", "all-numeric"),
        ("example.123", "all-numeric"),
        ("-app.example.com", "does not start or end with '-'"),
        ("app-.example.com", "does not start or end with '-'"),
        ("app..example.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("a" * 64 + ".example", "64 characters"),
        (".".join(["a" * 63] * 4), "maximum is 253"),
        ("x" * 2000, "too long"),
        ("xn--zz.example", "invalid label"),
        ("app!.example", "not a valid internationalized host name"),
        ("\u2603.example", "invalid label"),
        ("\u0300a.example", "invalid label"),
        ("app\u200d.example", "control characters"),
    ],
)
def test_normalize_domain_invalid(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_domain(value)
