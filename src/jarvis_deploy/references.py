"""Validation of image references and domain names taken from deployment requests.

Pure functions with no I/O, so the request models can call them inside Pydantic validators.
"""

import ipaddress
import re
from dataclasses import dataclass

import idna

# Patterns and limits of the Docker reference grammar, as written in reference.go of the
# github.com/distribution/reference Go module.
NAME_MAX_LENGTH = 255
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
PATH_COMPONENT_PATTERN = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
DOMAIN_COMPONENT_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
DIGEST_ALGORITHM_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[+._-][A-Za-z][A-Za-z0-9]*)*$")
# Digest algorithms that the Docker Engine accepts in a reference, each with lowercase hex of a fixed length.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
LOWERCASE_HEX_PATTERN = re.compile(r"^[0-9a-f]+$")
REFERENCE_FORMAT = "[registry[:port]/]repository[:tag][@digest]"

DOMAIN_MAX_LENGTH = 253
# Bounds the input before UTS #46 mapping, which may drop characters such as soft hyphens, so
# the mapped name can be shorter than the text given.
DOMAIN_INPUT_MAX_LENGTH = 1024
DOMAIN_LABEL_MAX_LENGTH = 63
DOMAIN_LABEL_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


@dataclass(frozen=True)
class ImageReference:
    """Image reference split into its parts. `str()` joins them back into the text that was parsed."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """Registry and repository without tag or digest, as the Docker Engine names an image."""
        if self.registry is None:
            return self.repository
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_reference(value: str) -> ImageReference:
    """Parse `[registry[:port]/]repository[:tag][@digest]` by the Docker reference grammar.

    As in Docker, the first `/`-separated component is a registry host only when it contains
    `.` or `:`, is `localhost`, or contains an uppercase letter. Otherwise the whole name is a
    repository on the default registry. Raises ValueError that names the invalid part.
    """
    if not value:
        raise ValueError(f"image reference is empty. Expected {REFERENCE_FORMAT}, for example nginx:1.25")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(
            f"image reference {value!r} contains white space or control characters. Expected {REFERENCE_FORMAT}"
        )

    remainder, digest = _split_digest(value)
    name, tag = _split_tag(value, remainder)
    registry, repository = _split_registry(name)

    if registry is not None:
        _validate_registry(value, registry)
    _validate_repository(value, repository)
    if len(name) > NAME_MAX_LENGTH:
        raise ValueError(
            f"image reference {value!r} has a name of {len(name)} characters."
            f" Registry and repository together may have at most {NAME_MAX_LENGTH}"
        )
    if tag is not None:
        _validate_tag(value, tag)
    if digest is not None:
        _validate_digest(value, digest)

    return ImageReference(registry=registry, repository=repository, tag=tag, digest=digest)


def _split_digest(value: str) -> tuple[str, str | None]:
    if "@" not in value:
        return value, None
    remainder, digest = value.split("@", 1)
    if not digest:
        raise ValueError(f"image reference {value!r} has an empty digest after '@'. Expected algorithm:hex")
    return remainder, digest


def _split_tag(value: str, remainder: str) -> tuple[str, str | None]:
    """Split off the tag, which follows the last `:` only when no `/` comes after it."""
    colon = remainder.rfind(":")
    if colon == -1 or colon < remainder.rfind("/") or colon < remainder.rfind("]"):
        return remainder, None
    tag = remainder[colon + 1 :]
    if not tag:
        raise ValueError(
            f"image reference {value!r} has an empty tag after ':'. Remove the ':' or give a tag such as 'latest'"
        )
    return remainder[:colon], tag


def _split_registry(name: str) -> tuple[str | None, str]:
    slash = name.find("/")
    if slash == -1:
        return None, name
    first = name[:slash]
    if "." in first or ":" in first or first == "localhost" or first.lower() != first:
        return first, name[slash + 1 :]
    return None, name


def _validate_registry(value: str, registry: str) -> None:
    if registry.startswith("["):
        host, bracket, port = registry[1:].partition("]")
        if not bracket:
            raise ValueError(f"image reference {value!r} has an IPv6 registry address without a closing ']'")
        if port and not port.startswith(":"):
            raise ValueError(f"image reference {value!r}: expected ':port' after the IPv6 registry address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"image reference {value!r}: {host!r} is not a valid IPv6 address") from None
        port = port[1:] if port else None
    else:
        host, colon, port_text = registry.partition(":")
        port = port_text if colon else None
        components = host.split(".")
        if not all(DOMAIN_COMPONENT_PATTERN.match(component) for component in components):
            raise ValueError(
                f"image reference {value!r} has an invalid registry host {host!r}. Expected dot-separated"
                " components of letters, digits and inner '-', an IPv4 address or a bracketed IPv6 address"
            )

    if port is not None:
        if not port.isascii() or not port.isdigit():
            raise ValueError(f"image reference {value!r} has an invalid registry port {port!r}. Expected digits")
        if not 1 <= int(port) <= 65535:
            raise ValueError(
                f"image reference {value!r} has registry port {port}, which is outside 1-65535"
            )


def _validate_repository(value: str, repository: str) -> None:
    for component in repository.split("/"):
        if not component:
            raise ValueError(
                f"image reference {value!r} has an empty path component. Remove the doubled, leading or trailing '/'"
            )
        if PATH_COMPONENT_PATTERN.match(component):
            continue
        if component.lower() != component and PATH_COMPONENT_PATTERN.match(component.lower()):
            raise ValueError(
                f"image reference {value!r}: repository name must be lowercase, but {component!r} is not"
            )
        raise ValueError(
            f"image reference {value!r} has an invalid repository component {component!r}. Expected lowercase"
            " letters and digits, separated by '.', '_', '__' or one or more '-'"
        )


def _validate_tag(value: str, tag: str) -> None:
    if not TAG_PATTERN.match(tag):
        raise ValueError(
            f"image reference {value!r} has an invalid tag {tag!r}. Expected 1-128 characters of letters,"
            " digits, '_', '.' and '-', not starting with '.' or '-'"
        )


def _validate_digest(value: str, digest: str) -> None:
    algorithm, colon, hex_digits = digest.partition(":")
    if not colon or not DIGEST_ALGORITHM_PATTERN.match(algorithm) or not hex_digits:
        raise ValueError(f"image reference {value!r} has an invalid digest {digest!r}. Expected algorithm:hex")
    expected_length = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected_length is None:
        supported = ", ".join(sorted(DIGEST_HEX_LENGTHS))
        raise ValueError(
            f"image reference {value!r} uses digest algorithm {algorithm!r}, which Docker does not support."
            f" Use one of {supported}"
        )
    if len(hex_digits) != expected_length:
        raise ValueError(
            f"image reference {value!r} has a {algorithm} digest of {len(hex_digits)} characters."
            f" Expected exactly {expected_length} lowercase hex digits after '{algorithm}:'"
        )
    if not LOWERCASE_HEX_PATTERN.match(hex_digits):
        raise ValueError(
            f"image reference {value!r} has a {algorithm} digest with characters other than"
            " lowercase hex digits (0-9, a-f)"
        )


def normalize_domain(value: str) -> str:
    """Validate a host name for a Caddy route and return its lowercase ASCII form.

    A trailing dot is dropped, Unicode labels become punycode after UTS #46 mapping, and a
    leading `*.` wildcard label is kept. IP addresses are rejected because a domain here is a
    host name that Caddy matches by name. Raises ValueError that names the rule broken.
    """
    if not value:
        raise ValueError("domain is empty. Expected a host name such as app.example.com")
    if len(value) > DOMAIN_INPUT_MAX_LENGTH:
        raise ValueError(
            f"domain of {len(value)} characters is too long. A host name has at most {DOMAIN_MAX_LENGTH}"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(f"domain {value!r} contains white space or control characters. Expected a bare host name")
    if "://" in value:
        raise ValueError(f"domain {value!r} contains a URL scheme. Give only the host name, without 'http://'")
    if "/" in value or "?" in value or "#" in value:
        raise ValueError(f"domain {value!r} contains a path. Give only the host name")
    if "@" in value:
        raise ValueError(f"domain {value!r} contains user information ('@'). Give only the host name")
    if ":" in value or "[" in value:
        if _is_ip_address(value.strip("[]")):
            raise ValueError(f"domain {value!r} is an IP address. A domain must be a host name")
        raise ValueError(f"domain {value!r} contains a port. Give only the host name, without ':port'")
    if "_" in value:
        raise ValueError(f"domain {value!r} contains '_', which is not allowed in host names. Use '-'")

    wildcard = value.startswith("*.")
    host = value[2:] if wildcard else value
    if "*" in host:
        raise ValueError(
            f"domain {value!r} has a '*' outside a leading wildcard label. Only '*.' as the whole first label is allowed"
        )

    try:
        mapped = idna.uts46_remap(host, std3_rules=True, transitional=False)
    except idna.IDNAError as error:
        raise ValueError(f"domain {value!r} is not a valid internationalized host name: {error}") from None
    if mapped.endswith("."):
        mapped = mapped[:-1]
    if not mapped:
        raise ValueError(f"domain {value!r} has no labels. Expected a host name such as app.example.com")
    if _is_ip_address(mapped):
        raise ValueError(f"domain {value!r} is an IP address. A domain must be a host name")

    labels = [_normalize_label(value, label) for label in mapped.split(".")]
    if labels[-1].isdigit():
        raise ValueError(
            f"domain {value!r} ends in an all-numeric label, which reads as an IP address. A domain must be a host name"
        )

    normalized = ".".join(labels)
    if wildcard:
        normalized = f"*.{normalized}"
    if len(normalized) > DOMAIN_MAX_LENGTH:
        raise ValueError(
            f"domain {value!r} is {len(normalized)} characters long in ASCII form. The maximum is {DOMAIN_MAX_LENGTH}"
        )
    return normalized


def _normalize_label(value: str, label: str) -> str:
    if not label:
        raise ValueError(f"domain {value!r} has an empty label. Remove the doubled or leading '.'")
    try:
        if label.isascii():
            if label.startswith("xn--"):
                idna.ulabel(label)
            ascii_label = label
        else:
            ascii_label = idna.alabel(label).decode("ascii")
    except idna.IDNAError as error:
        raise ValueError(f"domain {value!r} has an invalid label {label!r}: {error}") from None

    if len(ascii_label) > DOMAIN_LABEL_MAX_LENGTH:
        raise ValueError(
            f"domain {value!r} has a label of {len(ascii_label)} characters in ASCII form."
            f" The maximum is {DOMAIN_LABEL_MAX_LENGTH}"
        )
    if not DOMAIN_LABEL_PATTERN.match(ascii_label):
        raise ValueError(
            f"domain {value!r} has an invalid label {label!r}. A label contains letters, digits and '-',"
            " and does not start or end with '-'"
        )
    return ascii_label


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
