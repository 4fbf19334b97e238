"""``--join http://HOST:PORT``: the coordinator's join addresses, as its dashboard serves them.

A static docker-compose file cannot know the coordinator's peer id; its dashboard's ``/api/join``
answers the current multiaddrs. The answer is not authenticated (see :func:`fetch_join_addresses`):
for private networks. Used by ``dedloc peer`` and ``dedloc status``.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from dedloc.errors import SwarmUnreachableError, UserInputError
from dedloc.lifecycle import GracefulExit, poll_until

logger = logging.getLogger(__name__)

# the dashboard is on the private network: an http_proxy set for the internet (common in containers)
# must not stand between a peer and `http://coordinator:8080`
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

JOIN_ROUTE = "/api/join"
MAX_JOIN_ANSWER = 64 * 1024
"""Bytes read from an ``/api/join`` answer at most (a real one is a few hundred)."""
URL_EXAMPLE = "http://coordinator:8080"


def is_join_url(text: str) -> bool:
    """Whether a ``--join`` value is the coordinator's dashboard URL rather than a multiaddr."""
    return text.strip().lower().startswith(("http://", "https://"))


def join_endpoint(url: str) -> str:
    """The ``/api/join`` URL for a dashboard URL (``http[s]://host[:port][/prefix]``).

    ``/api/join`` is appended to the path unless it already ends in it; query and fragment are
    dropped. :class:`UserInputError` for a URL without a host, with a malformed port or host name, or
    with a user name or password in it.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError as e:
        raise UserInputError(f"malformed join URL {text!r}: {e}; e.g. {URL_EXAMPLE}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UserInputError(f"malformed join URL {text!r}: it needs a host, e.g. {URL_EXAMPLE}")
    if port == 0:
        raise UserInputError(f"malformed join URL {text!r}: port 0, e.g. {URL_EXAMPLE}")
    if parts.username is not None or parts.password is not None:
        raise UserInputError(f"join URL for {parts.hostname}: a user name or password in it is not supported")
    try:
        parts.hostname.encode("idna")  # what urllib does with it: an empty or overlong label fails here
    except UnicodeError:
        raise UserInputError(f"malformed join URL {text!r}: {parts.hostname!r} is not a host name") from None
    path = parts.path.rstrip("/")
    if not path.endswith(JOIN_ROUTE):
        path += JOIN_ROUTE
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def _parse_join_answer(body: bytes, endpoint: str) -> list[str]:
    not_ours = f"{endpoint} did not answer as a dedloc coordinator's dashboard does"
    if len(body) > MAX_JOIN_ANSWER:
        raise UserInputError(f"{not_ours} (its answer is larger than {MAX_JOIN_ANSWER // 1024} KiB)")
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        raise UserInputError(f"{not_ours} (its answer is not JSON)") from None
    join = data.get("join") if isinstance(data, dict) else None
    if (
        not isinstance(join, list) or not join or not isinstance(data.get("coordinator"), str)
        or not all(isinstance(item, str) and item.startswith("/") for item in join)
    ):
        raise UserInputError(f"{not_ours} (no join addresses in its answer)")
    return join


def fetch_join_addresses(url: str, timeout: float, stop: GracefulExit, poll: float = 0.5) -> list[str]:
    """The coordinator's join multiaddrs, as its dashboard serves them at ``/api/join``.

    Asks again until ``timeout`` while nothing answers, the name does not resolve yet or the answer is
    a 5xx (the coordinator may still be starting: it answers 503 until it has published its
    addresses). Raises :class:`SwarmUnreachableError` naming the URL when none came in time,
    :class:`UserInputError` for a malformed URL or an answer that is not a dedloc join answer (4xx,
    not JSON, no addresses, over :data:`MAX_JOIN_ANSWER`), and ``KeyboardInterrupt`` once ``stop`` is set.

    The answer is not authenticated: anyone who can intercept or impersonate the URL chooses the
    coordinator. This is meant for a private network (docker compose, a LAN). Over the internet,
    give ``--join`` the coordinator's full multiaddr: its ``/p2p/<peer id>`` pins the coordinator's key,
    and the peer checks the run manifest's signature against it.
    """
    endpoint = join_endpoint(url)
    deadline = time.monotonic() + timeout
    last_problem = ""

    def ask() -> Optional[list[str]]:
        nonlocal last_problem
        attempt_timeout = max(0.5, min(5.0, deadline - time.monotonic()))
        try:
            request = urllib.request.Request(endpoint, headers={"Accept": "application/json"})
            with _DIRECT.open(request, timeout=attempt_timeout) as response:
                body = response.read(MAX_JOIN_ANSWER + 1)
            join = _parse_join_answer(body, endpoint)
            logger.info(f"join addresses from {endpoint}: {' '.join(join)}")
            return join
        except urllib.error.HTTPError as e:
            e.close()
            if e.code < 500:
                raise UserInputError(
                    f"{endpoint} answered {e.code} {e.reason}: is {url.strip()!r} the dashboard of a dedloc "
                    f"coordinator (its --dashboard-host/--dashboard-port)?"
                ) from None
            problem = f"it answered {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            problem = f"{getattr(e, 'reason', None) or e}"
        except ValueError as e:  # http.client.InvalidURL and the like: a URL urllib cannot ask
            raise UserInputError(f"malformed join URL {url.strip()!r}: {e}; e.g. {URL_EXAMPLE}") from None
        if not last_problem:
            logger.info(f"waiting for the coordinator's dashboard at {endpoint} ({problem})")
        last_problem = problem
        return None

    return poll_until(
        ask,
        timeout,
        stop,
        lambda: SwarmUnreachableError(
            f"the coordinator's dashboard at {endpoint} gave no join addresses within {timeout:.3g} s "
            f"(last: {last_problem}): is the coordinator running, with its dashboard on that host and port?"
        ),
        poll,
    )


def expand_join(values: Sequence[str], timeout: float, stop: GracefulExit) -> list[str]:
    """``--join`` values with every ``http(s)://`` URL replaced by the join addresses it serves, in
    place (the first address still names the coordinator); multiaddrs pass through unchanged. One
    ``timeout`` covers all URLs. Errors as for :func:`fetch_join_addresses`.
    """
    deadline = time.monotonic() + timeout
    expanded: list[str] = []
    for value in values:
        parts = value.replace(",", " ").split()
        if not any(is_join_url(part) for part in parts):
            expanded.append(value)
            continue
        for part in parts:
            if is_join_url(part):
                expanded.extend(fetch_join_addresses(part, max(0.0, deadline - time.monotonic()), stop))
            else:
                expanded.append(part)
    return expanded
