"""The console in a real browser (Debian's Chromium, headless) against a real `clinicomm serve`
with its worker and an aiosmtpd server. Screenshots of each page go to
tests/console/screenshots/. All tests share one server and one browser (module scope), and
each builds its own clinics, so the order does not matter."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from clinicomm.api.auth import Role
from tests.api.serve_proc import ROOT, free_port
from tests.conftest import canary
from tests.console.conftest import JWT_SECRET, Console, Inbox, shot

AXE = (Path(__file__).parent / "vendor" / "axe.min.js").read_text()


def create_clinic(console: Console, clinic_id: str, name: str, comm: dict[str, Any]) -> None:
    with console.api() as api:
        answer = api.post(
            "/api/v1/clinics",
            json={"id": clinic_id, "name": name, "settings": {"communicationSettings": comm}},
        )
        assert answer.status_code == 201, answer.text


def smtp(port: int) -> dict[str, Any]:
    return {
        "provider": "smtp",
        "credentials": {
            "host": "127.0.0.1",
            "port": port,
            "requireTls": False,
            "from": "clinic@example.org",
        },
    }


def test_console_link_command_signs_in_once(console_server: Console, browser: Any) -> None:
    """`clinicomm console-link` prints a link; it opens a session once, never twice."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinicomm.cli",
            "console-link",
            "--role",
            "SuperAdmin",
            "--base-url",
            console_server.url,
        ],
        cwd=ROOT,
        env={
            "CLINICOMM_JWT_SECRET": JWT_SECRET,
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert out.startswith(f"{console_server.url}/console/login#token=")
    context = browser.new_context()
    page = context.new_page()
    page.goto(out)
    page.wait_for_url("**/console/clinics")
    cookie = next(c for c in context.cookies() if c["name"] == "clinicomm_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # plain http here; `Secure` over TLS
    shot(page, "clinics-superadmin")
    # The same link again: refused, no second session.
    other = browser.new_context()
    again = other.new_page()
    again.goto(out)
    again.wait_for_selector("p.error")
    assert "used already" in again.inner_text("p.error")
    shot(again, "login-refused")
    # Sign-out ends the session on the server: the old cookie no longer works.
    token = cookie["value"]
    page.click("text=Sign out")
    page.wait_for_url("**/console/login")
    replay = httpx.get(
        f"{console_server.url}/console/clinics", cookies={"clinicomm_console": token}
    )
    assert replay.status_code == 401 and "session has ended" in replay.text
    context.close()
    other.close()


def test_superadmin_creates_clinic_configures_smtp_and_sends_test(
    new_page: Any, smtp_server: tuple[int, Inbox]
) -> None:
    port, inbox = smtp_server
    page = new_page(Role.SUPER_ADMIN, sub="ops-1")
    page.fill("#new-id", "clinic-sa")
    page.fill("#new-name", "Clinic Super")
    page.click("button:text-is('Create')")
    page.wait_for_url("**/console/clinics/clinic-sa", timeout=5000)
    # Choose SMTP for the email primary: the form is generated from SmtpCredentials' schema.
    page.select_option("#choose-email-primary", "smtp")
    page.wait_for_selector("#email-primary-host")
    page.fill("#email-primary-host", "127.0.0.1")
    page.fill("#email-primary-port", "not-a-port")
    password = canary("console-smtp")
    page.fill("#email-primary-password", password)
    page.uncheck("#email-primary-requireTls")
    page.fill("#email-primary-from", "appointments@clinic-sa.example")
    page.click("text=Save smtp")
    # The API's 422 path, shown beside the field it names.
    error = page.wait_for_selector("#email-primary-port-err")
    assert error.inner_text()
    assert page.get_attribute("#email-primary-port", "aria-invalid") == "true"
    shot(page, "clinic-validation-error")
    assert password not in page.content()
    page.fill("#email-primary-port", str(port))
    page.fill("#email-primary-password", password)
    page.click("text=Save smtp")
    page.wait_for_selector("p.notice >> text=Saved.")
    # The secret is stored but never sent back: the form only says it is set.
    assert password not in page.content()
    assert page.inner_text("#email-primary-password-state") == "set"
    assert page.input_value("#email-primary-password") == ""
    page.select_option("#test-channel", "email")
    page.fill("#test-to", "patient-sa@example.com")
    page.click("button:text('Send a test')")
    result = page.wait_for_selector("#test-result")
    assert "sent" in result.inner_text() and "clinic:smtp" in result.inner_text()
    shot(page, "clinic-superadmin")
    deadline = time.monotonic() + 5
    while not inbox.to("patient-sa@example.com") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inbox.to("patient-sa@example.com"), "the SMTP server received nothing"


def test_manager_sees_clinic_but_no_form_and_forged_post_is_refused(
    new_page: Any, console_server: Console, smtp_server: tuple[int, Inbox]
) -> None:
    create_clinic(console_server, "clinic-mg", "Clinic Manager", {"email": {"primary": smtp(1)}})
    page = new_page(Role.CLINIC_MANAGER, "clinic-mg")
    assert "Clinic Manager" in page.inner_text("table")
    page.goto(f"{console_server.url}/console/clinics/clinic-mg")
    assert page.inner_text("h1").startswith("Clinic Manager")
    assert page.locator("ol.chain").count() >= 1
    assert page.locator("form.provider-form").count() == 0
    assert page.locator("text=Send a test").count() == 0
    shot(page, "clinic-manager")
    csrf = page.get_attribute("input[name=csrf]", "value")  # their real token (sign-out form)
    forged = page.request.post(
        f"{console_server.url}/console/clinics/clinic-mg/channels/email/slot",
        form={"csrf": csrf or "", "version": "1", "slot": "primary", "provider": "disabled"},
    )
    assert forged.status == 403
    forged_test = page.request.post(
        f"{console_server.url}/console/clinics/clinic-mg/test",
        form={"csrf": csrf or "", "channel": "email", "to": "x@example.com"},
    )
    assert forged_test.status == 403
    with console_server.api() as api:
        version = api.get("/api/v1/clinics/clinic-mg").headers["etag"]
    assert version == '"1"'  # nothing changed


def test_admin_of_one_clinic_cannot_open_another(new_page: Any, console_server: Console) -> None:
    create_clinic(console_server, "clinic-aa", "Clinic Alpha", {})
    create_clinic(
        console_server, "clinic-bb", "Bravo Private Name", {"email": {"primary": smtp(1)}}
    )
    page = new_page(Role.CLINIC_ADMIN, "clinic-aa")
    assert "Bravo Private Name" not in page.content()
    for path in ("", "/health", "/audit", "/suppressions"):
        answer = page.goto(f"{console_server.url}/console/clinics/clinic-bb{path}")
        assert answer is not None and answer.status == 403, path
        assert "Bravo Private Name" not in page.content()
        assert "127.0.0.1" not in page.content()
    shot(page, "forbidden")
    answer = page.goto(f"{console_server.url}/console/messages?clinic=clinic-bb")
    assert answer is not None and answer.status == 403


def test_failover_shows_both_attempts(
    new_page: Any, console_server: Console, smtp_server: tuple[int, Inbox]
) -> None:
    port, _ = smtp_server

    dead = free_port()  # nothing listens: connection refused, the provider is down
    create_clinic(
        console_server,
        "clinic-fo",
        "Clinic Failover",
        {"email": {"primary": smtp(dead), "fallback": [smtp(port)]}},
    )
    with console_server.api() as api:
        sent = api.post(
            "/api/v1/communications",
            json={
                "title": "Reminder",
                "body": "See you",
                "channels": ["email"],
                "recipients": [{"email": "patient-fo@example.com"}],
                "metadata": {"clinicId": "clinic-fo"},
            },
        )
        assert sent.status_code == 202, sent.text
        message_id = sent.json()["id"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = api.get(f"/api/v1/communications/{message_id}").json()
            if status["deliveries"][0]["status"] not in ("queued", "sending"):
                break
            time.sleep(0.1)
    assert status["deliveries"][0]["status"] == "sent", status
    page = new_page(Role.CLINIC_ADMIN, "clinic-fo")
    page.goto(f"{console_server.url}/console/messages?clinic=clinic-fo")
    page.click(f"text={message_id}")
    page.wait_for_url(f"**/console/messages/{message_id}")
    attempts = page.locator("li.attempt")
    assert attempts.count() == 2
    assert "failed" in attempts.nth(0).inner_text()
    assert (
        "provider_down" in attempts.nth(0).inner_text() or "class" in attempts.nth(0).inner_text()
    )
    assert "sent" in attempts.nth(1).inner_text()
    assert "final status sent" in page.inner_text("li.final")
    assert "patient-fo@example.com" not in page.content()  # addresses shown masked
    shot(page, "message")
    page.goto(f"{console_server.url}/console/clinics/clinic-fo/health")
    assert page.locator("svg.chart").count() >= 3
    shot(page, "health")


def test_stale_edit_gets_the_conflict_message(new_page: Any, console_server: Console) -> None:
    create_clinic(
        console_server,
        "clinic-st",
        "Clinic Stale",
        {"email": {"primary": smtp(25)}, "whatsapp": {"primary": {"provider": "disabled"}}},
    )
    page = new_page(Role.CLINIC_ADMIN, "clinic-st")
    page.goto(f"{console_server.url}/console/clinics/clinic-st")
    with console_server.api() as api:  # someone else saves in between
        current = api.get("/api/v1/clinics/clinic-st").json()
        current["settings"]["communicationSettings"]["email"]["defaultFrom"] = (
            "other@clinic.example"
        )
        assert (
            api.put(
                "/api/v1/clinics/clinic-st",
                json={"settings": current["settings"]},
                headers={"If-Match": '"1"'},
            ).status_code
            == 200
        )
    page.fill("#email-primary-host", "smtp.mine.example")
    page.click("text=Save smtp")
    conflict = page.wait_for_selector("#conflict")
    text = conflict.inner_text()
    assert "Someone else changed these settings" in text
    assert "email.defaultFrom" in text and "other@clinic.example" in text
    shot(page, "clinic-conflict")
    with console_server.api() as api:
        email = api.get("/api/v1/clinics/clinic-st").json()["settings"]["communicationSettings"][
            "email"
        ]
    assert email["primary"]["credentials"]["host"] == "127.0.0.1"  # the stale edit was not saved
    # Rate limits: a form from RateLimit's schema; the API's 422 beside the field.
    page.check("#email-rate-enabled")
    page.fill("#email-rate-maxPerMinute", "0")
    page.click("text=Save email rate limit")
    error = page.wait_for_selector("#email-rate-maxPerMinute-err")
    assert "greater than or equal to 1" in error.inner_text()
    assert page.input_value("#email-rate-maxPerMinute") == "0"  # drawn as it was sent
    page.fill("#email-rate-maxPerMinute", "30")
    page.select_option("#email-rate-onDayLimit", "fail")
    page.click("text=Save email rate limit")
    page.wait_for_selector("p.notice >> text=Saved.")
    # Window templates through the channel's JSON (validated by the API).
    page.fill("#whatsapp-options", '{"windowTemplates": {"APPOINTMENT": "reminder"}}')
    page.click("text=Save whatsapp settings")
    page.wait_for_selector("p.notice >> text=Saved.")
    with console_server.api() as api:
        comm = api.get("/api/v1/clinics/clinic-st").json()["settings"]["communicationSettings"]
    assert comm["email"]["rateLimit"] == {"enabled": True, "maxPerMinute": 30, "onDayLimit": "fail"}
    assert comm["whatsapp"]["windowTemplates"]["APPOINTMENT"]["name"] == "reminder"


def test_opt_outs_and_audit(new_page: Any, console_server: Console) -> None:
    create_clinic(console_server, "clinic-op", "Clinic Optout", {})
    page = new_page(Role.CLINIC_ADMIN, "clinic-op", sub="admin-op")
    page.goto(f"{console_server.url}/console/clinics/clinic-op/suppressions")
    page.select_option("#s-channel", "sms")
    page.fill("#s-address", "+14155552671")
    page.select_option("#s-reason", "stop")
    page.click("text=Add opt-out")
    page.wait_for_selector("td:text('+14155552671')")
    page.select_option("#s-channel", "sms")
    page.fill("#s-address", "not a number")
    page.click("text=Add opt-out")
    error = page.wait_for_selector("#s-address-err")  # beside the field the API's path names
    assert "not an E.164" in error.inner_text() or "phone" in error.inner_text()
    assert page.input_value("#s-address") == "not a number"
    shot(page, "suppressions")
    page.click("button[aria-label^='Remove the opt-out']")
    page.wait_for_selector("text=No opt-outs.")
    page.goto(f"{console_server.url}/console/clinics/clinic-op/audit?actor=admin-op")
    rows = page.locator("tbody tr")
    actions = [rows.nth(i).inner_text() for i in range(rows.count())]
    assert any("suppression.add" in a for a in actions)
    assert any("suppression.remove" in a for a in actions)
    shot(page, "audit")
    page.goto(f"{console_server.url}/console/clinics/clinic-op/audit?actor=nobody")
    assert "No entries." in page.inner_text("tbody")


PAGES = [
    "/console/clinics",
    "/console/clinics/clinic-ax",
    "/console/clinics/clinic-ax?edit=email.primary&provider=smtp",
    "/console/clinics/clinic-ax/health",
    "/console/clinics/clinic-ax/suppressions",
    "/console/clinics/clinic-ax/audit",
    "/console/messages",
    "/console/clinics/clinic-nope-403",
]


def test_axe_finds_no_serious_violation_on_any_page(
    new_page: Any, console_server: Console, browser: Any
) -> None:
    create_clinic(console_server, "clinic-ax", "Clinic Axe", {"email": {"primary": smtp(25)}})
    page = new_page(Role.SUPER_ADMIN)
    with console_server.api() as api:
        sent = api.post(
            "/api/v1/communications",
            json={
                "title": "t",
                "body": "b",
                "channels": ["sms"],
                "recipients": [{"email": "a@example.com"}],
                "metadata": {"clinicId": "clinic-ax"},
            },
        )
    urls = [*PAGES, f"/console/messages/{sent.json()['id']}"]
    problems: list[str] = []
    for path in urls:
        page.goto(f"{console_server.url}{path}")
        problems += _axe(page, path)
    anonymous = browser.new_context().new_page()
    anonymous.goto(f"{console_server.url}/console/login")
    problems += _axe(anonymous, "/console/login")
    shot(anonymous, "login")
    anonymous.context.close()
    assert not problems, "\n".join(problems)


def _axe(page: Any, path: str) -> list[str]:
    page.evaluate(AXE)  # evaluate, not a <script>: the page's CSP stays as served
    result = page.evaluate("async () => await axe.run(document)")
    name = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")
    shot(page, f"axe-{name}")
    return [
        f"{path}: {v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def test_pages_carry_a_strict_csp_and_errors_are_pages_not_500s(console_server: Console) -> None:
    """Without a browser: headers, and odd requests answered with a page and a 4xx."""
    base = console_server.url
    login = httpx.get(f"{base}/console/login")
    assert login.status_code == 200
    csp = login.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert login.headers["x-frame-options"] == "DENY"
    assert not re.search(r"(src|href)=\"(https?:)?//", login.text)  # nothing from elsewhere
    assert httpx.get(f"{base}/console/static/console.js").status_code == 200
    cross = httpx.post(
        f"{base}/console/login",
        data={"token": console_server.link(Role.SUPER_ADMIN).split("#token=")[1]},
        headers={"Origin": "https://elsewhere.example"},
    )
    assert cross.status_code == 403 and "set-cookie" not in cross.headers
    create_clinic(console_server, "clinic-er", "Clinic Errors", {})
    with httpx.Client(base_url=base, follow_redirects=True) as client:
        signed = client.post(
            "/console/login",
            data={"token": console_server.link(Role.SUPER_ADMIN).split("#token=")[1]},
        )
        assert signed.status_code == 200 and "Clinics" in signed.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', signed.text)
        assert csrf is not None
        cases = [
            ("get", "/console/clinics/no-such-clinic", {}, 404),
            ("get", "/console/messages/no-such-message", {}, 404),
            ("get", "/console/messages?from=yesterday", {}, 422),
            ("get", "/console/clinics/clinic-er/audit?to=soon", {}, 422),
            ("post", "/console/clinics/clinic-er/channels/fax/slot", {"csrf": csrf[1]}, 422),
            (
                "post",
                "/console/clinics/clinic-er/channels/email/slot",
                {"csrf": csrf[1], "slot": "primary", "provider": "smtp"},
                422,
            ),  # no version
            (
                "post",
                "/console/clinics/clinic-er/channels/email/slot",
                {"csrf": csrf[1], "slot": "side", "version": "1"},
                422,
            ),
            (
                "post",
                "/console/clinics/clinic-er/channels/email/options",
                {"csrf": csrf[1], "version": "1", "options": "{not json"},
                422,
            ),
            (
                "post",
                "/console/clinics/clinic-er/channels/email/options",
                {"csrf": "forged", "version": "1", "options": "{}"},
                403,
            ),
            (
                "post",
                "/console/clinics/clinic-er/suppressions",
                {"csrf": csrf[1], "action": "remove", "channel": "pigeon", "address": "x"},
                422,
            ),
            (
                "post",
                "/console/clinics/clinic-er/test",
                {"csrf": csrf[1], "channel": "email", "to": "nobody@example.com"},
                422,
            ),
        ]
        for method, path, form, expected in cases:
            answer = client.request(method, path, data=form or None)
            assert answer.status_code == expected, (path, answer.status_code, answer.text[:300])
            assert answer.headers["content-type"].startswith("text/html"), path
            assert "content-security-policy" in answer.headers
