"""Does a proxy in front cut idle WebSocket sessions: its idle timeout against the pings.

The service pings every idle session each `server.ping_interval` seconds and waits up to
`server.ping_timeout` more for any frame back before it closes the session as dead
(`server.ws.state.Keepalive`: dead after ``interval + timeout`` of silence). A proxy or load
balancer that closes connections idle for less than that cuts sessions the service still
considers alive, and the client sees a drop instead of a clean close.
"""

from __future__ import annotations

from server.config import ServerConfig
from server.doctor.findings import Finding, fail, ok

CHECK = "proxy idle timeout"


def proxy_finding(server: ServerConfig, idle_timeout: float | None) -> Finding:
    """*idle_timeout*: seconds a proxy in front keeps an idle connection (nginx
    ``proxy_read_timeout``, HAProxy ``timeout tunnel``, a cloud load balancer's idle timeout), or
    None when not given."""
    needed = server.ping_interval + server.ping_timeout
    rule = (
        f"server.ping_interval {server.ping_interval:g} s + server.ping_timeout {server.ping_timeout:g} s "
        f"= {needed:g} s"
    )
    if idle_timeout is None:
        return ok(
            CHECK,
            f"not given (--proxy-idle-timeout S); any proxy in front must keep idle connections open "
            f"longer than {rule}",
        )
    if idle_timeout > needed:
        return ok(CHECK, f"{idle_timeout:g} s is longer than {rule}")
    shorter = idle_timeout - server.ping_timeout
    lower = (
        f", or lower server.ping_interval below {shorter:g} s"
        if shorter > 0
        else f", or lower server.ping_timeout and server.ping_interval to sum under {idle_timeout:g} s"
    )
    return fail(
        CHECK,
        f"{idle_timeout:g} s is not longer than {rule}: the proxy cuts idle sessions; raise its idle "
        f"timeout above {needed:g} s{lower}",
    )
