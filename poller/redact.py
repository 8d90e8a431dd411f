"""Keep credentials out of text that is logged, stored or shown."""

from __future__ import annotations

import re

# Userinfo: "user:password@", where a password may hold a raw '/' (SQLAlchemy's URLs take one);
# without a ':' before the first '/', an '@' further on is in the path (a key holding an e-mail).
_USERINFO = re.compile(r"(?<=://)(?:[^@\s/:]*:[^@\s]*?|[^@\s/]+)@")
# A credential passed as a query parameter (libpq's ?password=, presigned URLs' signatures, tokens).
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:password|passwd|pwd|sslpassword|token|access_token|secret|sig|signature|x-amz-signature|"
    r"x-amz-security-token|x-amz-credential)=)[^&\s#]*"
)


def redact(text: str) -> str:
    """Hide credentials embedded in URLs (``https://user:secret@host`` -> ``https://***@host``, and
    ``?password=...`` -> ``?password=***``)."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub("***@", text))
