"""`vlbridge doctor`: check a deployment from inside, one line per check with a verdict.

`diagnose(path, environ, proxy_idle_timeout)` returns typed `Finding`s (ok / warn / FAIL and one
sentence saying what was found and what to do); `report.render` prints them as a table. The checks,
by module: `model` (the demo model, a checkpoint on its device with enough memory, or the
OpenAI-compatible upstreams), `storage` (the folder, the Feishu inbox), `feishu` (credentials, the
long connection or the webhook's secrets), `proxy` (a proxy's idle timeout against the pings).
"""

from server.doctor.diagnose import diagnose
from server.doctor.findings import Finding, Verdict
from server.doctor.report import failed, render

__all__ = ["Finding", "Verdict", "diagnose", "failed", "render"]
