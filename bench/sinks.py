"""Local provider sinks for the benches: Postfix ``smtp-sink`` and an nginx HTTP sink.

Both sinks are C programs that cost almost nothing per message, so a bench figure measured
against them is the cost of *our* code (see PERFORMANCE.md). They run as child processes on
127.0.0.1 with a free port, are context managers, and are stopped (and waited for) on exit.

The HTTP sink answers each HTTP provider's *send* path with that provider's real success status
and body shape, so adapters parse exactly what they parse in production:

=============  ===================================================  ===========================
provider       path                                                 status
=============  ===================================================  ===========================
SendGrid       ``POST /v3/mail/send``                               202, empty, X-Message-Id
Meta WhatsApp  ``POST /{version}/{phone_number_id}/messages``       200
Twilio         ``POST /2010-04-01/Accounts/{sid}/Messages.json``    201
Mailgun        ``POST /v3/{domain}/messages``                       200
Postmark       ``POST /email`` (and ``/email/withTemplate``)        200
=============  ===================================================  ===========================

Anything else gets a JSON 404, and a non-POST on a send path a 405.

Missing binaries are installed from Debian (``postfix`` for ``smtp-sink``, ``nginx``) with
:func:`ensure_packages`; Postfix is preseeded as "No configuration" so no MTA is set up or
started on port 25, and service start-up during the install is blocked with ``policy-rc.d``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

SMTP_SINK = "/usr/sbin/smtp-sink"
NGINX = "/usr/sbin/nginx"

_DEBCONF_SELECTIONS = (
    # "No configuration": the package installs its binaries (smtp-sink among them) but writes no
    # main.cf and starts no MTA. https://www.postfix.org/smtp-sink.1.html
    "postfix postfix/main_mailer_type select No configuration\n"
    "postfix postfix/mailname string localhost\n"
)
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_apt_updated = False


class SinkError(RuntimeError):
    """A sink could not be installed, started or reached."""


# --------------------------------------------------------------------------- installation


def _run_root(cmd: Sequence[str], *, env: dict[str, str] | None = None, stdin: str = "") -> None:
    """Run ``cmd`` as root (directly, or through ``sudo -n`` when not root); raise on failure."""
    argv = list(cmd)
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise SinkError(f"need root to run {argv[0]!r} and sudo is not available")
        argv = ["sudo", "-n", "-E", *argv]
    proc = subprocess.run(
        argv, input=stdin, text=True, capture_output=True, env=env, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise SinkError(f"{' '.join(argv)} failed ({proc.returncode}): {tail}")


@contextlib.contextmanager
def _services_blocked() -> Iterator[None]:
    """Keep ``invoke-rc.d`` from starting services during an install (Debian ``policy-rc.d``).

    Containers usually ship one already; if not, a temporary one is written and removed.
    """
    if _POLICY_RC_D.exists():
        yield
        return
    _run_root(["sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {_POLICY_RC_D}"])
    _run_root(["chmod", "0755", str(_POLICY_RC_D)])
    try:
        yield
    finally:
        _run_root(["rm", "-f", str(_POLICY_RC_D)])


def ensure_packages(*, smtp: bool = True, http: bool = True) -> None:
    """Install ``postfix`` (for ``smtp-sink``) and/or ``nginx`` if their binaries are missing.

    ``apt-get update`` runs at most once per process. Postfix is preseeded as "No configuration"
    so nothing listens on port 25 afterwards.
    """
    global _apt_updated
    wanted: list[str] = []
    if smtp and not Path(SMTP_SINK).exists():
        wanted.append("postfix")
    if http and not Path(NGINX).exists():
        wanted.append("nginx")
    if not wanted:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if "postfix" in wanted:
        _run_root(["debconf-set-selections"], stdin=_DEBCONF_SELECTIONS)
    with _services_blocked():
        if not _apt_updated:
            _run_root(["apt-get", "update"], env=env)
            _apt_updated = True
        _run_root(["apt-get", "install", "-y", "--no-install-recommends", *wanted], env=env)
    for binary, package in ((SMTP_SINK, "postfix"), (NGINX, "nginx")):
        if package in wanted and not Path(binary).exists():
            raise SinkError(f"{package} installed but {binary} is missing")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(
    port: int, proc: subprocess.Popen[bytes], timeout: float, describe: str
) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections, or ``proc`` dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SinkError(f"{describe} exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SinkError(f"{describe} is not listening on 127.0.0.1:{port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes], graceful: signal.Signals, timeout: float = 5.0) -> None:
    """Send ``graceful`` to ``proc``, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(graceful)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# --------------------------------------------------------------------------- SMTP sink


class SmtpSink:
    """Postfix ``smtp-sink`` on 127.0.0.1: accepts every message and throws it away.

    It speaks plain ESMTP and does not offer STARTTLS (it has no TLS support), so clients must
    connect with TLS off. ``count=True`` adds ``-c`` (smtp-sink prints a running message count
    on stdout, readable via :meth:`output` after exit). ``backlog`` is the listen backlog.
    https://www.postfix.org/smtp-sink.1.html
    """

    def __init__(self, *, port: int | None = None, backlog: int = 1024, count: bool = False,
                 user: str = "nobody", install: bool = True) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.backlog = backlog
        self.count = count
        self.user = user
        self.install = install
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        """The command line used to start the sink."""
        argv = [SMTP_SINK]
        if os.geteuid() == 0:
            argv += ["-u", self.user]  # smtp-sink refuses to run as root without -u
        if self.count:
            argv.append("-c")
        return [*argv, f"{self.host}:{self.port}", str(self.backlog)]

    def start(self) -> None:
        """Start the sink and wait until it accepts connections."""
        if self.install:
            ensure_packages(smtp=True, http=False)
        self._out = tempfile.NamedTemporaryFile(prefix="smtp-sink-", suffix=".log")  # noqa: SIM115
        self._proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT)
        try:
            _wait_listening(self.port, self._proc, 10.0, "smtp-sink")
        except SinkError:
            self.stop()
            raise SinkError(f"smtp-sink failed to start: {self.output()[-2000:]}") from None

    def output(self) -> str:
        """What smtp-sink printed so far (the ``-c`` counter, errors)."""
        if self._out is None:
            return ""
        self._out.flush()
        return Path(self._out.name).read_text(errors="replace")

    def stop(self) -> None:
        """Stop the sink (SIGTERM, then SIGKILL) and wait for it."""
        if self._proc is not None:
            _stop(self._proc, signal.SIGTERM)
            self._proc = None

    def close(self) -> None:
        """Stop the sink and delete its output file."""
        self.stop()
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------- HTTP sink

# Success answers, from each provider's API reference (see tests/provider_specs):
# - SendGrid v3 Mail Send: 202 Accepted, empty body, X-Message-Id header.
#   https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send
# - Meta WhatsApp Cloud API send message: 200 with messaging_product/contacts/messages.
#   https://developers.facebook.com/docs/whatsapp/cloud-api/reference/messages
# - Twilio Create a Message: 201 Created with the Message resource (status "queued").
#   https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource
# - Mailgun send: 200 {"id": "<...>", "message": "Queued. Thank you."}.
#   https://documentation.mailgun.com/docs/mailgun/api-reference/openapi-final/tag/Messages/
# - Postmark send email: 200 {"To","SubmittedAt","MessageID","ErrorCode":0,"Message":"OK"}.
#   https://postmarkapp.com/developer/api/email-api
# nginx's ``return`` discards the request body before answering (ngx_http_send_response), so
# POSTs with bodies on keep-alive connections are fine.

_META_BODY = (
    '{"messaging_product":"whatsapp",'
    '"contacts":[{"input":"+14155552671","wa_id":"14155552671"}],'
    '"messages":[{"id":"wamid.HBgL$request_id"}]}'
)
_TWILIO_BODY = (
    '{"account_sid":"$twilio_sid","api_version":"2010-04-01",'
    '"body":"Your appointment is confirmed","date_created":"$twilio_date",'
    '"date_sent":null,"date_updated":"$twilio_date","direction":"outbound-api",'
    '"error_code":null,"error_message":null,"from":"+14155550123",'
    '"messaging_service_sid":null,"num_media":"0","num_segments":"1","price":null,'
    '"price_unit":"USD","sid":"SM$request_id","status":"queued",'
    '"subresource_uris":{"media":'
    '"/2010-04-01/Accounts/$twilio_sid/Messages/SM$request_id/Media.json"},'
    '"to":"+14155552671",'
    '"uri":"/2010-04-01/Accounts/$twilio_sid/Messages/SM$request_id.json"}'
)
_MAILGUN_BODY = '{"id":"<$request_id@$mailgun_domain>","message":"Queued. Thank you."}'
_POSTMARK_BODY = (
    '{"To":"patient@example.com","SubmittedAt":"$time_iso8601",'
    '"MessageID":"$uuid","ErrorCode":0,"Message":"OK"}'
)


def nginx_config(*, port: int, prefix: Path, worker_processes: str = "1",
                 user: str | None = None) -> str:
    """The nginx.conf text for an HTTP sink rooted at ``prefix`` listening on 127.0.0.1:port.

    Everything nginx writes (pid, error log, temp dirs) lives under ``prefix``; no system
    config is read or changed. Keep-alive is on with a very high per-connection request limit
    so a bench never pays reconnects.
    """
    user_line = f"user {user};" if user else ""
    return textwrap.dedent(
        f"""\
        {user_line}
        daemon off;
        master_process on;
        worker_processes {worker_processes};
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;

        events {{
            worker_connections 4096;
            multi_accept on;
        }}

        http {{
            access_log off;
            server_tokens off;
            default_type application/json;
            keepalive_timeout 120s;
            keepalive_requests 10000000;
            client_max_body_size 32m;
            client_body_buffer_size 1m;
            client_body_temp_path {prefix}/tmp/body;
            proxy_temp_path {prefix}/tmp/proxy;
            fastcgi_temp_path {prefix}/tmp/fastcgi;
            uwsgi_temp_path {prefix}/tmp/uwsgi;
            scgi_temp_path {prefix}/tmp/scgi;

            # Twilio dates are RFC 2822; $time_local is "26/Nov/2026:13:49:30 +0000".
            map $time_local $twilio_date {{
                "~^(?<tw_d>[0-9]+)/(?<tw_m>[A-Za-z]+)/(?<tw_y>[0-9]+):(?<tw_t>[0-9:]+) (?<tw_z>.+)$"
                    "$tw_d $tw_m $tw_y $tw_t $tw_z";
            }}

            map $request_id $uuid {{
                "~^(?<a>.{{8}})(?<b>.{{4}})(?<c>.{{4}})(?<d>.{{4}})(?<e>.{{12}})$" "$a-$b-$c-$d-$e";
            }}

            server {{
                listen 127.0.0.1:{port} backlog=4096 reuseport;

                # SendGrid: POST /v3/mail/send -> 202, empty body.
                location = /v3/mail/send {{
                    if ($request_method != POST) {{ return 405 '{{"errors":[]}}'; }}
                    add_header X-Message-Id $request_id always;
                    return 202 '';
                }}

                # Meta WhatsApp Cloud API: POST /{{version}}/{{phone_number_id}}/messages -> 200.
                location ~ ^/v[0-9]+\\.[0-9]+/[^/]+/messages$ {{
                    if ($request_method != POST) {{ return 405 '{{"error":{{}}}}'; }}
                    return 200 '{_META_BODY}';
                }}

                # Twilio: POST /2010-04-01/Accounts/{{sid}}/Messages.json -> 201.
                location ~ ^/2010-04-01/Accounts/(?<twilio_sid>[^/]+)/Messages\\.json$ {{
                    if ($request_method != POST) {{ return 405 '{{"code":20004}}'; }}
                    return 201 '{_TWILIO_BODY}';
                }}

                # Mailgun: POST /v3/{{domain}}/messages -> 200.
                location ~ ^/v3/(?<mailgun_domain>[^/]+)/messages$ {{
                    if ($request_method != POST) {{ return 405 '{{"message":"Not allowed"}}'; }}
                    return 200 '{_MAILGUN_BODY}';
                }}

                # Postmark: POST /email (and /email/withTemplate) -> 200.
                location ~ ^/email(/withTemplate)?$ {{
                    if ($request_method != POST) {{ return 405 '{{"ErrorCode":405}}'; }}
                    return 200 '{_POSTMARK_BODY}';
                }}

                location / {{
                    return 404 '{{"error":"not found"}}';
                }}
            }}
        }}
        """
    )


class HttpSink:
    """nginx on 127.0.0.1 answering every HTTP provider's send path (see module docstring).

    The config, pid file, error log and temp dirs live in a private temp dir; nginx runs in the
    foreground (``daemon off``) as a child process and is stopped with SIGQUIT (graceful).
    """

    def __init__(self, *, port: int | None = None, worker_processes: str = "1",
                 install: bool = True) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.worker_processes = worker_processes
        self.install = install
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    @property
    def prefix(self) -> Path:
        """The private directory holding nginx.conf, the pid file and the error log."""
        if self._dir is None:
            raise SinkError("HttpSink is not started")
        return Path(self._dir.name)

    def error_log(self) -> str:
        """The sink's error log so far."""
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Write the config, start nginx and wait until it accepts connections."""
        if self.install:
            ensure_packages(smtp=False, http=True)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-nginx-")
        prefix = self.prefix
        # Workers run as an unprivileged user when the master is root; let them reach tmp/.
        prefix.chmod(0o755)
        (prefix / "tmp").mkdir(mode=0o777)
        (prefix / "tmp").chmod(0o1777)
        user = "nobody nogroup" if os.geteuid() == 0 else None
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(port=self.port, prefix=prefix,
                                     worker_processes=self.worker_processes, user=user))
        argv = [NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_listening(self.port, self._proc, 10.0, "nginx")
        except SinkError:
            err = b""
            if self._proc.poll() is not None and self._proc.stderr is not None:
                err = self._proc.stderr.read()
            log = self.error_log()
            self.close()
            raise SinkError(
                f"nginx failed to start: {err.decode(errors='replace')[-1500:]} {log[-1500:]}"
            ) from None

    def stop(self) -> None:
        """Stop nginx gracefully (SIGQUIT, then SIGKILL) and wait for it."""
        if self._proc is not None:
            _stop(self._proc, signal.SIGQUIT)
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None

    def close(self) -> None:
        """Stop nginx and remove its temp dir."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
