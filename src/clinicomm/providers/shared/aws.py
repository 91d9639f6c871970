"""AWS request signing (SigV4) and error reading, shared by SES and SNS.

botocore only signs (`SigV4Auth` over an `AWSRequest`); the bytes it signed are the bytes the
adapter sends through its `HttpAdapter` session, so no botocore connection pool or blocking
client is used. https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv.html
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from clinicomm.providers.shared.credentials import AwsCredentials

# Query-protocol (XML) errors: `<ErrorResponse><Error><Code>…</Code><Message>…</Message>`.
# Read with bounded regular expressions: no XML parser on untrusted input.
_XML_CODE = re.compile(r"<Code>([^<]{1,200})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,1000})</Message>")


class SigV4Signer:
    """Signs requests for one AWS service in the credentials' region."""

    def __init__(self, credentials: AwsCredentials, service: str) -> None:
        self.service = service
        self.region = credentials.region
        self._auth = SigV4Auth(
            Credentials(
                credentials.access_key_id, credentials.secret_access_key.get_secret_value()
            ),
            service,
            credentials.region,
        )

    def __repr__(self) -> str:
        # Never show the key: the signer holds it.
        return f"SigV4Signer({self.service!r}, {self.region!r})"

    def headers(
        self, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """`headers` plus the signature headers (Authorization, X-Amz-Date, …) for this request.

        Send exactly `body` to exactly `url` with these headers; anything else breaks the
        signature (`User-Agent` aside: SigV4 does not sign it).
        """
        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
        self._auth.add_auth(request)
        return {k: str(v) for k, v in request.headers.items()}


def xml_error(text: str) -> tuple[str | None, str | None]:
    """The `<Code>` and `<Message>` of an AWS Query-protocol XML error body, when present."""
    code = _XML_CODE.search(text)
    message = _XML_MESSAGE.search(text)
    return (code.group(1) if code else None, message.group(1) if message else None)
