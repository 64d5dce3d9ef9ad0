"""Redis URLs: the one check of a URL before anything connects, a URL as it may be shown
(secrets redacted), and the errors a server gives about credentials, phrased as what to do.
Used by the clients, the daemon, the demo and the CLI alike."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.connection import parse_url

from convstate.errors import ConfigurationError, RedisAuthenticationError

#: The URL schemes redis-py accepts.
ACCEPTED_SCHEMES = ("redis://", "rediss://", "unix://")
#: What a well-formed URL looks like, for error messages.
URL_FORMS = (
    "redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/socket"
)
#: Where a Python caller puts a password.
PYTHON_PASSWORD_WHERE = "the URL (redis://:PASSWORD@host) or password="
#: Query parameters redis-py reads secrets from: the server password and the TLS key passphrase.
_SECRET_QUERY_KEYS = frozenset({"password", "ssl_password"})


def url_problem(url: object) -> str | None:
    """Why redis-py cannot use ``url`` (wrong scheme, a port that is not a number, a broken
    IPv6 address...), or None. The reason never repeats the URL: it may hold a password."""
    if not isinstance(url, str):
        return f"a Redis URL is a string, not {type(url).__name__}"
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith("Port could not be cast"):  # it quotes what may be a password
            return "the port is not a number"
        if reason.startswith("Redis URL must specify"):
            return f"the scheme must be one of {', '.join(ACCEPTED_SCHEMES)}"
        return reason
    return None


def check_redis_url(url: object) -> None:
    """Raise :class:`~convstate.errors.ConfigurationError` if ``url`` is not a Redis URL."""
    problem = url_problem(url)
    if problem is not None:
        raise ConfigurationError(f"not a Redis URL ({problem}); expected {URL_FORMS}")


def auth_error(server_message: str, where: str = PYTHON_PASSWORD_WHERE) -> RedisAuthenticationError:
    """A server's refusal to talk without (the right) credentials -> one typed error saying
    what to do. ``where`` names where the caller puts a password (Python: the URL or
    ``password=``; the CLI: the URL or CONVSTATE_REDIS_URL)."""
    text = server_message.lower()
    if "invalid username-password" in text or "wrongpass" in text or "invalid password" in text:
        return RedisAuthenticationError(
            f"the server refused the user name or password: check them in {where}"
        )
    return RedisAuthenticationError(f"the server requires a password: put it in {where}")


def redact_url(url: str) -> str:
    """``url`` with any secret (the userinfo password, a ``password=`` or ``ssl_password=``
    query parameter) as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}"
    query = "&".join(
        f"{key}=***" if key.lower() in _SECRET_QUERY_KEYS else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
