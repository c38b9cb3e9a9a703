"""What the broker asks when a client logs in: the CredentialStore protocol.

The broker decides nothing about who may log in by itself: a CredentialStore answers, for a user name and
password (or a TLS client certificate's common name), with the Identity that logs in or with None. Latch's
own answer reads the device registry and the riders' sessions, which the API owns: it lives with them,
in api/registry/credentials.py (SqlCredentialStore), and `latch broker` / `latch serve` hand it to the
broker. So the broker imports nothing of the API.
"""

from __future__ import annotations

from typing import Protocol

from broker.identity import Identity


class CredentialStore(Protocol):
    async def check(self, username: str | None, password: str | None) -> Identity | None: ...

    # optional: `async def check_certificate(self, common_name: str) -> Identity | None`, for a TLS
    # client certificate the listener already verified against --tls-client-ca
