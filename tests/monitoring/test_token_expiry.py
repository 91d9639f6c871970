"""Token expiry read from the provider (Meta Graph API `debug_token`), not typed in by hand.

The probe round reads it for every Meta number (a stand-in Graph API on 127.0.0.1); the
`token_expiry` alert fires for a token ending within 7 days and resolves once the token is
replaced by one that never expires (`expires_at: 0`).
"""

from __future__ import annotations

import time
from typing import Any

from clinicomm.observability.alerts import AlertConfig, AlertEngine
from clinicomm.observability.monitors import probe_runner, token_expiries
from tests.support.http_capture import CapturedRequest, CaptureServer, Scripted


def graph(expires_at: int, *, valid: bool = True) -> Any:
    def answer(request: CapturedRequest) -> Scripted:
        if request.path.endswith("/debug_token"):
            return Scripted(200, {"data": {"app_id": "1", "type": "SYSTEM_USER",
                                           "is_valid": valid, "expires_at": expires_at,
                                           "data_access_expires_at": 0}})
        return Scripted(200, {"id": "1234567890"})
    return answer


async def test_probe_round_feeds_the_token_expiry_alert(make_mon: Any) -> None:
    mon = await make_mon()
    async with CaptureServer() as graph_api, CaptureServer() as hook:
        graph_api.handler = graph(int(time.time()) + 2 * 86400)
        await mon.create_clinic("clinic-x", {"whatsapp": {"primary": {
            "provider": "meta_business", "credentials": {
                "apiUrl": f"{graph_api.url}/v23.0", "apiKey": "token-x",
                "phoneNumberId": "1234567890"}}}})
        rt = mon.runtime
        eng = AlertEngine(rt.db, rt.config, rt.chains, rt.health, rt.limiter, http=rt.http,
                          webhook_url=hook.url + "/a", settings=AlertConfig(),
                          expiries=token_expiries(rt))
        assert [t for t in await eng.evaluate() if t.alert["rule"] == "token_expiry"] == []
        await probe_runner(rt).run_once()
        fired = [t for t in await eng.evaluate() if t.alert["rule"] == "token_expiry"]
        assert [t.event for t in fired] == ["alert_fired"]
        alert = fired[0].alert
        assert alert["clinicId"] == "clinic-x" and alert["provider"] == "clinic:meta_business"
        assert alert["details"]["source"] == "provider" and not alert["details"]["expired"]
        graph_api.handler = graph(0)  # the clinic replaced the token with a permanent one
        await probe_runner(rt).run_once()
        done = [t for t in await eng.evaluate() if t.alert["rule"] == "token_expiry"]
        assert [t.event for t in done] == ["alert_resolved"]
