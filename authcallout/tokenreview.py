"""Who a Kubernetes ServiceAccount token belongs to, as the API server says through TokenReview.

The token is never trusted on its own: the API server checks its signature, expiry, audience and
that the pod it is bound to still exists, and answers with the user and the ``extra`` fields. A
token bound to a pod carries the pod's node (``authentication.kubernetes.io/node-name``, Kubernetes
1.30+): that, not anything the client says, is what makes a syncer's identity per node.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kubeclient import KubeConfigError, api_client

__all__ = [
    "NODE_NAME_EXTRA",
    "Identity",
    "KubeConfigError",
    "Refused",
    "ReviewUnavailable",
    "TokenReviewer",
]

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
_SA_PREFIX = "system:serviceaccount:"


class Refused(Exception):
    """The API server does not vouch for the token; the text says why, in one line."""


class ReviewUnavailable(Exception):
    """The API server could not be asked (down, forbidden): not the client's fault."""


@dataclass(frozen=True)
class Identity:
    """A ServiceAccount the API server authenticated, and the node its pod runs on, if bound."""

    namespace: str
    service_account: str
    node: str | None
    # The token's own expiry (unix seconds), once the API server has vouched for the token.
    expires: int | None

    @property
    def account_ref(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def _expiry(token: str) -> int | None:
    # Read only after a successful review: the API server has verified the signature by then.
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return int(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, AttributeError):
        return None


class TokenReviewer:
    """Reviews tokens for one audience with a client of its own (never the global default)."""

    def __init__(self, kubeconfig: str | None, audience: str) -> None:
        self._api = client.AuthenticationV1Api(api_client(kubeconfig))
        self.audience = audience

    async def review(self, token: str) -> Identity:
        """The token's identity; :class:`Refused` or :class:`ReviewUnavailable` otherwise."""
        if not token:
            raise Refused("no token")
        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience])
        )
        try:
            # The client is synchronous; a thread keeps the callout answering other requests.
            result = await asyncio.to_thread(
                self._api.create_token_review, body, _request_timeout=5
            )
        except ApiException as e:
            raise ReviewUnavailable(f"TokenReview failed: HTTP {e.status} {e.reason}") from e
        except (HTTPError, OSError) as e:
            raise ReviewUnavailable(f"TokenReview failed: {e}") from e
        status = result.status
        if status is None or not status.authenticated:
            error = (status.error if status is not None else None) or "not authenticated"
            raise Refused(f"token rejected by the API server: {error}")
        # An API server that ignored the requested audience must not let a token for another
        # service (the API server's own, say) through.
        if self.audience not in (status.audiences or []):
            raise Refused(f"token not issued for audience {self.audience!r}")
        username = (status.user.username if status.user else None) or ""
        if not username.startswith(_SA_PREFIX) or username.count(":") != 3:
            raise Refused(f"{username!r} is not a service account")
        namespace, name = username[len(_SA_PREFIX) :].split(":")
        extra = (status.user.extra if status.user else None) or {}
        nodes = extra.get(NODE_NAME_EXTRA) or []
        return Identity(
            namespace=namespace,
            service_account=name,
            node=nodes[0] if len(nodes) == 1 else None,
            expires=_expiry(token),
        )
