"""One bad row never blocks its batch: a delivery whose content this worker cannot decrypt
(written under a master key it does not hold) ends `failed` (configuration) alone."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from clinicomm import Client, SendRequest
from clinicomm.config import Settings
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.pipeline import create_clinic, fast, wait_terminal


def twilio_sms(server: CaptureServer) -> dict[str, Any]:
    return {
        "primary": {
            "provider": "twilio",
            "credentials": {
                "accountSid": "AC" + "0" * 32,
                "authToken": "tok",
                "fromNumber": "+14155550000",
                "baseUrl": server.url,
            },
        }
    }


def sms(clinic: str, n: int) -> SendRequest:
    return SendRequest.model_validate(
        {
            "body": "Your code is 1234",
            "recipients": [{"phone": f"+1415555{n:04d}"}],
            "channels": ["sms"],
            "metadata": {"clinicId": clinic},
        }
    )


async def test_undecryptable_delivery_fails_alone_in_a_batch_of_51(settings: Settings) -> None:
    foreign_key = f"elsewhere:{base64.b64encode(secrets.token_bytes(32)).decode()}"
    assert settings.master_keys is not None
    async with CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": "SM" + "1" * 32, "status": "queued"})
        # Another deployment's writer: its first master key wraps the clinic's data key, and
        # this test's worker never gets that master key.
        elsewhere = settings.model_copy(
            update={"master_keys": f"{foreign_key},{settings.master_keys}"}
        )
        async with Client(fast(elsewhere), run_worker=False, env={}) as writer:
            await create_clinic(writer, "c-foreign", {"sms": twilio_sms(twilio)})
            foreign = await writer.send(sms("c-foreign", 0))
        async with Client(fast(settings), run_worker=False, env={}) as writer:
            await create_clinic(writer, "c-good", {"sms": twilio_sms(twilio)})
            good = [await writer.send(sms("c-good", n)) for n in range(1, 51)]
        async with Client(fast(settings, worker_batch_size=100), env={}) as worker:
            bad = await wait_terminal(worker, foreign.id)
            (delivery,) = bad["deliveries"]
            assert delivery["status"] == "failed"
            assert delivery["error"]["reason"] == "configuration"
            (why,) = delivery["error"]["errors"]
            assert why["class"] == "configuration"
            assert "cannot be decrypted" in why["message"]
            for accepted in good:
                status = await wait_terminal(worker, accepted.id)
                assert [d["status"] for d in status["deliveries"]] == ["sent"]
        assert len(twilio.requests) == 50
