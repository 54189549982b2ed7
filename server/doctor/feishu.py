"""Will Feishu talk to this service: credentials (a tenant token fetched from `feishu.domain`), the
long connection (the endpoint discovery the SDK makes, then a TCP connection to the socket's host),
or the webhook's secrets.

Plain httpx, not the SDK: only `bot.feishu` imports lark_oapi. No WebSocket is opened: the platform
hands each event to ONE open connection of the app, and a probe's connection could take an event
from the running service.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

from server.config import Config, FeishuConfig
from server.doctor.findings import Finding, fail, ok, warn

TIMEOUT = 10.0
TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
ENDPOINT_PATH = "/callback/ws/endpoint"  # what lark_oapi's ws client asks for the socket's URL
RETRIED_CODES = {1, 1000040343}  # discovery codes the SDK retries (busy, internal error)
SECRET_ADVICE = "check feishu.app_id and VLBRIDGE_FEISHU_APP_SECRET against the app's credentials page"


def feishu_findings(config: Config) -> list[Finding]:
    feishu = config.feishu
    if not feishu.enabled:
        return [ok("feishu", "off (feishu.enabled = false)")]
    if not feishu.app_id or not feishu.app_secret.get_secret_value():
        return [fail("feishu credentials", "feishu.app_id and VLBRIDGE_FEISHU_APP_SECRET must both be set")]
    domain = feishu.domain.rstrip("/")
    with httpx.Client(timeout=TIMEOUT) as client:
        findings = [_token(client, feishu, domain)]
        if feishu.mode == "longconn":
            findings.append(_long_connection(client, feishu, domain))
    if feishu.mode == "webhook":
        findings.append(_webhook(feishu))
    return findings


def _post(client: httpx.Client, url: str, body: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
    """(the JSON answer, "") or (None, why there is none)."""
    try:
        response = client.post(url, json=body, headers={"locale": "zh"})
    except httpx.HTTPError as exc:
        return None, f"cannot reach {url} ({type(exc).__name__}: {exc or 'no detail'})"
    try:
        answer = response.json()
    except ValueError:
        return None, f"{url} answered HTTP {response.status_code}, not JSON"
    if not isinstance(answer, dict):
        return None, f"{url} answered HTTP {response.status_code}, not a JSON object"
    return answer, ""


def _reach_advice(domain: str) -> str:
    return f"check feishu.domain ({domain}) and that this host reaches it (DNS, firewall, HTTPS proxy)"


def _token(client: httpx.Client, feishu: FeishuConfig, domain: str) -> Finding:
    body = {"app_id": feishu.app_id, "app_secret": feishu.app_secret.get_secret_value()}
    answer, why = _post(client, domain + TOKEN_PATH, body)
    if answer is None:
        return fail("feishu credentials", f"{why}: {_reach_advice(domain)}")
    if answer.get("code") == 0 and answer.get("tenant_access_token"):
        return ok("feishu credentials", f"{domain} issued a tenant token to app {feishu.app_id}")
    return fail(
        "feishu credentials",
        f"{domain} refused app {feishu.app_id} (code {answer.get('code')}: {answer.get('msg')}): "
        + SECRET_ADVICE,
    )


def _long_connection(client: httpx.Client, feishu: FeishuConfig, domain: str) -> Finding:
    check = "feishu long connection"
    body = {"AppID": feishu.app_id, "AppSecret": feishu.app_secret.get_secret_value()}
    answer, why = _post(client, domain + ENDPOINT_PATH, body)
    if answer is None:
        return fail(check, f"{why}: {_reach_advice(domain)}")
    code, msg = answer.get("code"), answer.get("msg")
    if code in RETRIED_CODES:
        return warn(check, f"{domain} is busy (code {code}: {msg}); the service retries; run doctor again")
    url = str((answer.get("data") or {}).get("URL") or "")
    if code != 0 or not url:
        advice = (
            "the app has too many connections open: is another deployment using this app?"
            if code == 1000040350
            else SECRET_ADVICE + ", and that the app subscribes to events over the long connection"
        )
        return fail(check, f"{domain} refused the connection (code {code}: {msg}): {advice}")
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        socket.create_connection((host, port), timeout=TIMEOUT).close()
    except OSError as exc:
        return fail(
            check,
            f"the socket's host {host}:{port} is unreachable ({exc.strerror or exc}): "
            "allow outbound connections to it (firewall, proxy)",
        )
    return ok(check, f"{domain} handed out a socket at {host}:{port}, which is reachable")


def _webhook(feishu: FeishuConfig) -> Finding:
    check = "feishu webhook"
    encrypt_key = feishu.encrypt_key.get_secret_value()
    if encrypt_key:
        return ok(check, "events are signed and encrypted (VLBRIDGE_FEISHU_ENCRYPT_KEY set)")
    if feishu.verification_token.get_secret_value():
        return warn(
            check,
            "events carry the verification token but are not signed: set VLBRIDGE_FEISHU_ENCRYPT_KEY "
            "to the app's Encrypt Key",
        )
    return fail(
        check,
        "neither VLBRIDGE_FEISHU_ENCRYPT_KEY nor VLBRIDGE_FEISHU_VERIFICATION_TOKEN is set: anyone "
        "could post events; set them to the app's Encrypt Key and Verification Token",
    )
